"""Defended training (simudy/defences.py, train.py's defence flags) and what the attacker's simulation makes
of it: DP-SGD's clipping replayed exactly, its epsilon against Opacus's own accountant, seeded
augmentation, one-line warnings for what the simulation leaves out."""
import json
import os

import pytest
import torch
from opacus.accountants import RDPAccountant

import recons
import train
from simudy.defences import dp_epsilon, unsimulated_defences
from simudy.errors import UserError
from simudy.method import reconstruction_loss_and_grad
from simudy.simulate import (SGDConfig, clipped_gradient_image_by_image, clipped_gradient_of_linear_layers, flat,
                             linear_layers_covering, loss_gradient, sgd_config_from_training, simulate_training)
from simudy.target import load_training_run
from tests.helpers import one_line_error, run, tiny_model

# 10 fake Fashion-MNIST images, 2 batches of 5: Opacus's expected batch size and the fixed batches both matter
DEFENDED = ["--lr", 0.5, "--epochs", 3, "--weight_decay", 1e-3, "--momentum", 0.5, "--label_smoothing", 0.1]


def train_defended(mlp_run, *extra):
    flags, _ = mlp_run
    train_dir = run(train, flags + DEFENDED + [str(e) for e in extra])
    return train_dir, json.load(open(os.path.join(train_dir, "config.json")))


def simulated_change(train_dir, config):
    """theta0 - theta_hat_final of the simulation recons.py runs, on the true images and labels."""
    trained = load_training_run(train_dir, "cpu")
    subset = torch.load(os.path.join(train_dir, "train_subset.pth"))
    train_args = config["args"]
    sgd = sgd_config_from_training(train_args, train_args["lr"])
    batches = list(zip(subset["images"].split(train_args["bs"]), subset["labels"].split(train_args["bs"])))
    _, change, _ = simulate_training(trained.model, trained.theta0, trained.buffers, batches, train_args["epochs"],
                                     sgd, create_graph=False)
    return flat(change.values()), trained.weight_change


def test_clipping_only_dp_sgd_is_replayed_exactly(mlp_run):
    """sigma = 0: Opacus's per-image clipping (binding: C far below the gradients' norms), with weight decay,
    momentum and label smoothing, two fixed batches. The simulation's theta_hat_final equals train.py's."""
    train_dir, config = train_defended(mlp_run, "--dp_noise_multiplier", 0, "--dp_max_grad_norm", 0.05)
    assert config["defence"]["expected_batch_size"] == 5 and config["defence"]["epsilon"] is None
    assert "_dp0_C0.05_ls0.1" in train_dir  # a defended run gets its own folder
    simulated, true = simulated_change(train_dir, config)
    assert (simulated - true).norm() / true.norm() <= 1e-5
    # the same simulation without the per-image clip is far off: the test can tell
    config["args"]["dp_max_grad_norm"] = None
    unclipped, _ = simulated_change(train_dir, config)
    assert (unclipped - true).norm() / true.norm() > 1


def test_noise_is_not_simulated_and_recons_says_so(mlp_run, capsys):
    """sigma > 0: the noise moves theta_final away from the noise-free simulation, and recons.py prints a
    one-line warning naming what it assumes; augmentation likewise."""
    train_dir, config = train_defended(mlp_run, "--dp_noise_multiplier", 0.5, "--dp_max_grad_norm", 0.05)
    simulated, true = simulated_change(train_dir, config)
    assert (simulated - true).norm() / true.norm() > 1e-2
    flags, _ = mlp_run
    capsys.readouterr()
    run(recons, flags + ["--tlr", 0.5, "--dp_noise_multiplier", 0.5, "--dp_max_grad_norm", 0.05,
                         "--label_smoothing", 0.1, "--preset", "fast", "--rec_epochs", 1, "--rec_steps_per_epoch", 2,
                         "--steps", 1])
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if line.startswith("warning:")] == unsimulated_defences(config["args"])
    assert len(unsimulated_defences(config["args"])) == 1 and "not the noise" in unsimulated_defences(config["args"])[0]
    assert unsimulated_defences({"augment": "flip"})[0].startswith("warning: the training augmented")
    assert unsimulated_defences({"augment": "none", "dp_noise_multiplier": None}) == []


def test_epsilon_is_opacus_accountant_at_sampling_rate_one(mlp_run):
    """Fixed batches: each image is in one batch per epoch, so epsilon is the Gaussian mechanism's at rate 1
    composed once per epoch; with bs = N that is also what Opacus's accountant reports for its own run."""
    train_dir, config = train_defended(mlp_run, "--dp_noise_multiplier", 2.0, "--dp_max_grad_norm", 1.0)
    report = config["defence"]
    accountant = RDPAccountant()
    for _ in range(3):  # the accountant's own bookkeeping, one epoch at a time
        accountant.step(noise_multiplier=2.0, sample_rate=1.0)
    assert report["epsilon"] == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-9)
    assert report["epsilon_if_poisson"] < report["epsilon"]  # amplification by sampling at rate 1/2
    assert dp_epsilon(4.0, 1.0, 3, 1e-5) < report["epsilon"] < dp_epsilon(1.0, 1.0, 3, 1e-5)
    assert dp_epsilon(0.0, 1.0, 3, 1e-5) is None


def test_augmentation_is_seeded_and_changes_the_training(mlp_run):
    flags, _ = mlp_run
    runs = []
    for augment, seed in (("crop_flip", 0), ("crop_flip", 0), ("none", 0), ("crop_flip", 1)):
        train_dir = run(train, flags + ["--lr", 0.5, "--augment", augment, "--seed", seed, "--overwrite"])
        runs.append(flat(torch.load(os.path.join(train_dir, "theta_final.pth")).values()))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2]) and not torch.equal(runs[0], runs[3])


def test_clipped_gradient_two_paths_and_both_reverse_passes():
    """DP's per-image clipped gradient of an MLP: the per-layer identity equals clipping one image at a time
    (values and their image gradients), a clip no image reaches leaves the batch's gradient, and the image
    gradient through a clipped simulation is the same by the unrolled and the memory-flat pass."""
    model = tiny_model("mlp", (1, 4, 4), 8).double()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    x, y = torch.randn(6, 1, 4, 4, dtype=torch.float64, requires_grad=True), torch.arange(6) % 3
    tight = SGDConfig(lr=0.5, per_sample_clip=0.05, dp_batch_size=3, label_smoothing=0.2)
    paths = [clipped_gradient_of_linear_layers(model, linear_layers_covering(model, params), params, {}, x, y, tight,
                                               create_graph=True),
             clipped_gradient_image_by_image(model, params, {}, x, y, tight, create_graph=True)]
    for a, b in zip(*paths):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)
    image_grads = [torch.autograd.grad(sum((g * g).sum() for g in path), [x])[0] for path in paths]
    assert image_grads[0].abs().sum() > 0 and torch.allclose(*image_grads, rtol=1e-8, atol=1e-14)
    loose = SGDConfig(lr=0.1, per_sample_clip=1e6, label_smoothing=0.2)
    plain = loss_gradient(model, params, {}, x, y, SGDConfig(lr=0.1, label_smoothing=0.2), create_graph=False)
    clipped = loss_gradient(model, params, {}, x, y, loose, create_graph=False)
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-15) for a, b in zip(clipped, plain))
    change = torch.randn(sum(p.numel() for p in params.values()), dtype=torch.float64)
    grads = [reconstruction_loss_and_grad(model, params, {}, x, y, change, 3, 2, tight, 0.0, "cos", backprop)[3]
             for backprop in ("unrolled", "recompute")]
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("extra, needles", [
    (["--dp_noise_multiplier", 1.0], ["--dp_noise_multiplier", "--dp_max_grad_norm"]),
    (["--dp_max_grad_norm", 0], ["--dp_max_grad_norm", "> 0"]),
    (["--dp_max_grad_norm", 1, "--dp_noise_multiplier", -1], ["--dp_noise_multiplier", ">= 0"]),
    (["--label_smoothing", 1.5], ["--label_smoothing"]),
    (["--dp_max_grad_norm", 1, "--model_name", "resnet18"], ["BatchNorm", "--model_name mlp"]),
])
def test_bad_defence_flags_are_one_line_errors_before_any_data(extra, needles, empty_dir):
    """Checked before the dataset is read: the data root here is empty."""
    with pytest.raises(UserError) as e:
        run(train, ["--dataset", "fashion_mnist", "--data_root", empty_dir, "--model_name", "mlp"] + extra)
    one_line_error(e, *needles)
