"""simudy/runs.py: the run folders the flags name (the same for every stage) and which snapshot
metrics.py / draw_pics.py read (--eval_epoch/--eval_step, --snapshot last or FILE, --linear)."""
import json
import os
from pathlib import Path

import pytest
import torch

import metrics
import recons
import train
from simudy.errors import UserError
from simudy.runs import (CKPT_ROOT, list_snapshots, recons_dir_from_args, recorded_train_dir, snapshot_path_from_args,
                         train_dir_from_args)
from tests.helpers import make_runs, one_line_error, run

TRAIN_NAME = "mlp_w16_fashion_mnist_num_img10_bsz5_lr0.05"  # mlp_run's, written out


def test_every_stage_finds_the_folders_the_flags_name(mlp_run):
    flags = mlp_run.flags + ["--tlr", 0.05, "--steps", 2]
    assert mlp_run.train_dir == os.path.join(CKPT_ROOT, "model_ckpt", TRAIN_NAME)
    assert train_dir_from_args(train.parse_args([str(a) for a in mlp_run.flags]), 0.05) == mlp_run.train_dir
    recons_dir = run(recons, flags + ["--rec_epochs", 1, "--rec_steps_per_epoch", 2, "--save_every", 1])
    assert recons_dir == os.path.join(CKPT_ROOT, "recover_x", f"{TRAIN_NAME}_nsteps2_rbs5_rlr0.05_reclr0.01")
    assert recons_dir_from_args(recons.parse_args([str(a) for a in flags])) == recons_dir
    assert json.load(open(os.path.join(recons_dir, "config.json")))["train_dir"] == mlp_run.train_dir
    args = metrics.parse_args([str(a) for a in flags + ["--snapshot", "last"]])
    assert snapshot_path_from_args(args) == (recons_dir, os.path.join(recons_dir, "0_1.pth"))
    assert list_snapshots(recons_dir) == ["0_0", "0_1"]


def test_snapshot_last_picks_newest(tmp_path):
    recons_dir = make_runs(tmp_path, n=3).recons_dir
    for name in ("0_0.pth", "10_100.pth", "2_1300.pth"):
        torch.save({"x": torch.zeros(1, 3, 32, 32)}, Path(recons_dir) / name)
    args = metrics.parse_args(["--recons_dir", recons_dir, "--snapshot", "last"])
    assert snapshot_path_from_args(args) == (recons_dir, os.path.join(recons_dir, "10_100.pth"))
    by_name = metrics.parse_args(["--recons_dir", recons_dir, "--snapshot", "2_1300"])  # a name as listed
    assert snapshot_path_from_args(by_name) == (recons_dir, os.path.join(recons_dir, "2_1300.pth"))
    assert metrics.main(args)["n_recons"] == 1
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(UserError, match="no snapshots in"):
        snapshot_path_from_args(metrics.parse_args(["--recons_dir", str(empty), "--snapshot", "last"]))


def test_paper_flags_and_snapshot_names(tmp_path):
    args = metrics.parse_args(["--model_name", "resnet", "--dataset", "cifar10", "--num_imgs_per_class", "2",
                               "--bs", "20", "--tlr", "0.01", "--rec_lambda_lr", "1e-6", "--resolution", "32",
                               "--eval_epoch", "3", "--eval_step", "7"])
    recons_dir, snapshot = snapshot_path_from_args(args)
    assert snapshot == os.path.join(recons_dir, "3_700.pth") and "nsteps8" in recons_dir
    args.linear = 1
    recons_dir, snapshot = snapshot_path_from_args(args)
    # the baselines' default --rec_lr is their paper code's 3e-4, resolved without the flag
    assert snapshot.endswith(os.path.join("_one_step_reclr0.0003", "x_700.pth"))
    args.linear = 2
    assert "_two_step_" in snapshot_path_from_args(args)[0]
    # --snapshot overrides both; its folder is the reconstruction run
    snap_file = str(tmp_path / "elsewhere" / "mine.pth")
    args = metrics.parse_args(["--snapshot", snap_file])
    assert snapshot_path_from_args(args) == (str(tmp_path / "elsewhere"), snap_file)
    assert metrics.metrics_dir_from_args(args) == str(tmp_path / "elsewhere" / "metrics" / "mine")


def test_steps_0_without_a_training_run_is_a_one_line_error(mlp_run):
    with pytest.raises(UserError) as e:  # no training run of lr 0.07: its epochs cannot be read
        run(metrics, mlp_run.flags + ["--tlr", 0.07, "--preset", "fast"])
    one_line_error(e, "--steps 0", "config.json", "--steps N")


def test_recorded_train_dir_is_found_from_any_working_directory(tmp_path, monkeypatch):
    start = tmp_path / "bench"
    (start / "ckpts" / "train_run").mkdir(parents=True)
    torch.save({"images": torch.zeros(1)}, start / "ckpts" / "train_run" / "train_subset.pth")
    (start / "rec").mkdir()
    relative = os.path.join(".", "ckpts", "train_run")
    monkeypatch.chdir(start)  # where recons.py ran: the path as recorded
    here = os.path.realpath(recorded_train_dir("rec", {"train_dir": relative, "cwd": str(start)}))
    monkeypatch.chdir(tmp_path)  # elsewhere: from the recorded cwd, or beside the run without one
    assert os.path.realpath(recorded_train_dir("bench/rec", {"train_dir": relative, "cwd": str(start)})) == here
    assert os.path.realpath(recorded_train_dir("bench/rec", {"train_dir": relative})) == here
    with pytest.raises(UserError, match="not found from here.*pass --train_dir"):
        recorded_train_dir("bench/rec", {"train_dir": "./ckpts/other"})
    with pytest.raises(UserError, match="names no train_dir"):
        recorded_train_dir("bench/rec", {})
