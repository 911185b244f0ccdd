"""simudy/loop.py, the outer loop shared by SimuDy and the baselines: a resumed run ends identical to an
uninterrupted one (after --max_iterations or --max_minutes), a nan loss stops with a one-line error naming
the last snapshot, run_iterations says how it ended, and a SIGTERM leaves a run that resumes identically."""
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import recons
import train
import simudy.method
from simudy.errors import UserError
from simudy.loop import LOG_FIELDS, NonFiniteLoss, run_iterations
from tests.conftest import REPO_ROOT
from tests.helpers import log_rows, log_without_seconds, one_line_error, run


def test_resume_ends_identical(fashion_root, in_tmp_cwd):
    flags = ["--dataset", "fashion_mnist", "--data_root", fashion_root, "--model_name", "mlp", "--width", 32,
             "--num_imgs_per_class", 1, "--bs", 4]
    run(train, flags + ["--lr", 0.05, "--epochs", 3])
    common = flags + ["--tlr", 0.05, "--steps", 2, "--rec_epochs", 2, "--rec_steps_per_epoch", 4,
                      "--save_every", 2, "--clip_epochs", 1]
    full = run(recons, common + ["--recons_dir", "full"])
    run(recons, common + ["--recons_dir", "split", "--max_iterations", 3])
    assert not os.path.isfile("split/1_3.pth")
    with pytest.raises(UserError) as excinfo:  # a second start must not overwrite silently
        run(recons, common + ["--recons_dir", "split"])
    one_line_error(excinfo, "--overwrite", "--resume")
    split = run(recons, common + ["--recons_dir", "split", "--resume"])
    a, b = torch.load(os.path.join(full, "1_3.pth")), torch.load(os.path.join(split, "1_3.pth"))
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["labels"], b["labels"])
    log_full, log_split = log_without_seconds(full), log_without_seconds(split)
    assert log_full == log_split and len(log_full) == 9  # same losses, no duplicated rows


# Resumed coarse and pyramid runs are bit-identical on this project's CPU (AMD EPYC); on the Intel Xeon host
# of the GPU machine (torch 2.11, 16 threads) a few pixels differed, by up to 7e-7 (coarse) and 1.3e-4
# (pyramid, where --box's clamp amplifies a last-bit difference): CPU kernels whose rounding differs between
# the two runs there. A wrong restore (z left at its start) moves pixels by 3.5e-2 and fails these bounds.
RESUME_RTOL, RESUME_ATOL = 1e-3, 1e-3


def test_coarse_run_resumes_across_the_switch_identical(mlp_run):
    """--coarse: a run cut inside the coarse stage and resumed ends as the uncut run; resuming it without
    --coarse is a one-line error naming the fix."""
    common = mlp_run.flags + ["--tlr", 0.05, "--steps", 2, "--rec_epochs", 1, "--rec_steps_per_epoch", 6,
                              "--save_every", 2, "--schedule", "cosine", "--coarse", 7, "--coarse_iters", 3]
    full = run(recons, common + ["--recons_dir", "full"])
    run(recons, common + ["--recons_dir", "split", "--max_iterations", 2])
    with pytest.raises(UserError) as excinfo:
        run(recons, [a for a in common if a not in ("--coarse", 7)] + ["--recons_dir", "split", "--resume"])
    one_line_error(excinfo, "does not fit these flags", "started with")
    split = run(recons, common + ["--recons_dir", "split", "--resume"])
    a, b = torch.load(os.path.join(full, "0_5.pth")), torch.load(os.path.join(split, "0_5.pth"))
    torch.testing.assert_close(a["x"], b["x"], rtol=RESUME_RTOL, atol=RESUME_ATOL)
    # bilinear upsampling is A z A^T with A 28x7: inside the stage every image has rank <= 7, after it more
    assert max(torch.linalg.matrix_rank(im[0]).item() for im in torch.load(os.path.join(full, "0_2.pth"))["x"]) <= 7
    assert min(torch.linalg.matrix_rank(im[0]).item() for im in a["x"]) > 7
    assert len(log_rows(full)) == len(log_rows(split)) == 6
    for row_full, row_split in zip(log_rows(full), log_rows(split)):
        assert float(row_split["total"]) == pytest.approx(float(row_full["total"]), rel=RESUME_RTOL)


def test_baseline_resume_ends_identical(mlp_run):
    common = mlp_run.flags + ["--tlr", 0.05, "--method", "two_step", "--baseline_steps", 4, "--save_every", 2,
                              "--rec_lambda_lr", 1e-2]  # duals that visibly move, so their resume is checked
    full = run(recons, common + ["--recons_dir", "full"])
    run(recons, common + ["--recons_dir", "split", "--max_iterations", 3])
    split = run(recons, common + ["--recons_dir", "split", "--resume"])
    a, b = torch.load(os.path.join(full, "x_3.pth")), torch.load(os.path.join(split, "x_3.pth"))
    assert torch.equal(a["x"], b["x"]) and all(torch.equal(a["duals"][k], b["duals"][k]) for k in a["duals"])
    assert not torch.equal(a["duals"]["theta0"], torch.load(os.path.join(full, "x_0.pth"))["duals"]["theta0"])
    log_full, log_split = log_without_seconds(full), log_without_seconds(split)
    assert log_full == log_split and len(log_full) == 5


def test_max_minutes_stops_with_a_snapshot_and_resumes(mlp_run):
    common = mlp_run.flags + ["--tlr", 0.05, "--steps", 2, "--rec_epochs", 1, "--rec_steps_per_epoch", 4,
                              "--save_every", 0]
    full = run(recons, common + ["--recons_dir", "full"])
    # a deadline that has passed when the first iteration ends: one iteration, then a snapshot to score
    cut = run(recons, common + ["--recons_dir", "cut", "--max_minutes", 1e-9])
    assert len(log_rows(cut)) == 1 and os.path.isfile(os.path.join(cut, "0_0.pth"))
    assert torch.load(os.path.join(cut, "resume.pth"), weights_only=False)["iteration"] == 0
    run(recons, common + ["--recons_dir", "cut", "--resume"])
    assert torch.equal(torch.load(os.path.join(full, "0_3.pth"))["x"], torch.load(os.path.join(cut, "0_3.pth"))["x"])
    assert len(log_rows(cut)) == 4


def test_pyramid_run_resumes_identical(mlp_run):
    """--pyramid: a run cut and resumed ends as the uncut run (every level is in the resume state)."""
    common = mlp_run.flags + ["--tlr", 0.05, "--steps", 2, "--rec_epochs", 1, "--rec_steps_per_epoch", 5,
                              "--save_every", 2, "--schedule", "cosine", "--pyramid", 3, "--box"]
    full = run(recons, common + ["--recons_dir", "full"])
    run(recons, common + ["--recons_dir", "split", "--max_iterations", 2])
    split = run(recons, common + ["--recons_dir", "split", "--resume"])
    a, b = torch.load(os.path.join(full, "0_4.pth")), torch.load(os.path.join(split, "0_4.pth"))
    torch.testing.assert_close(a["x"], b["x"], rtol=RESUME_RTOL, atol=RESUME_ATOL)
    assert sorted(k for k in torch.load(os.path.join(full, "resume.pth")) if k.startswith("level")) == \
        ["level0", "level1", "level2"]


def test_decorrelated_colours_run_resumes_identical_and_only_with_the_flag(cifar_cwd):
    """--decorrelate_colours on 3-channel images: a run cut and resumed ends as the uncut run; resuming it
    without the flag (levels in RGB) is a one-line error, not a silent reading of colour coordinates as RGB."""
    flags = ["--model_name", "mlp", "--width", 8, "--num_imgs_per_class", 1, "--bs", 5]
    run(train, flags + ["--lr", 0.05, "--epochs", 1])
    common = flags + ["--tlr", 0.05, "--steps", 1, "--rec_epochs", 1, "--rec_steps_per_epoch", 4, "--save_every", 2,
                      "--schedule", "cosine", "--pyramid", 2, "--box"]
    full = run(recons, common + ["--decorrelate_colours", "--recons_dir", "full"])
    run(recons, common + ["--decorrelate_colours", "--recons_dir", "split", "--max_iterations", 2])
    with pytest.raises(UserError) as e:
        run(recons, common + ["--recons_dir", "split", "--resume"])
    one_line_error(e, "does not fit these flags")
    split = run(recons, common + ["--decorrelate_colours", "--recons_dir", "split", "--resume"])
    a, b = torch.load(os.path.join(full, "0_3.pth")), torch.load(os.path.join(split, "0_3.pth"))
    torch.testing.assert_close(a["x"], b["x"], rtol=RESUME_RTOL, atol=RESUME_ATOL)
    assert not torch.allclose(a["x"], torch.load(os.path.join(full, "0_0.pth"))["x"])


def test_diverged_simulation_names_the_clip(mlp_run):
    """A simulated training that blows up on the dummies (here: a simulation lr of 1e30) is told apart from a
    too-large outer step: its error names the paper's clip; with the clip on, the error is the generic one."""
    base = mlp_run.flags + ["--tlr", 0.05, "--rlr", 1e30, "--rec_epochs", 2, "--rec_steps_per_epoch", 2]
    with pytest.raises(UserError) as e:
        run(recons, base + ["--clip_epochs", 0, "--recons_dir", "unclipped"])
    assert "diverged" in one_line_error(e, "nan", "epoch 0 step 0", "--clip_epochs 1")
    with pytest.raises(UserError) as e:
        run(recons, base + ["--clip_epochs", 1, "--recons_dir", "clipped"])
    assert "diverged" not in one_line_error(e, "epoch 0 step 0", "lower --rec_lr")


def test_nan_loss_stops_and_keeps_last_snapshot(mlp_run, monkeypatch):
    real = simudy.method.reconstruction_loss_and_grad
    calls = {"n": 0}

    def nan_after_three(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        return (out[0] * float("nan"),) + out[1:] if calls["n"] > 3 else out
    monkeypatch.setattr(simudy.method, "reconstruction_loss_and_grad", nan_after_three)
    with pytest.raises(UserError) as e:
        run(recons, mlp_run.flags + ["--tlr", 0.05, "--rec_epochs", 1, "--rec_steps_per_epoch", 10,
                                     "--save_every", 2])
    message = one_line_error(e, "nan", "epoch 0 step 3", "0_2.pth")
    assert "lower --rec_lr" in message
    recons_dir = message.split("snapshot is ")[1].split(";")[0].rsplit("/", 1)[0]
    assert sorted(f for f in os.listdir(recons_dir) if f.endswith(".pth") and f[0].isdigit()) == \
        ["0_0.pth", "0_2.pth"]


def _counting_iterate(losses):
    """iterate(i) for run_iterations: the i-th loss (NonFiniteLoss when it is not finite), and the calls made."""
    calls = []

    def iterate(i):
        calls.append(i)
        if not math.isfinite(losses[i]):
            raise NonFiniteLoss(f"the loss became {losses[i]} at step {i}")
        return {"epoch": 0, "step": i, "total": losses[i]}
    return iterate, calls


def test_run_iterations_says_how_it_ended(tmp_path):
    iterate, calls = _counting_iterate([3.0, 2.0, 1.0])
    (tmp_path / "log.csv").write_text(",".join(LOG_FIELDS) + "\n")  # open_run writes the header
    row, ended = run_iterations(iterate, range(3), tmp_path / "log.csv")
    assert (row["iteration"], row["total"], ended) == (2, 1.0, "completed") and calls == [0, 1, 2]
    assert [float(r["total"]) for r in log_rows(tmp_path)] == [3.0, 2.0, 1.0]
    # a deadline already past: the first iteration runs, then the loop ends
    iterate, calls = _counting_iterate([3.0, 2.0, 1.0])
    row, ended = run_iterations(iterate, range(3), deadline=time.time() - 1)
    assert (row["iteration"], ended) == (0, "deadline") and calls == [0]
    # a short run (stop_on_nonfinite) ends on a nan loss with a last row of total nan
    iterate, calls = _counting_iterate([3.0, float("nan"), 1.0])
    row, ended = run_iterations(iterate, range(3), stop_on_nonfinite=True)
    assert row["iteration"] == 1 and math.isnan(row["total"]) and ended == "completed" and calls == [0, 1]
    # otherwise a one-line error naming the last good snapshot save() returned
    iterate, _ = _counting_iterate([3.0, 2.0, float("inf")])
    with pytest.raises(UserError) as e:
        run_iterations(iterate, range(3), save=lambda i: f"snap_{i}.pth" if i == 1 else None)
    one_line_error(e, "inf", "step 2", "snap_1.pth")


def test_sigterm_saves_where_it_stopped_and_resumes_to_the_same_result(mlp_run):
    """A SIGTERM (SLURM preemption, `kill`) to a running recons.py: it finishes the iteration it is in, writes
    a snapshot and the resume state there (no snapshot was due: --save_every 0), exits 0; --resume then
    ends bit-identical to a run that was never stopped."""
    common = [str(f) for f in mlp_run.flags] + ["--tlr", "0.05", "--steps", "2", "--rec_epochs", "1", "--rec_steps_per_epoch", "300",
                      "--save_every", "0", "--clip_epochs", "0"]
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "recons.py"), *common, "--recons_dir", "stopped"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = os.path.join("stopped", "log.csv")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(log) and sum(1 for _ in open(log)) > 10:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped on SIGTERM after" in out
    saved = torch.load(os.path.join("stopped", "resume.pth"), weights_only=False)
    rows = open(log).read().splitlines()[1:]
    assert 10 <= saved["iteration"] < 299 and int(rows[-1].split(",")[0]) == saved["iteration"]
    assert os.path.isfile(os.path.join("stopped", f"0_{saved['iteration']}.pth"))

    resumed = run(recons, common + ["--recons_dir", "stopped", "--resume"])
    full = run(recons, common + ["--recons_dir", "full"])
    a, b = torch.load(os.path.join(full, "0_299.pth")), torch.load(os.path.join(resumed, "0_299.pth"))
    assert torch.equal(a["x"], b["x"])
    assert log_without_seconds(full) == log_without_seconds(resumed)
