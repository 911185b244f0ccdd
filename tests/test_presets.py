"""--preset (named recipes for the dummies' optimisation), --schedule and --max_minutes."""
import csv
import json
import math
import os

import pytest
import torch

import draw_pics
import metrics
import recons
from tests.test_pipeline import mlp_run, one_line_error, run  # noqa: F401  (mlp_run is a fixture)
from utils import PRESETS, UserError


def log_rows(run_dir):
    with open(os.path.join(run_dir, "log.csv")) as f:
        return list(csv.DictReader(f))


def test_preset_sets_defaults_and_explicit_flags_win():
    paper = recons.parse_args([])
    assert (paper.preset, paper.schedule, paper.rec_epochs, paper.rec_steps_per_epoch, paper.clip_epochs) == \
        ("paper", "paper", 20, 1500, 5)
    fast = recons.parse_args(["--preset", "fast"])
    for flag, value in PRESETS["fast"].items():
        if hasattr(fast, flag):
            assert getattr(fast, flag) == value, flag
    assert recons.parse_args(["--preset", "fast", "--rec_steps_per_epoch", "7"]).rec_steps_per_epoch == 7
    # metrics.py and draw_pics.py read the same preset: the fast one scores its last snapshot by default
    assert metrics.parse_args(["--preset", "fast"]).snapshot == "last"
    assert metrics.parse_args([]).snapshot is None
    assert draw_pics.parse_args(["--preset", "fast"]).snapshot == "last"
    # ... unless a snapshot is named with the paper's flags: those are not silently overridden
    named = metrics.parse_args(["--preset", "fast", "--eval_epoch", "2", "--eval_step", "1"])
    assert (named.snapshot, named.eval_epoch, named.eval_step) == (None, 2, 1)
    assert draw_pics.parse_args(["--preset=fast", "--eval_step=3"]).snapshot is None
    abbreviated = metrics.parse_args(["--preset", "fast", "--eval_ep", "4"])  # argparse accepts prefixes
    assert (abbreviated.snapshot, abbreviated.eval_epoch) == (None, 4)


def test_fast_preset_folder_schedule_and_scoring(mlp_run):
    flags, _ = mlp_run
    common = flags + ["--tlr", 0.05, "--preset", "fast"]
    run_dir = run(recons, common + ["--rec_epochs", 1, "--rec_steps_per_epoch", 6])
    assert run_dir.endswith("_fast")
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert config["args"]["preset"] == "fast" and config["args"]["schedule"] == "cosine"
    # the fast preset simulates the training's own epochs (mlp_run trained 1), and the folder says so
    assert config["args"]["steps"] == 1 and "_nsteps1_" in run_dir
    # one cosine decay over the run's 6 iterations: strictly falling from rec_lr towards 0
    lrs = [float(r["lr"]) for r in log_rows(run_dir)]
    assert len(lrs) == 6 and lrs[0] == pytest.approx(1e-2)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] == pytest.approx(0.5e-2 * (1 + math.cos(math.pi * 5 / 6)))
    # the paper's schedule, by contrast, is CosineAnnealingLR(T_max=100): nearly flat over 6 iterations
    paper_dir = run(recons, flags + ["--tlr", 0.05, "--rec_epochs", 1, "--rec_steps_per_epoch", 6, "--steps", 2])
    assert not paper_dir.endswith("_fast")
    assert float(log_rows(paper_dir)[-1]["lr"]) == pytest.approx(0.5e-2 * (1 + math.cos(math.pi * 5 / 100)))
    # metrics.py finds the fast run from the same flags and scores its last snapshot
    result = metrics.main(metrics.parse_args([str(a) for a in common]))
    assert result["snapshot"].endswith("0_5.pth")
    assert 0 <= result["avg_ssim"] <= 1


def test_simulating_the_trainings_epochs_makes_the_true_images_the_optimum(mlp_run):
    """Why the fast preset uses --steps 0: with the training's epochs the match loss at the true images is
    0 (the simulation replays the training exactly); with another count it is not, so the dummies can fit
    the direction better by moving away from the images, the drift benchmarks/README.md measured."""
    flags, train_dir = mlp_run  # trained for 1 epoch
    training = recons.load_training_run(train_dir, "cpu")
    subset = torch.load(os.path.join(train_dir, "train_subset.pth"))
    sgd = recons.sgd_config_from_training(training.config, 0.05)
    args = recons.parse_args([str(a) for a in flags + ["--tlr", 0.05, "--preset", "fast"]])

    def match_at_truth(epochs):
        _, match, _ = recons.reconstruction_loss(training.model, training.theta0, training.buffers,
                                                 subset["images"], subset["labels"], training.weight_change,
                                                 5, epochs, sgd, 0.0, "cos")
        return match.item()
    assert recons.resolve_steps(args) == 1
    assert match_at_truth(recons.resolve_steps(args)) < 1e-5
    assert match_at_truth(3) > 1e-3


def test_steps_0_without_a_training_run_is_a_one_line_error(mlp_run):
    flags, _ = mlp_run
    with pytest.raises(UserError) as e:
        metrics.main(metrics.parse_args([str(a) for a in flags + ["--tlr", 0.07, "--preset", "fast"]]))
    one_line_error(e, "--steps 0", "config.json", "--steps N")


def test_max_minutes_stops_with_a_snapshot_and_resumes(mlp_run):
    flags, _ = mlp_run
    common = flags + ["--tlr", 0.05, "--steps", 2, "--rec_epochs", 1, "--rec_steps_per_epoch", 4,
                      "--save_every", 0]
    full = run(recons, common + ["--recons_dir", "full"])
    # a deadline that has passed when the first iteration ends: one iteration, then a snapshot to score
    cut = run(recons, common + ["--recons_dir", "cut", "--max_minutes", 1e-9])
    assert len(log_rows(cut)) == 1 and os.path.isfile(os.path.join(cut, "0_0.pth"))
    assert torch.load(os.path.join(cut, "resume.pth"), weights_only=False)["iteration"] == 0
    run(recons, common + ["--recons_dir", "cut", "--resume"])
    assert torch.equal(torch.load(os.path.join(full, "0_3.pth"))["x"], torch.load(os.path.join(cut, "0_3.pth"))["x"])
    assert len(log_rows(cut)) == 4
