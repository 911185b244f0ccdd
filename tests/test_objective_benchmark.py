"""benchmarks/objective.py (issue 12, "check the objective before the optimiser"): its tables on a tiny
train.py run. Two paths: the --draws table's draw k is the single-draw table's row at seed + k."""
import csv
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import recons
import train
from simudy.errors import UserError
from simudy.exposure import image_shares
from simudy.reparam import COLOUR_MIX, mix_colours
from simudy.search import change_agreement
from simudy.simulate import graph_free_steps, sgd_config_from_training
from simudy.target import load_training_run, loss_per_image
from tests.helpers import load_benchmark, run


@pytest.fixture(scope="module")
def objective():
    return load_benchmark("objective")


def test_the_truth_is_the_optimum_and_draws_repeat_the_single_draw_rows(objective, mlp_run):
    single = {seed: objective.main(objective.parse_args(["--train_dir", mlp_run.train_dir, "--sigmas", "0", "0.3",
                                                         "1.0", "--seed", str(seed)]))
              for seed in (4, 5)}
    assert abs(single[4][0]["global"]) < 1e-5 and single[4][0]["ssim"] == pytest.approx(1.0)
    assert single[4][2]["global"] > single[4][1]["global"] > 1e-4  # more noise, farther from the truth
    rows = objective.main(objective.parse_args(["--train_dir", mlp_run.train_dir, "--sigmas", "0", "0.3", "1.0",
                                                "--seed", "4", "--draws", "2"]))
    assert [r["sigma"] for r in rows] == [0.3, 1.0]  # sigma 0 has no spread to show
    for row, k in zip(rows, (1, 2)):
        assert row["losses"] == pytest.approx([single[4][k]["global"], single[5][k]["global"]], rel=1e-5)
        assert row["ssim"] == pytest.approx(single[4][k]["ssim"])
        assert row["mean"] == pytest.approx(sum(row["losses"]) / 2)


def test_snapshot_rows_repeat_the_reconstructions_own_log(objective, cifar_cwd):
    """Two paths to a reconstruction's match loss and BN prior: recons.py's log.csv at the iteration after a
    snapshot (a snapshot holds the images after its iteration's step) and objective.py's row for it (its
    images and labels simulated again). The truth's prior is below the noise's (the prior tells them apart)."""
    flags = ["--model_name", "resnet18", "--width", 4, "--num_imgs_per_class", 1, "--bs", 5]
    train_dir = run(train, flags + ["--lr", 0.05, "--epochs", 2, "--pretrain_imgs", 5, "--pretrain_epochs", 1])
    recons_dir = run(recons, flags + ["--tlr", 0.05, "--steps", 0, "--rec_epochs", 1, "--rec_steps_per_epoch", 3,
                                      "--save_every", 1, "--bn_prior", 0.1, "--tv_weight", 0])
    snapshot = os.path.join(recons_dir, "0_1.pth")  # the images after iteration 1's step: iteration 2's loss
    rows = objective.main(objective.parse_args(["--train_dir", train_dir, "--sigmas", "0", "3", "--bn_prior",
                                                "--snapshots", snapshot]))
    with open(os.path.join(recons_dir, "log.csv")) as f:
        logged = {int(r["iteration"]): r for r in csv.DictReader(f)}[2]
    assert rows[2]["sigma"] == snapshot
    assert rows[2]["global"] == pytest.approx(float(logged["cos"]), rel=1e-4)
    assert rows[2]["bn_prior"] == pytest.approx(float(logged["bn"]), rel=1e-4)
    assert 0 < rows[0]["bn_prior"] < rows[1]["bn_prior"]


def test_sim_epochs_table_shows_fewer_epochs_move_the_optimum_and_a_loose_clip_changes_nothing(
        objective, fashion_root, in_tmp_cwd):
    """--sim_epochs 1 3 --clips on a 3-epoch training: the truth is the optimum (loss ~0) only with all 3
    epochs; each cell equals simudy.search.change_agreement's 1 - cos (two paths); a clip above every true
    gradient norm leaves the truth's loss as it is, one below them does not."""
    flags = ["--dataset", "fashion_mnist", "--data_root", fashion_root, "--model_name", "mlp", "--width", 16,
             "--num_imgs_per_class", 1, "--bs", 5]
    train_dir = run(train, flags + ["--lr", 0.05, "--epochs", 3])
    training = load_training_run(train_dir, "cpu")
    subset = torch.load(os.path.join(train_dir, "train_subset.pth"))
    norms = objective.true_gradient_norms(training, subset["images"], subset["labels"])
    assert len(norms) == 6  # 2 batches x 3 epochs
    loose, tight = 2 * max(norms), min(norms) / 2
    table = objective.main(objective.parse_args(["--train_dir", train_dir, "--sim_epochs", "1", "3", "--clips",
                                                 str(loose), str(tight), "--sigmas", "0.3"]))
    truth, noisy = table[0]["losses"], table[1]["losses"]
    assert abs(truth[f"3/{math.inf:g}"]) < 1e-5 and truth[f"1/{math.inf:g}"] > 1e-3
    assert truth[f"3/{loose:g}"] == pytest.approx(truth[f"3/{math.inf:g}"], abs=1e-6)
    assert truth[f"3/{tight:g}"] > 1e-4
    noise = torch.randn(subset["images"].shape, generator=torch.Generator().manual_seed(0))
    for epochs in (1, 3):
        direct, _ = change_agreement(training, subset["images"] + 0.3 * noise, subset["labels"], 0.05, 5, epochs)
        assert noisy[f"{epochs}/{math.inf:g}"] == pytest.approx(direct, rel=1e-4, abs=1e-6)


def test_swap_rows_replace_only_the_images_on_their_side_of_the_part(objective, fashion_root, in_tmp_cwd):
    """--swap_part: each row changes exactly the images on its side of the part threshold, with never-trained
    images of the same class; the fitted kind takes ones theta0 fits better than the plain pool draw; each
    row's loss equals change_agreement's on its images (two paths), and with the threshold above every part
    the ">= P swapped" rows are the truth itself (loss ~0)."""
    flags = ["--dataset", "fashion_mnist", "--data_root", fashion_root, "--model_name", "mlp", "--width", 16,
             "--num_imgs_per_class", 1, "--bs", 5]
    train_dir = run(train, flags + ["--lr", 0.05, "--epochs", 3])
    training = load_training_run(train_dir, "cpu")
    subset = torch.load(os.path.join(train_dir, "train_subset.pth"))
    x_true, y_true = subset["images"], subset["labels"]
    shares, _ = image_shares(training, x_true, y_true)
    part = float(shares.median())
    rows = objective.swapped_rows(training, x_true, y_true, part, 2, fashion_root)
    assert len(rows) == 6
    small = shares < part
    trained = x_true.reshape(len(x_true), -1)
    for name, x, labels in rows:
        changed = (x != x_true).flatten(1).any(dim=1)
        assert torch.equal(changed, small if "part <" in name else ~small) and torch.equal(labels, y_true)
        assert not any(torch.equal(xi.flatten(), t) for xi in x[changed] for t in trained)
    fitted, plain = rows[4:], rows[:2]
    mean_loss = lambda rs: sum(float(loss_per_image(training, x, y_true)[small].mean()) for _, x, _ in rs)
    assert mean_loss(fitted) <= mean_loss(plain)
    table = objective.main(objective.parse_args(["--train_dir", train_dir, "--sim_epochs", "3", "--swap_part",
                                                 "10", "--draws", "1", "--sigmas", "0.3", "--data_root",
                                                 str(fashion_root)]))
    assert [r["images"] for r in table] == ["0", "0.3", "part < 10 swapped, draw 0", "part >= 10 swapped, draw 0",
                                            "part < 10 swapped for fitted, draw 0"]
    assert abs(table[3]["losses"][f"3/{math.inf:g}"]) < 1e-5 and table[3]["ssim"] == pytest.approx(1.0)
    every = objective.swapped_rows(training, x_true, y_true, 10, 1, fashion_root)
    direct, _ = change_agreement(training, every[0][1], y_true, 0.05, 5, 3)
    assert table[2]["losses"][f"3/{math.inf:g}"] == pytest.approx(direct, rel=1e-4, abs=1e-6) and direct > 1e-3
    with pytest.raises(UserError, match="pass --draws below 7000"):  # the pool is short: one line naming the fix
        objective.swapped_rows(training, x_true, y_true, part, 7000, fashion_root)


def test_training_summary_repeats_the_training_replayed(objective, fashion_root, in_tmp_cwd):
    """Two paths to the instance line: train.py's history (each epoch's mean loss of its batches, each taken
    before its step) and the training replayed by the simulation's own graph-free steps on the subset; the
    change's norm from the two checkpoint files."""
    flags = ["--dataset", "fashion_mnist", "--data_root", fashion_root, "--model_name", "mlp", "--width", 16,
             "--num_imgs_per_class", 1, "--bs", 5]
    train_dir = run(train, flags + ["--lr", 0.5, "--epochs", 4])
    training_run = load_training_run(train_dir, "cpu")
    summary = objective.training_summary(training_run)
    subset = torch.load(os.path.join(train_dir, "train_subset.pth"))
    batches = list(zip(subset["images"].split(5), subset["labels"].split(5)))
    lr, _, epochs = objective.training(training_run)
    sgd = sgd_config_from_training(training_run.config["args"], lr)
    batch_losses = [F.cross_entropy(functional_call(training_run.model, dict(zip(training_run.theta0, params)),
                                                    (batches[b][0],)), batches[b][1]).item()
                    for _, b, params, _, _ in graph_free_steps(training_run.model, training_run.theta0,
                                                               training_run.buffers, batches, epochs, sgd)]
    n = len(batches)
    per_epoch = [sum(batch_losses[e * n:(e + 1) * n]) / n for e in range(epochs)]
    assert [summary["first_loss"], summary["max_loss"], summary["final_loss"]] == pytest.approx(
        [per_epoch[0], max(per_epoch), per_epoch[-1]], rel=1e-4)
    assert per_epoch[-1] < per_epoch[0]  # the lr trains: the three numbers are not one
    theta0, theta_final = (torch.load(os.path.join(train_dir, f)) for f in ("theta0.pth", "theta_final.pth"))
    norm = torch.sqrt(sum((theta0[k] - theta_final[k]).pow(2).sum() for k in training_run.theta0))
    assert summary["change_norm"] == pytest.approx(float(norm), rel=1e-5) and summary["change_norm"] > 0
    training_run.config.pop("history")  # a folder of an older train.py: the norm alone, no KeyError
    assert objective.training_summary(training_run) == {**summary, "first_loss": None, "max_loss": None,
                                                        "final_loss": None}


def test_colour_statistics_read_back_the_coordinates_the_images_were_made_from(objective, mlp_run):
    """Two paths to a row's colour columns: images composed from known luminance and chroma coordinates
    (mix_colours with COLOUR_MIX, as --decorrelate_colours makes its dummies) give back those coordinates'
    own std and TV. Grey images are refused before any simulation."""
    scales = torch.tensor([1.0, 0.5, 2.0])[:, None, None]
    y = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * scales
    stats = objective.colour_statistics(mix_colours(y, COLOUR_MIX))
    assert list(stats) == ["luminance", "chroma 1", "chroma 2"]
    for c, (std, tv) in enumerate(stats.values()):
        steps = (y[:, c, :, 1:] - y[:, c, :, :-1]).abs().mean() + (y[:, c, 1:, :] - y[:, c, :-1, :]).abs().mean()
        assert (std, tv) == pytest.approx((y[:, c].std().item(), steps.item()), rel=1e-5)
    assert stats["chroma 2"][0] > stats["luminance"][0] > stats["chroma 1"][0]  # the scales chosen above
    with pytest.raises(UserError, match="3-channel"):
        objective.main(objective.parse_args(["--train_dir", mlp_run.train_dir, "--sigmas", "0", "--colour"]))


def test_pool_priors_are_the_prior_of_the_swapped_rows_that_replace_every_image(objective, fashion_root, in_tmp_cwd):
    """--pool K (a level for recons.py's --bn_prior_floor): set k's BN prior equals that of --swap_part's row
    with every image swapped for draw k of its class's never-trained pool (two paths to the same images); the
    sets differ from each other and from the truth; --pool without --bn_prior is refused."""
    # width 8: at width 4 this pretraining's backward corrupts the heap inside oneDNN on an AVX2 CPU (test_train.py)
    flags = ["--dataset", "fashion_mnist", "--data_root", fashion_root, "--model_name", "resnet18", "--width", 8,
             "--num_imgs_per_class", 1, "--bs", 5]
    train_dir = run(train, flags + ["--lr", 0.05, "--epochs", 2, "--pretrain_imgs", 2, "--pretrain_epochs", 1])
    training = load_training_run(train_dir, "cpu")
    subset = torch.load(os.path.join(train_dir, "train_subset.pth"))
    x_true, y_true = subset["images"], subset["labels"]
    values = objective.pool_bn_priors(training, x_true, y_true, 2, fashion_root)
    every = objective.swapped_rows(training, x_true, y_true, 0.0, 2, fashion_root)  # part >= 0: all swapped
    assert values == pytest.approx([objective.bn_prior_value(training, every[2 + k][1]) for k in range(2)], rel=1e-6)
    truth = objective.bn_prior_value(training, x_true)
    assert len({round(v, 4) for v in values + [truth]}) == 3
    with pytest.raises(UserError, match="add --bn_prior"):
        objective.main(objective.parse_args(["--train_dir", train_dir, "--pool", "2", "--data_root", str(fashion_root)]))
