"""simudy/method.py: the loss at the true images, the unknown-N ranking (--num_dummy: dummies ranked by
their total gradient norm over the simulation, metrics --top), the BN-statistics prior, the lr schedules,
the box constraint, signed gradients, the coarse stage, the pyramid, decorrelated colours and the chroma TV."""
import argparse
import csv
import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

import metrics
import recons
import train
from models import build_model
from simudy.method import (ADAM_BETAS, RANKING_BUDGET_BYTES, BatchNormPrior, chroma_total_variation, initial_dummies,
                           lr_factor, rank_dummies, reconstruction_loss, reconstruction_loss_and_grad,
                           simudy_iteration, simudy_optimisers, simudy_setup, smoothing_noise, total_gradient_norms,
                           with_smoothing)
from simudy.reparam import COLOUR_MIX, coarse_stage, pyramid_dummies
from simudy.runs import resolve_run
from simudy.scoring import match_by_ssim, ssim_matrix
from simudy.simulate import SGDConfig, sgd_config_from_training, sgd_step, split_state
from simudy.target import load_training_run, training_run_from_states
from tests.helpers import run


def test_rank_dummies_orders_by_descending_norm_ties_by_index():
    assert rank_dummies(torch.tensor([1.0, 4.0, 18 ** 0.5, 0.0, 1.0])).tolist() == [2, 1, 0, 4, 3]


def test_class_balanced_ranking_against_a_loop_over_rounds():
    """--ranking class_balanced two ways: rank_dummies' one stable sort of within-class depth, and a plain
    loop that takes each class's k-th best dummy in round k, the round's dummies by descending norm. The
    first k*C ranks hold k dummies of every class; within a class the order is the norm order."""
    gen = torch.Generator().manual_seed(3)
    norms, labels = torch.rand(40, generator=gen), torch.randint(0, 4, (40,), generator=gen)
    per_class = {c: sorted((j for j in range(40) if labels[j] == c), key=lambda j: -norms[j]) for c in range(4)}
    expected = []
    for k in range(max(map(len, per_class.values()))):
        expected += sorted((ranks[k] for ranks in per_class.values() if k < len(ranks)), key=lambda j: -norms[j])
    ranking = rank_dummies(norms, labels).tolist()
    assert ranking == expected and sorted(ranking) == list(range(40))
    k = min(map(len, per_class.values()))
    assert sorted(labels[ranking[:4 * k]].tolist()) == sorted(list(range(4)) * k)
    assert rank_dummies(norms, labels).tolist() != rank_dummies(norms).tolist()  # it does reorder


@pytest.mark.parametrize("budget", [RANKING_BUDGET_BYTES, 1])  # 1 byte: one dummy per chunk
def test_total_gradient_norms_equal_a_per_dummy_loop(budget):
    """||sum_t grad loss(theta_t; x_j)|| along the graph-free simulation, against autograd one dummy at a
    time, with 7 dummies in batches of 3 (unequal), 2 epochs and momentum."""
    torch.manual_seed(0)
    model = build_model("mlp", 3, (1, 4, 4), 8)
    theta0 = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(7, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    sgd = SGDConfig(lr=0.1, momentum=0.9)
    got = total_gradient_norms(model, theta0, {}, x, y, 3, 2, sgd, budget=budget)
    params, sums = dict(theta0), torch.zeros(7, sum(p.numel() for p in theta0.values()))
    velocity = None
    for _ in range(2):
        for lo in range(0, 7, 3):
            for j in range(lo, min(lo + 3, 7)):
                p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
                loss = torch.nn.functional.cross_entropy(torch.func.functional_call(model, p, (x[j:j + 1],)),
                                                         y[j:j + 1])
                sums[j] += torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(p.values()))])
            new, velocity, _ = sgd_step(model, list(params.values()), velocity, {}, x[lo:lo + 3], y[lo:lo + 3], sgd)
            params = {k: v.detach() for k, v in zip(params, new)}
    assert torch.allclose(got, sums.norm(dim=1), rtol=1e-5)


def test_simulating_the_trainings_epochs_makes_the_true_images_the_optimum(mlp_run):
    """Why the fast preset uses --steps 0: with the training's epochs the match loss at the true images is
    0 (the simulation replays the training exactly); with another count it is not, so the dummies can fit
    the direction better by moving away from the images, the drift benchmarks/README.md measured."""
    flags, train_dir = mlp_run  # trained for 1 epoch
    training = load_training_run(train_dir, "cpu")
    subset = torch.load(os.path.join(train_dir, "train_subset.pth"))
    sgd = sgd_config_from_training(training.config["args"], 0.05)
    args = recons.parse_args([str(a) for a in flags + ["--tlr", 0.05, "--preset", "fast"]])

    def match_at_truth(epochs):
        _, match, _ = reconstruction_loss(training.model, training.theta0, training.buffers, subset["images"],
                                          subset["labels"], training.weight_change, 5, epochs, sgd, 0.0, "cos")
        return match.item()
    steps = resolve_run(args).steps
    assert steps == 1
    assert match_at_truth(steps) < 1e-5
    assert match_at_truth(3) > 1e-3


def test_num_dummy_ranks_by_gradient_norm_and_top_scores(mlp_run):
    flags = mlp_run.flags + ["--tlr", 0.05, "--steps", 2]
    recons_dir = run(recons, flags + ["--num_dummy", 30, "--rec_epochs", 1, "--rec_steps_per_epoch", 2,
                                      "--save_every", 1])
    assert recons_dir.endswith("_ndummy30")
    first, last = (torch.load(os.path.join(recons_dir, f"0_{s}.pth")) for s in (0, 1))
    for snap in (first, last):
        assert snap["x"].shape[0] == 30 and sorted(snap["ranking"].tolist()) == list(range(30))
        assert torch.all(snap["grad_norms"][snap["ranking"]].diff() <= 0)
    # the ranking is by each snapshot's dummies' total gradient over the simulation (clip off)
    run_ = load_training_run(mlp_run.train_dir, torch.device("cpu"))
    norms = total_gradient_norms(run_.model, run_.theta0, run_.buffers, first["x"], first["labels"], 5, 2,
                                 sgd_config_from_training(run_.config["args"], 0.05))
    assert torch.allclose(first["grad_norms"], norms, rtol=1e-5)
    with open(os.path.join(recons_dir, "ranking.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["dummy"]) for r in rows] == last["ranking"].tolist()
    assert [int(r["rank"]) for r in rows] == list(range(30))
    assert [int(r["label"]) for r in rows] == last["labels"][last["ranking"]].tolist()

    result = run(metrics, flags + ["--num_dummy", 30, "--top", 20, "--snapshot", "last"])
    assert result["n_recons"] == 20 and result["n_train"] == 10
    matched = torch.load(os.path.join(recons_dir, "metrics", "0_1", "matched.pth"))
    assert set(matched["recon_index"].tolist()) <= set(last["ranking"][:20].tolist())


def test_ranking_puts_matched_dummies_first_when_n_is_known(fashion_root, in_tmp_cwd):
    """N = 10 training images, M = 20 dummies (two per class). After the reconstruction, the dummies that
    greedy SSIM matching pairs with a training image carry about twice the total gradient of the others
    (the paper's appendix: 1.55 vs 0.55), and the 10 first-ranked are mostly the matched ones (chance: 5).
    Measured when written: 8 of 10, mean norms 7.06 vs 3.56, average SSIM 0.59."""
    flags = ["--dataset", "fashion_mnist", "--data_root", fashion_root, "--model_name", "mlp", "--width", 64,
             "--num_imgs_per_class", 1, "--bs", 10]
    train_dir = run(train, flags + ["--lr", 0.05, "--epochs", 5])
    recons_dir = run(recons, flags + ["--tlr", 0.05, "--steps", 2, "--num_dummy", 20, "--rec_epochs", 1,
                                      "--rec_steps_per_epoch", 600, "--schedule", "cosine", "--tv_weight", 2e-3,
                                      "--clip_epochs", 0, "--save_every", 0])
    snap = torch.load(os.path.join(recons_dir, "0_599.pth"))
    train_images = torch.load(os.path.join(train_dir, "train_subset.pth"))["images"]
    ssim = ssim_matrix(train_images, snap["x"])
    matched = {c for _, c in match_by_ssim(ssim)}
    assert sum(ssim[r, c] for r, c in match_by_ssim(ssim)) / 10 > 0.4  # a reconstruction worth ranking
    unmatched = [j for j in range(20) if j not in matched]
    norms = snap["grad_norms"]
    assert norms[list(matched)].mean() > 1.5 * norms[unmatched].mean()
    assert sum(int(j) in matched for j in snap["ranking"][:10]) >= 7


def _tiny_resnet_problem():
    """A tiny ResNet whose running statistics are not the defaults, dummies, labels, a change and an SGD."""
    torch.manual_seed(0)
    model = build_model("resnet18", 10, (3, 8, 8), 4)
    with torch.no_grad():  # running statistics that are not the defaults
        model.train()
        model(torch.randn(16, 3, 8, 8) * 2 + 0.5)
    model.eval()
    theta0, buffers = split_state(model, {k: v.clone() for k, v in model.state_dict().items()})
    x = torch.randn(6, 3, 8, 8, requires_grad=True)
    labels = torch.arange(6) % 10
    change = torch.randn(sum(p.numel() for p in theta0.values()))
    sgd = SGDConfig(lr=0.05)
    return model, theta0, buffers, x, labels, change, sgd


def test_bn_prior_two_reverse_passes_agree_and_match_a_direct_computation():
    """The BN prior taken from the simulation's first step (unrolled) and from its own forward (recompute)
    give the same loss and image gradient; its value equals DeepInversion's formula computed directly."""
    model, theta0, buffers, x, labels, change, sgd = _tiny_resnet_problem()
    prior = BatchNormPrior(model, buffers)
    out = {}
    for backprop in ("unrolled", "recompute"):
        out[backprop] = reconstruction_loss_and_grad(model, theta0, buffers, x, labels, change, 3, 2, sgd, 1e-3,
                                                     "cos", backprop, 1, prior, 0.5)
        out[backprop + "_value"] = prior.value
    assert torch.allclose(out["unrolled"][0], out["recompute"][0], rtol=1e-5)
    assert torch.allclose(out["unrolled"][3], out["recompute"][3], rtol=1e-4, atol=1e-7)
    # direct: each batch's BN-input statistics at theta0 against theta0's running statistics
    inputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: inputs.append((m, i[0]))) for m in model.modules()
             if isinstance(m, torch.nn.BatchNorm2d)]
    direct = 0.0
    for xb in x.detach().split(3):
        inputs.clear()
        with torch.no_grad():
            model(xb)
        direct += sum((h.mean((0, 2, 3)) - m.running_mean).norm() + (h.var((0, 2, 3), unbiased=False)
                      - m.running_var).norm() for m, h in inputs)
    for h in hooks:
        h.remove()
    assert abs(out["unrolled_value"] - float(direct)) < 1e-4 * float(direct)
    assert abs(out["recompute_value"] - float(direct)) < 1e-4 * float(direct)
    # the prior moves the loss by its weight times its value
    plain = reconstruction_loss_and_grad(model, theta0, buffers, x, labels, change, 3, 2, sgd, 1e-3, "cos",
                                         "unrolled")
    assert abs(float(out["unrolled"][0] - plain[0]) - 0.5 * float(direct)) < 1e-3



def test_bn_prior_floor_shifts_the_loss_above_it_and_stops_the_pull_below_it():
    """--bn_prior_floor: above the floor the loss is the plain prior's less weight x floor, with the same image
    gradient; at a floor above the prior's value, loss and gradient are those without a prior; by both reverse
    passes."""
    model, theta0, buffers, x, labels, change, sgd = _tiny_resnet_problem()
    for backprop in ("unrolled", "recompute"):
        def loss(floor=None):
            prior = None if floor is None else BatchNormPrior(model, buffers, floor)
            out = reconstruction_loss_and_grad(model, theta0, buffers, x, labels, change, 3, 2, sgd, 1e-3, "cos",
                                               backprop, 1, prior, 0.0 if floor is None else 0.5)
            return out, None if prior is None else prior.value
        (no_floor, _, _, grad_no_floor), value = loss(0.0)
        (plain, _, _, grad_plain), _ = loss(None)
        (low, _, _, grad_low), value_low = loss(value / 2)
        (high, _, _, grad_high), value_high = loss(value * 2)
        assert value_low == pytest.approx(value) and value_high == pytest.approx(value)  # the log's raw value
        assert float(low) == pytest.approx(float(no_floor) - 0.5 * value / 2, rel=1e-5)
        assert torch.allclose(grad_low, grad_no_floor, rtol=1e-5, atol=1e-8)
        assert float(high) == pytest.approx(float(plain), rel=1e-6)
        assert torch.allclose(grad_high, grad_plain, rtol=1e-5, atol=1e-8)
        assert not torch.allclose(grad_no_floor, grad_plain, rtol=1e-3)  # the prior does pull without a floor

def test_step_and_warmup_schedules():
    assert [lr_factor(i, 80, "step", 0) for i in (0, 29, 30, 49, 50, 69, 70, 79)] == \
        [1.0, 1.0, 0.1, 0.1, pytest.approx(0.01), pytest.approx(0.01), pytest.approx(0.001), pytest.approx(0.001)]
    assert [lr_factor(i, 100, "cosine", 4) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 100, "cosine", 4) == 1.0 and lr_factor(99, 100, "cosine", 4) < 0.01
    x = torch.zeros(3, requires_grad=True)
    opt, sched = simudy_optimisers(x, 0.1, "step", 8, warmup=2)
    lrs = []
    for _ in range(8):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001, 0.0001])


def _tiny_mlp_run(side, channels=1, **flags):
    """A width-8 MLP on 10 side×side images (mean 0.5, std 0.25: the box is [-2, 2]) with a made-up theta_final,
    and the flags simudy_setup reads (box on; `flags` override)."""
    torch.manual_seed(0)
    model = build_model("mlp", 10, (channels, side, side), 8)
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    theta_final = {k: v - 0.01 * torch.randn_like(v) for k, v in theta0.items()}
    config = {"args": {"lr": 0.1, "bs": 5, "epochs": 1}, "data": {"num_images": 10, "num_classes": 10,
              "image_shape": [channels, side, side], "mean": [0.5] * channels, "std": [0.25] * channels}}
    args = dict(backprop="unrolled", steps=1, clip_norm=20.0, clip_to=5.0, clip_epochs=0, rec_epochs=1,
                rec_steps_per_epoch=5, tv_weight=1e-3, loss_type="cos", keep_every=0, bn_prior=0.0,
                bn_prior_until=1.0, box=True, signed_grad=False, chroma_tv=0.0, steps_epochs=0,
                smooth_sigma=0.0, smooth_until=0.5, seed=0)
    return training_run_from_states(model, theta0, theta_final, config, "cpu"), argparse.Namespace(**{**args, **flags})


def test_box_and_signed_gradient_in_one_iteration():
    """--box puts every pixel back inside the normalised [0, 1] range; --signed_grad hands Adam the sign."""
    run, args = _tiny_mlp_run(4, signed_grad=True)
    x, labels, _ = initial_dummies(10, (1, 4, 4), 10, 0, "cpu")
    with torch.no_grad():
        x.mul_(20)  # far outside [-2, 2], the box of mean 0.5, std 0.25
    setup, _ = simudy_setup(run, 0.1, 5, args, x, labels)
    opt, sched = simudy_optimisers(x, 0.01, "cosine", 5)
    simudy_iteration(setup, x, labels, opt, sched, 0)
    assert set(x.grad.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert x.min() >= -2.0 and x.max() <= 2.0 and (x == 2.0).any() and (x == -2.0).any()


def test_smoothing_takes_the_gradient_at_the_dummies_plus_the_iterations_noise():
    """--smooth_sigma: two paths to the same gradient. recons.py's iteration against the loss's gradient at x +
    sigma_i * randn(seed, iteration) computed here, sigma_i = S (1 - i / (until x run)); off after that share."""
    run, args = _tiny_mlp_run(4, box=False, smooth_sigma=0.3, smooth_until=0.4, seed=7, rec_steps_per_epoch=5)
    x, labels, _ = initial_dummies(10, (1, 4, 4), 10, 0, "cpu")
    short_run_setup, _ = simudy_setup(run, 0.1, 5, args, x, labels)
    assert smoothing_noise(short_run_setup, x, 0) is None  # short runs (restarts, searches) are not smoothed
    setup = with_smoothing(short_run_setup, args, 5)
    assert setup.smooth_iterations == 2
    opt, sched = simudy_optimisers(x, 0.0, "cosine", 5)  # lr 0: x stays, so each path sees the same dummies
    for i, sigma in enumerate([0.3, 0.15, 0.0]):
        noise = sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(7 * 1_000_003 + i))
        at = (x.detach() + noise).requires_grad_(True)
        total, _, _ = reconstruction_loss(run.model, run.theta0, run.buffers, at, labels, run.weight_change, 5, 1,
                                          setup.sgd, 1e-3, "cos")
        (expected,) = torch.autograd.grad(total, [at])
        row = simudy_iteration(setup, x, labels, opt, sched, i)
        torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-7)
        assert row["total"] == pytest.approx(total.item(), rel=1e-6)
    assert not torch.allclose(smoothing_noise(setup, x, 0), smoothing_noise(dataclasses.replace(setup, seed=8), x, 0))


def test_coarse_stage_moves_the_low_resolution_images_as_adam_on_them_would():
    """--coarse: two paths to the same step. recons.py's iteration (the image gradient, then the chain rule
    through the upsampling) against Adam on z with autograd through loss(upsample(z)) (the probe's way);
    after the stage, only the full-size dummies move."""
    run, args = _tiny_mlp_run(8)
    x, labels, _ = initial_dummies(10, (1, 8, 8), 10, 0, "cpu")
    setup, _ = simudy_setup(run, 0.1, 5, args, x, labels)
    setup = dataclasses.replace(setup, reparam=coarse_stage(x, 4, 2))
    z_ref = setup.reparam.z.detach().clone().requires_grad_(True)
    assert torch.allclose(x, F.interpolate(z_ref, size=(8, 8), mode="bilinear", align_corners=False))
    opt, sched = simudy_optimisers(x, 0.05, "cosine", 5, reparam=setup.reparam)
    opt_ref = torch.optim.Adam([z_ref], lr=0.05, betas=ADAM_BETAS)
    for i in range(2):
        for g in opt_ref.param_groups:
            g["lr"] = sched.get_last_lr()[0]
        x_ref = F.interpolate(z_ref, size=(8, 8), mode="bilinear", align_corners=False)
        total, _, _ = reconstruction_loss(run.model, run.theta0, run.buffers, x_ref, labels, run.weight_change, 5, 1,
                                          setup.sgd, 1e-3, "cos")
        (z_ref.grad,) = torch.autograd.grad(total, [z_ref])
        opt_ref.step()
        with torch.no_grad():
            z_ref.clamp_(-2.0, 2.0)  # the box of mean 0.5, std 0.25
        simudy_iteration(setup, x, labels, opt, sched, i)
        assert x.grad is None
        torch.testing.assert_close(setup.reparam.z.detach(), z_ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.detach(), F.interpolate(z_ref, size=(8, 8), mode="bilinear",
                                                             align_corners=False).detach(), rtol=1e-5, atol=1e-6)
    z_before, x_before = setup.reparam.z.detach().clone(), x.detach().clone()
    simudy_iteration(setup, x, labels, opt, sched, 2)  # full size from here
    assert torch.equal(setup.reparam.z.detach(), z_before) and not torch.equal(x.detach(), x_before)
    assert opt.state[x]["step"].item() == 1  # x's Adam moments start fresh at the switch


def test_pyramid_moves_every_level_as_adam_on_them_would():
    """--pyramid: two paths to the same steps. recons.py's iteration (the image gradient, then the chain rule
    through the sum of upsampled levels) against Adam on the levels with autograd through loss(sum); the run
    starts at the dummies themselves, and with --box the sum stays inside it."""
    run, args = _tiny_mlp_run(8, box=False)
    x, labels, _ = initial_dummies(10, (1, 8, 8), 10, 0, "cpu")
    x_start = x.detach().clone()
    setup, _ = simudy_setup(run, 0.1, 5, args, x, labels)
    setup = dataclasses.replace(setup, reparam=pyramid_dummies(x, 3))
    assert [tuple(z.shape[-2:]) for z in setup.reparam.levels] == [(8, 8), (4, 4), (2, 2)]
    torch.testing.assert_close(setup.reparam.composed((8, 8)).detach(), x_start, rtol=0, atol=0)
    levels_ref = [z.detach().clone().requires_grad_(True) for z in setup.reparam.levels]
    opt, sched = simudy_optimisers(x, 0.05, "cosine", 5, reparam=setup.reparam)
    opt_ref = torch.optim.Adam(levels_ref, lr=0.05, betas=ADAM_BETAS)
    for i in range(3):
        for g in opt_ref.param_groups:
            g["lr"] = sched.get_last_lr()[0]
        x_ref = sum(F.interpolate(z, size=(8, 8), mode="bilinear", align_corners=False) for z in levels_ref)
        total, _, _ = reconstruction_loss(run.model, run.theta0, run.buffers, x_ref, labels, run.weight_change, 5, 1,
                                          setup.sgd, 1e-3, "cos")
        grads = torch.autograd.grad(total, levels_ref)
        for z, g in zip(levels_ref, grads):
            z.grad = g
        opt_ref.step()
        simudy_iteration(setup, x, labels, opt, sched, i)
        assert x.grad is None
        for z, z_ref in zip(setup.reparam.levels, levels_ref):
            torch.testing.assert_close(z.detach(), z_ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.detach(), sum(F.interpolate(z, size=(8, 8), mode="bilinear", align_corners=False)
                                                   for z in levels_ref).detach(), rtol=1e-5, atol=1e-6)
    assert all(not torch.equal(z.detach(), torch.zeros_like(z)) for z in setup.reparam.levels[1:])  # all moved

    run, args = _tiny_mlp_run(8)  # --box: the full-size level takes up what the clamp removes from the sum
    x, labels, _ = initial_dummies(10, (1, 8, 8), 10, 0, "cpu")
    with torch.no_grad():
        x.mul_(20)
    setup, _ = simudy_setup(run, 0.1, 5, args, x, labels)
    setup = dataclasses.replace(setup, reparam=pyramid_dummies(x, 2))
    opt, sched = simudy_optimisers(x, 0.05, "cosine", 5, reparam=setup.reparam)
    simudy_iteration(setup, x, labels, opt, sched, 0)
    assert x.min() >= -2.0 and x.max() <= 2.0 and (x == 2.0).any() and (x == -2.0).any()
    torch.testing.assert_close(setup.reparam.composed((8, 8)).detach(), x.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("levels", [1, 2])
def test_decorrelated_colours_move_as_adam_on_the_colour_coordinates_would(levels):
    """--decorrelate_colours: two paths to the same steps. recons.py's iteration (the image gradient, then the
    chain rule through the colour mix and the pyramid) against Adam on the coordinates with autograd through
    loss(mix(sum)); the run starts at the dummies, and --box keeps the mixed images inside it."""
    run, args = _tiny_mlp_run(4, channels=3, box=False)
    x, labels, _ = initial_dummies(10, (3, 4, 4), 10, 0, "cpu")
    x_start = x.detach().clone()
    setup, _ = simudy_setup(run, 0.1, 5, args, x, labels)
    setup = dataclasses.replace(setup, reparam=pyramid_dummies(x, levels, decorrelated=True))
    torch.testing.assert_close(setup.reparam.composed((4, 4)).detach(), x_start, rtol=1e-5, atol=1e-6)
    ref = [z.detach().clone().requires_grad_(True) for z in setup.reparam.levels]
    opt, sched = simudy_optimisers(x, 0.05, "cosine", 5, reparam=setup.reparam)
    opt_ref = torch.optim.Adam(ref, lr=0.05, betas=ADAM_BETAS)

    def mixed(levels_ref):  # x[:, c] = sum_k mix[c, k] (sum of upsampled levels)[:, k], by hand
        y = sum(F.interpolate(z, size=(4, 4), mode="bilinear", align_corners=False) for z in levels_ref)
        return torch.stack([sum(COLOUR_MIX[c, k] * y[:, k] for k in range(3)) for c in range(3)], dim=1)
    for i in range(3):
        for g in opt_ref.param_groups:
            g["lr"] = sched.get_last_lr()[0]
        total, _, _ = reconstruction_loss(run.model, run.theta0, run.buffers, mixed(ref), labels, run.weight_change,
                                          5, 1, setup.sgd, 1e-3, "cos")
        for z, g in zip(ref, torch.autograd.grad(total, ref)):
            z.grad = g
        opt_ref.step()
        simudy_iteration(setup, x, labels, opt, sched, i)
        for z, z_ref in zip(setup.reparam.levels, ref):
            torch.testing.assert_close(z.detach(), z_ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.detach(), mixed(ref).detach(), rtol=1e-5, atol=1e-5)
    # chroma moves less far than luminance: Adam's first steps are ~lr per coordinate, and mix's chroma columns
    # are 3-13x smaller than its luminance column
    step = x.detach() - x_start
    luminance = step.mean(dim=1, keepdim=True)
    assert (step - luminance).abs().mean() < 0.5 * luminance.abs().mean()

    run, args = _tiny_mlp_run(4, channels=3)  # --box: the full-size level takes up what the clamp removes
    x, labels, _ = initial_dummies(10, (3, 4, 4), 10, 0, "cpu")
    with torch.no_grad():
        x.mul_(20)
    setup, _ = simudy_setup(run, 0.1, 5, args, x, labels)
    setup = dataclasses.replace(setup, reparam=pyramid_dummies(x, levels, decorrelated=True))
    opt, sched = simudy_optimisers(x, 0.05, "cosine", 5, reparam=setup.reparam)
    simudy_iteration(setup, x, labels, opt, sched, 0)
    assert x.min() >= -2.0 and x.max() <= 2.0 and (x == 2.0).any() and (x == -2.0).any()
    torch.testing.assert_close(setup.reparam.composed((4, 4)).detach(), x.detach(), rtol=1e-5, atol=1e-5)


def test_chroma_total_variation_against_solving_for_the_colour_coordinates():
    """--chroma_tv's value two ways: the inverse mix's chroma rows, and the colour coordinates solved pixel by
    pixel from mix y = x, their neighbour differences written out. Images whose chroma is flat have none."""
    x = torch.randn(3, 3, 5, 6, generator=torch.Generator().manual_seed(1))
    y = torch.linalg.solve(COLOUR_MIX, x.permute(1, 0, 2, 3).reshape(3, -1)).reshape(3, 3, 5, 6).permute(1, 0, 2, 3)
    chroma = y[:, 1:]
    by_hand = ((chroma[..., :, 1:] - chroma[..., :, :-1]).abs().sum() / (3 * 2 * 5 * 5)
               + (chroma[..., 1:, :] - chroma[..., :-1, :]).abs().sum() / (3 * 2 * 4 * 6))
    torch.testing.assert_close(chroma_total_variation(x), by_hand, rtol=1e-5, atol=1e-6)
    luminance_only = torch.stack([y[:, 0], torch.full_like(y[:, 1], 0.3), torch.full_like(y[:, 2], -0.2)], dim=1)
    flat_chroma = torch.einsum("ck,nkhw->nchw", COLOUR_MIX, luminance_only)
    assert chroma_total_variation(flat_chroma) < 1e-5 < chroma_total_variation(x)


def test_chroma_tv_moves_the_dummies_as_adam_on_the_loss_plus_the_prior_would():
    """--chroma_tv W: two paths to the same steps. recons.py's iteration (the simulation's image gradient plus
    the prior's own) against Adam on x with autograd through loss(x) + W * chroma TV(x); the log row holds
    the prior's value and the total includes it."""
    run, args = _tiny_mlp_run(4, channels=3, box=False, chroma_tv=0.5)
    x, labels, _ = initial_dummies(10, (3, 4, 4), 10, 0, "cpu")
    x_ref = x.detach().clone().requires_grad_(True)
    setup, _ = simudy_setup(run, 0.1, 5, args, x, labels)
    opt, sched = simudy_optimisers(x, 0.05, "cosine", 5)
    opt_ref = torch.optim.Adam([x_ref], lr=0.05, betas=ADAM_BETAS)
    for i in range(3):
        for g in opt_ref.param_groups:
            g["lr"] = sched.get_last_lr()[0]
        loss, _, _ = reconstruction_loss(run.model, run.theta0, run.buffers, x_ref, labels, run.weight_change, 5, 1,
                                         setup.sgd, 1e-3, "cos")
        prior = chroma_total_variation(x_ref)
        (x_ref.grad,) = torch.autograd.grad(loss + 0.5 * prior, [x_ref])
        opt_ref.step()
        row = simudy_iteration(setup, x, labels, opt, sched, i)
        assert row["chroma_tv"] == pytest.approx(prior.item(), rel=1e-5)
        assert row["total"] == pytest.approx((loss + 0.5 * prior).item(), rel=1e-5)
        torch.testing.assert_close(x.detach(), x_ref.detach(), rtol=1e-5, atol=1e-6)
    assert prior.item() < chroma_total_variation(initial_dummies(10, (3, 4, 4), 10, 0, "cpu")[0]).item()
