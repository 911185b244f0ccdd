"""simudy/search.py and grid_search.sh, unknown training hyper-parameters: the candidates, --rlr/--rbs auto
(the paper's short-run selection in-process), the grid search's summary, and grid_search.sh sequential
(in test_pipeline.py, with the seed README), in parallel (JOBS, GPUS) and through submitit."""
import csv
import json
import math
import os
import sys

import pytest
import torch

import metrics
import recons
import simudy.search
import train
from simudy.errors import UserError
from simudy.runs import AUTO, write_json
from simudy.search import (GRID_SEARCH_STEPS, NORM_MATCH_ITERATIONS, PAPER_RLR_CANDIDATES, change_agreement,
                           lr_matching_norm, search_candidates, summarise_grid_search)
from simudy.target import load_training_run
from tests.helpers import reference_avg_ssim, run, run_script

TINY_RESNET = ["--width", "4", "--pretrain_imgs", "5", "--pretrain_epochs", "1"]


def test_search_candidates():
    both = search_candidates(AUTO, AUTO, 0.01, 20, None, None)
    assert both == [(lr, bs) for bs in (10, 20, 40) for lr in PAPER_RLR_CANDIDATES]
    assert PAPER_RLR_CANDIDATES[0] == 0.02 and PAPER_RLR_CANDIDATES[-1] == 0.001 and len(both) == 60
    assert search_candidates(AUTO, 0, 0.01, 20, [0.05, 0.01, 0.05], None) == [(0.05, 20), (0.01, 20)]
    assert search_candidates(0, AUTO, 0.01, 1, None, None) == [(0.01, 1), (0.01, 2)]  # bs // 2 = 0 dropped
    assert search_candidates(0.03, AUTO, 0.01, 5, None, [7]) == [(0.03, 7)]
    with pytest.raises(UserError, match="--rlr_candidates"):
        search_candidates(AUTO, 0, 0.01, 5, [0.0], None)


def test_rlr_auto_picks_lowest_short_run_loss(mlp_run, monkeypatch):
    flags = mlp_run.flags + ["--tlr", 0.05, "--steps", 2]
    scored = []  # (training images, dummies) of each short run the search scored, in candidate order
    real_avg_ssim = simudy.search.paper_avg_ssim

    def recording_avg_ssim(train_images, x, *args):
        scored.append((train_images.clone(), x.clone()))
        return real_avg_ssim(train_images, x, *args)
    monkeypatch.setattr(simudy.search, "paper_avg_ssim", recording_avg_ssim)
    recons_dir = run(recons, flags + ["--rlr", AUTO, "--rlr_candidates", 0.01, 0.05, "--rec_epochs", 1,
                                      "--rec_steps_per_epoch", 2])
    with open(os.path.join(recons_dir, "auto_search.csv")) as f:
        rows = list(csv.DictReader(f))
    assert sorted(float(r["rlr"]) for r in rows) == [0.01, 0.05] and {r["rbs"] for r in rows} == {"5"}
    best = min(rows, key=lambda r: float(r["final_loss"]))
    # train_subset.pth is there: each short run's SSIM too, the paper's number on the dummies it ended at
    subset_images = torch.load(os.path.join(mlp_run.train_dir, "train_subset.pth"))["images"]
    assert len(scored) == 2
    for (train_images, x), rlr in zip(scored, (0.01, 0.05)):
        assert torch.equal(train_images, subset_images)
        row = next(r for r in rows if float(r["rlr"]) == rlr)
        assert float(row["avg_ssim"]) == pytest.approx(reference_avg_ssim(train_images, x), abs=1e-6)
    assert not torch.equal(scored[0][1], scored[1][1])  # two lrs, two different ends
    assert recons_dir.endswith(f"_rbs5_rlr{float(best['rlr'])}_reclr0.01")
    assert os.path.getsize(os.path.join(recons_dir, "auto_search.png")) > 0
    config = json.load(open(os.path.join(recons_dir, "config.json")))
    assert config["rlr"] == float(best["rlr"]) and config["auto_search"]["chosen"]["rlr"] == float(best["rlr"])
    assert len(config["auto_search"]["candidates"]) == 2 and config["auto_search"]["steps"] == GRID_SEARCH_STEPS
    assert os.path.isfile(os.path.join(recons_dir, "0_1.pth"))  # then the full (here 1 x 2) run

    # the search's short run is --grid_search 1's: same start, same final loss
    other = next(r for r in rows if r is not best)
    grid_dir = run(recons, flags + ["--rlr", other["rlr"], "--grid_search", 1])
    grid = json.load(open(os.path.join(grid_dir, "grid_result.json")))
    assert grid["final_loss"] == pytest.approx(float(other["final_loss"]), rel=1e-6)
    assert grid["iterations"] == GRID_SEARCH_STEPS
    # metrics finds the run from the chosen value; 'auto' names no folder
    assert run(metrics, flags + ["--rlr", best["rlr"], "--snapshot", "last"])["n_train"] == 10
    with pytest.raises(UserError, match="--rlr auto names no run folder"):
        run(metrics, flags + ["--rlr", AUTO, "--snapshot", "last"])


def test_summarise_grid_search_sorts_by_loss_diverged_last(tmp_path, capsys):
    results = [(0.02, 10, float("nan")), (0.01, 10, 0.25), (0.03, 20, 0.125), (0.005, 20, 0.5)]
    dirs = []
    for rlr, rbs, loss in results:
        d = tmp_path / f"rlr{rlr}_rbs{rbs}"
        d.mkdir()
        write_json(str(d / "grid_result.json"), {"rlr": rlr, "rbs": rbs, "final_loss": loss, "iterations": 50})
        dirs.append(str(d))
    best = summarise_grid_search(str(tmp_path / "summary"), dirs)
    assert (best["rlr"], best["rbs"], best["final_loss"]) == (0.03, 20, 0.125)
    assert "suggested: --rlr 0.03 --rbs 20" in capsys.readouterr().out
    with open(tmp_path / "summary" / "grid_search.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(r["rlr"]) for r in table] == [0.03, 0.01, 0.005, 0.02]  # by loss, the nan one last
    assert [r["dir"] for r in table] == [dirs[2], dirs[1], dirs[3], dirs[0]]
    saved = json.load(open(tmp_path / "summary" / "grid_search.json"))
    assert saved["best"]["dir"] == dirs[2] and len(saved["candidates"]) == 4


def grid_env(lrs, **extra):
    """grid_search.sh's environment: this Python, lrs at batch size 10, the flags of a 1-image-per-class
    tiny ResNet run on the CPU."""
    return dict(os.environ, PYTHON=sys.executable, LR_LIST=lrs, BS_LIST="10", **extra,
                ARGS="--num_imgs_per_class 1 --tlr 1e-2 --bs 10 --steps 1 --rec_lr 1e-2 --width 4 --device cpu")


@pytest.mark.parametrize("parallel", [{"JOBS": "2"}, {"GPUS": "0,1"}])
def test_grid_search_in_parallel(cifar_cwd, parallel):
    """JOBS=2 splits the cores between two workers; GPUS=0,1 gives each worker one device through
    CUDA_VISIBLE_DEVICES (recorded in each run's config.json). Same table as a sequential sweep."""
    run(train, ["--num_imgs_per_class", 1, "--bs", 10, "--lr", 1e-2] + TINY_RESNET)
    env = grid_env("0.02 0.03 0.01", **parallel)
    if "JOBS" in parallel:
        env.pop("OMP_NUM_THREADS", None)  # grid_search.sh gives each worker its share of the cores
    proc = run_script("grid_search.sh", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "3 short runs, 2 at a time" in proc.stdout
    configs = {lr: json.load(open(f"ckpts/grid_search/rlr{lr}_rbs10/config.json")) for lr in ("0.02", "0.03", "0.01")}
    assert all(os.path.isfile(f"ckpts/grid_search/rlr{lr}_rbs10.log") for lr in configs)
    if "GPUS" in parallel:  # worker 0 takes candidates 0 and 2, worker 1 candidate 1
        assert [configs[lr]["cuda_visible_devices"] for lr in ("0.02", "0.03", "0.01")] == ["0", "1", "0"]
    else:
        assert all(c["cpu_threads"] == max(1, len(os.sched_getaffinity(0)) // 2) for c in configs.values())
    table = json.load(open("ckpts/grid_search/grid_search.json"))["candidates"]
    assert len(table) == 3 and table[0]["final_loss"] == min(c["final_loss"] for c in table)


def test_grid_search_through_submitit_local(cifar_cwd):
    """LAUNCHER=submitit in submitit's local mode (the SLURM path's stand-in): one job per candidate, the
    same table; a failing candidate is reported and makes the sweep exit 1."""
    pytest.importorskip("submitit")
    run(train, ["--num_imgs_per_class", 1, "--bs", 10, "--lr", 1e-2] + TINY_RESNET)
    env = grid_env("0.02 0.01", LAUNCHER="submitit", SUBMITIT_CLUSTER="local")
    proc = run_script("grid_search.sh", env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "submitted 2 local jobs" in proc.stdout
    table = json.load(open("ckpts/grid_search/grid_search.json"))["candidates"]
    assert sorted(c["rlr"] for c in table) == [0.01, 0.02]
    assert os.path.isdir("ckpts/grid_search/submitit")
    # flags naming no training run (another width): every job fails, the sweep says so and exits 1
    env["ARGS"] = env["ARGS"].replace("--width 4", "--width 8")
    proc = run_script("grid_search.sh", env=env)
    assert proc.returncode == 1 and "failed" in proc.stderr


def test_auto_lr_and_ranking_with_the_resnet_options(cifar_cwd):
    """--rlr auto and the unknown-N ranking keep working with the ResNet options on (BN prior, box, signed
    gradients, warm-up and step decays, the pyramid): the choice is the lowest short-run loss, each short run's SSIM is
    recorded, and the M dummies are ranked by descending total-gradient norm."""
    run(train, ["--num_imgs_per_class", 1, "--bs", 10, "--lr", 1e-2] + TINY_RESNET)
    options = ["--bn_prior", 0.01, "--box", "--signed_grad", "--schedule", "step", "--warmup", 2, "--rec_lr", 0.05,
               "--pyramid", 2]
    recons_dir = run(recons, ["--num_imgs_per_class", 1, "--bs", 10, "--tlr", 1e-2, "--width", 4, "--steps", 2,
                              "--rlr", "auto", "--rlr_candidates", 0.02, 0.005, "--num_dummy", 14,
                              "--rec_epochs", 1, "--rec_steps_per_epoch", 4, "--save_every", 2] + options)
    with open(os.path.join(recons_dir, "auto_search.csv")) as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["final_loss"]) for r in rows]
    assert len(rows) == 2 and losses == sorted(losses) and all(0 <= float(r["avg_ssim"]) <= 1 for r in rows)
    config = json.load(open(os.path.join(recons_dir, "config.json")))
    assert config["rlr"] == float(rows[0]["rlr"])
    with open(os.path.join(recons_dir, "ranking.csv")) as f:
        ranking = list(csv.DictReader(f))
    norms = [float(r["grad_norm"]) for r in ranking]
    assert len(ranking) == 14 and norms == sorted(norms, reverse=True) and norms[-1] > 0
    with open(os.path.join(recons_dir, "log.csv")) as f:
        log = list(csv.DictReader(f))
    assert len(log) == 4 and all(float(r["bn"]) > 0 for r in log)
    snap = torch.load(os.path.join(recons_dir, "0_3.pth"))
    low, high = (0 - 0.4914) / 0.2023, (1 - 0.4465) / 0.2010  # the box's widest channel bounds
    assert snap["x"].min() >= low - 1e-6 and snap["x"].max() <= high + 1e-6


def test_grid_search_short_run_logs_the_priors(cifar_cwd):
    """--grid_search 1 with --preset resnet (its BN prior) and --chroma_tv: the short run's log.csv has both
    priors' columns, with their values, as the main run's has (it used to stop on the unexpected column)."""
    run(train, ["--num_imgs_per_class", 1, "--bs", 10, "--lr", 1e-2] + TINY_RESNET)
    recons_dir = run(recons, ["--num_imgs_per_class", 1, "--bs", 10, "--tlr", 1e-2, "--width", 4, "--steps", 1,
                              "--preset", "resnet", "--chroma_tv", 0.1, "--grid_search", 1, "--max_iterations", 2])
    with open(os.path.join(recons_dir, "log.csv")) as f:
        log = list(csv.DictReader(f))
    assert len(log) == 2 and all(float(r["bn"]) > 0 and float(r["chroma_tv"]) > 0 for r in log)
    assert float(log[0]["total"]) > float(log[0]["cos"]) + 0.1 * float(log[0]["chroma_tv"])


def test_restarts_continue_the_lowest_loss_start_of_the_main_run(mlp_run):
    """Two paths to one run: --restarts 3 runs the main run (here with a pyramid and one cosine decay) from
    seeds 0, 1, 2 for 3 iterations and goes on from the lowest loss; the plain run with that seed gives the
    same log and the same images at the end. --restarts 1 is the plain run."""
    common = mlp_run.flags + ["--tlr", 0.05, "--steps", 1, "--rec_epochs", 2, "--rec_steps_per_epoch", 4,
                              "--save_every", 2, "--pyramid", 2, "--schedule", "cosine"]
    restarted = run(recons, common + ["--restarts", 3, "--restart_iterations", 3, "--recons_dir", "restarts"])
    record = json.load(open(os.path.join(restarted, "config.json")))["restarts"]
    assert [s["seed"] for s in record["starts"]] == [0, 1, 2] and len({s["loss"] for s in record["starts"]}) == 3
    best = min(record["starts"], key=lambda s: s["loss"])
    assert record["chosen_seed"] == best["seed"]
    plain = run(recons, common + ["--seed", best["seed"], "--recons_dir", "plain"])
    with open(os.path.join(restarted, "log.csv")) as f, open(os.path.join(plain, "log.csv")) as g:
        logged, plain_log = list(csv.DictReader(f)), list(csv.DictReader(g))
    assert [r["iteration"] for r in logged] == [str(i) for i in range(8)]
    assert float(logged[2]["total"]) == pytest.approx(best["loss"], rel=1e-6)  # the winner's own first rows
    assert [float(r["total"]) for r in logged] == pytest.approx([float(r["total"]) for r in plain_log], rel=1e-5)
    for seed in (0, 1, 2):  # every start's log is kept beside the run's
        assert os.path.isfile(os.path.join(restarted, f"restart_seed{seed}.csv"))
    torch.testing.assert_close(torch.load(os.path.join(restarted, "1_3.pth"))["x"],
                               torch.load(os.path.join(plain, "1_3.pth"))["x"], rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.load(os.path.join(restarted, "labels.pth")), torch.load(os.path.join(plain, "labels.pth")))
    stopped = common + ["--restarts", 3, "--restart_iterations", 3, "--recons_dir", "stopped"]
    run(recons, stopped + ["--max_iterations", 3])  # stopped right after the restarts, then resumed
    resumed = run(recons, stopped + ["--resume"])
    torch.testing.assert_close(torch.load(os.path.join(resumed, "1_3.pth"))["x"],
                               torch.load(os.path.join(plain, "1_3.pth"))["x"], rtol=1e-5, atol=1e-6)
    one = run(recons, common + ["--restarts", 1, "--recons_dir", "one"])
    assert torch.equal(torch.load(os.path.join(one, "1_3.pth"))["x"], torch.load(os.path.join(plain if best["seed"] == 0
                       else run(recons, common + ["--recons_dir", "none"]), "1_3.pth"))["x"])


@pytest.mark.parametrize("flags", [["--restarts", 0], ["--restarts", 2, "--restart_iterations", 8],
                                   ["--restarts", 2, "--grid_search", 1]])
def test_restarts_that_cannot_work_fail_in_one_line_before_training_is_read(flags):
    with pytest.raises(UserError, match="restarts"):
        recons.check_args(recons.parse_args(["--rec_epochs", "2", "--rec_steps_per_epoch", "4"] + [str(f) for f in flags]))


def test_lr_matching_norm_interpolates_where_the_ratio_crosses_zero():
    """Two paths to the same lr: a ratio that is exactly log(lr / 0.007) gives back 0.007 by the log-log
    interpolation; a ratio that never crosses 0 gives the nearer end of the candidates."""
    lrs = [0.001, 0.002, 0.005, 0.01, 0.02]
    rows = [{"rlr": lr, "log_norm_ratio": math.log(lr / 0.007)} for lr in lrs]
    assert lr_matching_norm(rows) == pytest.approx(0.007, rel=1e-9)
    assert lr_matching_norm([{"rlr": lr, "log_norm_ratio": math.log(lr / 0.1)} for lr in lrs]) == 0.02
    assert lr_matching_norm([{"rlr": lr, "log_norm_ratio": math.log(lr / 1e-4)} for lr in lrs]) == 0.001


def test_lr_matching_norm_treats_a_diverged_candidate_as_too_long():
    """A candidate whose simulated training diverged (nan, as ResNet D's at lr 0.02 on dummies 600 iterations
    in) is an infinitely long change: below the true norm up to 0.01, the match is 0.01, the last finite
    candidate, not the grid's end; the same with inf; all diverged gives the smallest candidate."""
    rows = [{"rlr": lr, "log_norm_ratio": r} for lr, r in ((0.005, -0.3), (0.01, -0.065), (0.02, math.nan),
                                                           (0.05, math.nan))]
    assert lr_matching_norm(rows) == 0.01
    assert lr_matching_norm([{**r, "log_norm_ratio": math.inf} if r["rlr"] > 0.01 else r for r in rows]) == 0.01
    assert lr_matching_norm([{**r, "log_norm_ratio": math.nan} for r in rows]) == 0.005


def test_change_agreement_at_the_true_images(mlp_run):
    """The objective check behind --auto_criterion norm: at the true images and the true (lr, bs) the simulated
    change is the true one (1 - cos ~ 0, norm ratio 1); twice the lr about doubles the norm (the training is
    near-linear) and turns the direction a little; twice the lr with twice the batch (the same lr/bs) gives a
    change much nearer the true norm than twice the lr alone."""
    train_run = load_training_run(mlp_run.train_dir, "cpu")
    subset = torch.load(os.path.join(mlp_run.train_dir, "train_subset.pth"))
    x, labels = subset["images"], subset["labels"]
    cos, ratio = change_agreement(train_run, x, labels, 0.05, 5, 1)
    assert abs(cos) < 1e-5 and abs(ratio) < 1e-5
    cos_2lr, ratio_2lr = change_agreement(train_run, x, labels, 0.1, 5, 1)
    assert ratio_2lr == pytest.approx(math.log(2), abs=0.1) and 1e-3 < cos_2lr < 0.2
    cos, ratio = change_agreement(train_run, x, labels, 0.1, 10, 1)  # one batch of 10 at lr x 2: same lr/bs
    assert abs(ratio) < ratio_2lr / 3


def test_rlr_auto_norm_criterion(mlp_run):
    """--auto_criterion norm: 200 iterations (--norm_iterations) at the candidates' middle lr, then the lr whose
    change has the true norm, interpolated between the candidates; recorded in auto_search.csv and config.json;
    --num_dummy and --norm_iterations 0 are refused before any work (the norm grows with the number of images)."""
    flags = mlp_run.flags + ["--tlr", 0.05, "--steps", 1, "--rlr", AUTO, "--auto_criterion", "norm",
                             "--rlr_candidates", 0.01, 0.03, 0.1, 0.3]
    with pytest.raises(UserError, match="needs the true number of images"):
        run(recons, flags + ["--num_dummy", 12])
    with pytest.raises(UserError, match="--norm_iterations 0 must be at least 1"):
        run(recons, flags + ["--norm_iterations", 0])
    recons_dir = run(recons, flags + ["--rec_epochs", 1, "--rec_steps_per_epoch", 2])
    with open(os.path.join(recons_dir, "auto_search.csv")) as f:
        rows = list(csv.DictReader(f))
    chosen = float(rows[0]["rlr"])
    candidates = {float(r["rlr"]): float(r["log_norm_ratio"]) for r in rows[1:]}
    assert sorted(candidates) == [0.01, 0.03, 0.1, 0.3]
    below = max(lr for lr, ratio in candidates.items() if ratio <= 0)  # the bracket the interpolation used
    above = min(lr for lr, ratio in candidates.items() if ratio >= 0)
    assert below <= chosen <= above and 0.02 < chosen < 0.12  # the true lr is 0.05
    config = json.load(open(os.path.join(recons_dir, "config.json")))
    assert config["auto_search"]["criterion"] == "norm" and config["rlr"] == chosen
    assert config["auto_search"]["steps"] == NORM_MATCH_ITERATIONS
