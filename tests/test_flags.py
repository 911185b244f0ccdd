"""simudy/flags.py: --preset (named recipes for the dummies' optimisation) through parse_with_preset,
--schedule, and the shared flag groups."""
import argparse
import json
import math
import os

import pytest
import torch

import draw_pics
import metrics
import recons
from simudy.api import reconstruction_args
from simudy.flags import PRESETS, add_metrics_args, number_or_auto, parse_with_preset, preset_flags_off
from simudy.runs import AUTO
from tests.helpers import log_rows, reference_avg_ssim, run


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


def test_parse_with_preset_leaves_the_parsers_defaults_as_they_were():
    """One parser parsing twice: what the first parse gave or the preset set must not leak into the second."""
    parser = argparse.ArgumentParser()
    add_metrics_args(parser)
    first = parse_with_preset(parser, ["--preset", "fast", "--eval_step", "3"])
    assert (first.snapshot, first.eval_step) == (None, 3)
    again = parse_with_preset(parser, [])
    assert (again.preset, again.snapshot, again.eval_epoch, again.eval_step) == ("paper", None, 5, 12)
    assert parse_with_preset(parser, ["--preset", "fast"]).snapshot == "last"


def test_number_or_auto():
    parse = number_or_auto(float)
    assert parse("auto") == AUTO and parse("0.5") == 0.5
    with pytest.raises(ValueError):
        parse("fast")
    with pytest.raises(SystemExit):  # argparse names the type in its one-line message
        recons.parse_args(["--rlr", "fast"])


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
    result = run(metrics, common)
    assert result["snapshot"].endswith("0_5.pth")
    train_images = torch.load(os.path.join(mlp_run.train_dir, "train_subset.pth"))["images"]
    recons_x = torch.load(os.path.join(run_dir, "0_5.pth"))["x"]
    assert result["avg_ssim"] == pytest.approx(reference_avg_ssim(train_images, recons_x), abs=1e-6)
    saved = json.load(open(os.path.join(run_dir, "metrics", "0_5", "metrics.json")))
    assert saved["avg_ssim"] == result["avg_ssim"]


def test_resnet_preset_reaches_recons_and_metrics_alike():
    """--preset resnet: Adam lr 0.1, the box, the pyramid and the BN warm start in recons.py, and the same folder name in metrics.py (which
    has no --box, so takes only the preset's flags it has); explicit flags still win; the paper preset has
    every prior off."""
    rec = recons.parse_args(["--preset", "resnet"])
    assert (rec.rec_lr, rec.box, rec.schedule, rec.steps, rec.clip_epochs) == (0.1, True, "cosine", 0, 0)
    assert (rec.pyramid, rec.bn_prior, rec.bn_prior_until) == (3, 1e-3, 0.3)
    assert recons.parse_args(["--preset", "resnet", "--pyramid", "0", "--coarse", "16"]).pyramid == 0
    assert recons.parse_args(["--preset", "resnet", "--rec_lr", "0.03"]).rec_lr == 0.03
    met = metrics.parse_args(["--preset", "resnet"])
    assert met.rec_lr == 0.1 and met.snapshot == "last" and not hasattr(met, "box")
    paper = recons.parse_args([])
    assert (paper.bn_prior, paper.box, paper.signed_grad, paper.warmup, paper.restarts) == (0.0, False, False, 0, 1)
    assert (paper.decorrelate_colours, paper.chroma_tv) == (False, 0.0)


def test_resnet_preset_colour_flags_apply_to_simudy_on_colour_images_only():
    """--preset resnet's --decorrelate_colours and --chroma_tv 0.02: on in recons.py and the API; the
    decorrelation gives way to --coarse (RGB only) and to --no-decorrelate_colours; where the images are not
    3-channel (grey: D, the demo) or the method is a baseline, the preset's values are turned off and the
    caller told; an explicit other value is not (its own error follows)."""
    rec = recons.parse_args(["--preset", "resnet"])
    assert (rec.decorrelate_colours, rec.chroma_tv) == (True, 0.02)
    coarse = recons.parse_args(["--preset", "resnet", "--pyramid", "0", "--coarse", "16"])
    assert (coarse.decorrelate_colours, coarse.chroma_tv) == (False, 0.02)
    assert not recons.parse_args(["--preset", "resnet", "--no-decorrelate_colours"]).decorrelate_colours
    assert reconstruction_args(preset="resnet").decorrelate_colours
    assert not reconstruction_args(preset="resnet", coarse=16, pyramid=0).decorrelate_colours
    # --coarse 0 (its default) is no coarse stage: the preset's decorrelation stands
    assert recons.parse_args(["--preset", "resnet", "--coarse", "0"]).decorrelate_colours
    assert reconstruction_args(preset="resnet", coarse=0).decorrelate_colours
    # while a default that is a choice still counts: --eval_epoch 5 names the paper's snapshot under fast
    assert metrics.parse_args(["--preset", "fast", "--eval_epoch", "5"]).snapshot is None
    # where they apply, nothing changes
    assert preset_flags_off(rec, 3) == [] and preset_flags_off(rec, None) == []
    assert (rec.decorrelate_colours, rec.chroma_tv) == (True, 0.02)
    assert preset_flags_off(rec, 1) == ["decorrelate_colours", "chroma_tv"]
    assert (rec.decorrelate_colours, rec.chroma_tv) == (False, 0.0)
    baseline = recons.parse_args(["--preset", "resnet", "--method", "one_step"])
    assert preset_flags_off(baseline, None) == ["decorrelate_colours", "chroma_tv"]  # one note, before the data
    assert (baseline.decorrelate_colours, baseline.chroma_tv) == (False, 0.0)
    explicit = recons.parse_args(["--preset", "resnet", "--chroma_tv", "0.05"])
    assert preset_flags_off(explicit, 1) == ["decorrelate_colours"] and explicit.chroma_tv == 0.05
    paper = recons.parse_args(["--decorrelate_colours"])  # the paper preset has no colour flags to turn off
    assert preset_flags_off(paper, 1) == [] and paper.decorrelate_colours
