"""Unknown training hyper-parameters: the paper's selection of the simulation lr / batch size by short runs
(--rlr/--rbs auto in-process, grid_search.sh across processes), its summary table, and the submitit
launcher that runs grid_search.sh's candidates as a SLURM job array; and the unknown start: --restarts keeps
the start whose first main-run iterations reach the lowest loss."""
import csv
import dataclasses
import functools
import math
import os
import sys

import numpy as np
import torch

from .errors import UserError
from .loop import run_iterations
from .method import (cosine_distance, initial_dummies, simudy_iteration, simudy_log_fields, simudy_optimisers,
                     simudy_setup)
from .runs import AUTO, read_json, restart_log_path, write_csv, write_json
from .scoring import paper_avg_ssim
from .simulate import flat, sgd_config_from_training, simulate_training

GRID_SEARCH_STEPS = 50    # --grid_search 1 and --rlr/--rbs auto: one epoch of 50 steps
# The paper's lr sweep (grid_search.sh): 0.020 down to 0.001 in steps of 0.001.
PAPER_RLR_CANDIDATES = tuple(round(0.001 * k, 3) for k in range(20, 0, -1))


def short_run(setup, x, labels, rec_lr, iterations, log_path=None):
    """The paper's selection run (--grid_search 1, --rlr/--rbs auto): `iterations` SimuDy steps in one
    epoch from the given start, no snapshots. Returns the last loss (nan if it diverged)."""
    opt, sched = simudy_optimisers(x, rec_lr)
    one_epoch = dataclasses.replace(setup, steps_per_epoch=iterations)
    row, _ = run_iterations(functools.partial(simudy_iteration, one_epoch, x, labels, opt, sched), range(iterations),
                            log_path, stop_on_nonfinite=True, log_fields=simudy_log_fields(setup))
    return float("nan") if row is None else row["total"]


def best_start(start_run, iterate, seeds, iterations, log_dir, began):
    """--restarts K: the main run started from each seed (start_run(seed) -> that start, with .x, .labels and
    .log_fields) and run its first `iterations` iterations (iterate(start, i) -> log row), each start's log
    in log_dir (runs.restart_log_path). Returns the start whose loss is lowest then, to continue from
    iteration `iterations` on, its log's path, and rows of every start's seed and loss. The extra cost is
    (K - 1) x iterations iterations: the winner's are the run's own first ones. Every start's log seconds
    count from `began` (a time.time() value: when the run began, one clock for all)."""
    rows, best = [], None
    for seed in seeds:
        start = start_run(seed)
        log_path = restart_log_path(log_dir, seed)
        with open(log_path, "w", newline="") as f:
            csv.DictWriter(f, fieldnames=start.log_fields).writeheader()
        row, _ = run_iterations(functools.partial(iterate, start), range(iterations), log_path,
                                stop_on_nonfinite=True, log_fields=start.log_fields, began=began)
        loss = float("nan") if row is None else row["total"]
        rows.append({"seed": seed, "loss": loss})
        if math.isfinite(loss) and (best is None or loss < best[2]):
            best = (start, log_path, loss)
    if best is None:
        raise UserError("every restart's loss became nan or inf; lower --rec_lr or --rlr")
    print("restarts: " + ", ".join(f"seed {r['seed']} loss {r['loss']:.4f}" for r in rows)
          + f" after {iterations} iterations; continuing from the lowest")
    return best[0], best[1], rows


def search_candidates(rlr, rbs, tlr, bs, rlr_candidates, rbs_candidates):
    """(rlr, rbs) pairs to try: the candidates of each flag that is auto, the resolved value of the other."""
    if rlr == AUTO:
        rlrs = rlr_candidates or list(PAPER_RLR_CANDIDATES)
    else:
        rlrs = [rlr or tlr]
    if rbs == AUTO:
        rbss = rbs_candidates or sorted({max(1, bs // 2), bs, 2 * bs})
    else:
        rbss = [rbs or bs]
    if min(rlrs) <= 0 or min(rbss) < 1:
        raise UserError("--rlr_candidates must be positive and --rbs_candidates at least 1; fix the lists")
    return [(lr, b) for b in dict.fromkeys(rbss) for lr in dict.fromkeys(rlrs)]


def auto_search(run, args, candidates, num_dummy, rec_lr, device, train_images=None):
    """A short run per (rlr, rbs) from the same seeded start; returns rows sorted by final loss (best
    first), with each run's avg SSIM against the training images when those are given."""
    data = run.config["data"]
    rows = []
    for rlr, rbs in candidates:
        x, labels, _ = initial_dummies(num_dummy, data["image_shape"], data["num_classes"], args.seed, device)
        setup, _ = simudy_setup(run, rlr, rbs, args, x, labels)
        loss = short_run(setup, x, labels, rec_lr, GRID_SEARCH_STEPS)
        ssim = None if train_images is None else paper_avg_ssim(train_images, x.detach().cpu())
        rows.append({"rlr": rlr, "rbs": rbs, "final_loss": loss, "avg_ssim": ssim})
    rows = print_candidates(rows)
    if not math.isfinite(rows[0]["final_loss"]):
        raise UserError("every short run's loss became nan or inf; lower --rec_lr or try smaller --rlr_candidates")
    return rows


# --auto_criterion norm (issue 15, benchmarks/unknowns.py): a reconstruction this long at the candidates'
# middle lr, then the lr whose simulated change has the true change's norm.
NORM_MATCH_ITERATIONS = 200
NORM_NEEDS_TRUE_N = ("--auto_criterion norm (the fast and resnet presets' choice) needs the true number of images"
                     " (the change's norm grows with it); drop --num_dummy, or use --auto_criterion loss")


def simulated_change(run, x, labels, lr, bs, epochs, clip_norm=math.inf):
    """theta0 - theta_hat_final per parameter name of the training simulated on (x, labels) at (lr, bs),
    without a graph; with clip_norm, each simulated gradient longer than it rescaled to it."""
    sgd = sgd_config_from_training(run.config["args"], lr, clip_norm, clip_norm)
    batches = list(zip(x.detach().split(bs), labels.split(bs)))
    with torch.enable_grad():  # each simulated step differentiates the training loss w.r.t. the parameters
        _, change, _ = simulate_training(run.model, run.theta0, run.buffers, batches, epochs, sgd, create_graph=False)
    return {n: d.detach() for n, d in change.items()}


def change_agreement(run, x, labels, lr, bs, epochs):
    """(1 - cos, log of the norm ratio) of the simulated change at (lr, bs) against the true change."""
    change = flat(simulated_change(run, x, labels, lr, bs, epochs).values())
    true = run.weight_change
    return float(cosine_distance(change, true)), float(torch.log(change.norm() / true.norm()))


def lr_matching_norm(rows):
    """The lr at which the log norm ratio crosses 0, interpolated in log lr between the two candidates that
    bracket it (the ratio rises with lr); the nearer end of the candidates when none does. A candidate whose
    simulation diverged (ratio nan or inf) counts as infinitely long, so the bracket below it ends at the
    last finite candidate, which is returned."""
    line = [{**r, "log_norm_ratio": r["log_norm_ratio"] if math.isfinite(r["log_norm_ratio"]) else math.inf}
            for r in sorted(rows, key=lambda r: r["rlr"])]
    for a, b in zip(line, line[1:]):
        if a["log_norm_ratio"] <= 0 <= b["log_norm_ratio"]:
            if math.isinf(b["log_norm_ratio"]):
                return a["rlr"]
            t = -a["log_norm_ratio"] / max(1e-12, b["log_norm_ratio"] - a["log_norm_ratio"])
            return float(math.exp(math.log(a["rlr"]) + t * (math.log(b["rlr"]) - math.log(a["rlr"]))))
    return line[0]["rlr"] if line[0]["log_norm_ratio"] > 0 else line[-1]["rlr"]


def norm_search(run, args, candidates, num_dummy, device, train_images=None):
    """--auto_criterion norm: dummies reconstructed for a start (`norm_search_dummies`), then each candidate
    simulated once on them (`norm_choice`). Returns norm_choice's rows."""
    x, labels = norm_search_dummies(run, args, candidates, num_dummy, device, train_images)
    return norm_choice(run, x, labels, candidates)


def norm_search_dummies(run, args, candidates, num_dummy, device, train_images=None):
    """(x, labels): the dummies reconstructed for args.norm_iterations iterations (one cosine decay) at the
    candidates' geometric-middle lr and the training's batch size (or the middle candidate), from args.seed."""
    data, train_args = run.config["data"], run.config["args"]
    if num_dummy != data["num_images"]:
        raise UserError(NORM_NEEDS_TRUE_N)
    lrs, sizes = sorted({lr for lr, _ in candidates}), sorted({bs for _, bs in candidates})
    guess_lr = math.exp(sum(map(math.log, lrs)) / len(lrs))
    guess_bs = train_args["bs"] if train_args["bs"] in sizes else sizes[len(sizes) // 2]
    x, labels, _ = initial_dummies(num_dummy, data["image_shape"], data["num_classes"], args.seed, device)
    setup, _ = simudy_setup(run, guess_lr, guess_bs, args, x, labels)
    iterations = args.norm_iterations
    if iterations < 1:
        raise UserError(f"--norm_iterations {iterations} must be at least 1")
    setup = dataclasses.replace(setup, steps_per_epoch=iterations, clip_epochs=0)
    opt, sched = simudy_optimisers(x, args.rec_lr, "cosine", iterations)
    run_iterations(functools.partial(simudy_iteration, setup, x, labels, opt, sched), range(iterations),
                   stop_on_nonfinite=True)
    ssim = None if train_images is None else paper_avg_ssim(train_images, x.detach().cpu())
    print(f"\nnorm criterion: {iterations} iterations at rlr {guess_lr:.3g}, rbs {guess_bs}"
          + (f" (SSIM {ssim:.3f})" if ssim is not None else ""))
    return x.detach(), labels


def norm_choice(run, x, labels, candidates):
    """Each candidate (lr, bs) simulated once on the dummies over the training's epochs. Because 1 - cos
    ignores scale, the change's norm is what the lr sets: per batch size the lr at which the norm matches
    the true one (interpolated), and of those the (lr, bs) with the lowest 1 - cos. Returns the rows: the
    chosen first, the other batch sizes' picks, then every candidate (final_loss = 1 - cos)."""
    epochs = run.config["args"]["epochs"]
    rows = []
    for lr, bs in candidates:
        cos, ratio = change_agreement(run, x, labels, lr, bs, epochs)
        rows.append({"rlr": lr, "rbs": bs, "final_loss": cos, "log_norm_ratio": ratio})
    picks = []
    for bs in sorted({bs for _, bs in candidates}):
        lr = float(f"{lr_matching_norm([r for r in rows if r['rbs'] == bs]):.3g}")
        cos, ratio = change_agreement(run, x, labels, lr, bs, epochs)
        picks.append({"rlr": lr, "rbs": bs, "final_loss": cos, "log_norm_ratio": ratio})
    chosen = min(picks, key=lambda r: r["final_loss"] if math.isfinite(r["final_loss"]) else math.inf)
    print(f"{'rlr':>8} {'rbs':>5} {'1 - cos':>10} {'log norm ratio':>15}")
    for r in rows:
        print(f"{r['rlr']:>8g} {r['rbs']:>5d} {r['final_loss']:>10.5f} {r['log_norm_ratio']:>+15.3f}")
    print("norm-matched: " + ", ".join(f"rbs {p['rbs']} rlr {p['rlr']:g} (1 - cos {p['final_loss']:.5f})" for p in picks)
          + ("; lr/bs is what the change fixes, the batch size itself is barely visible in it" if len(picks) > 1 else ""))
    return [chosen] + [p for p in picks if p is not chosen] + rows


def plot_auto_search(rows, path):
    """Final loss vs rlr, a line per rbs; avg SSIM on a second axis (the paper's Fig. 2: loss tracks SSIM)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ssim_ax = ax.twinx() if any(r["avg_ssim"] is not None for r in rows) else None
    for rbs in sorted({r["rbs"] for r in rows}):
        line = sorted((r for r in rows if r["rbs"] == rbs), key=lambda r: r["rlr"])
        lrs = [r["rlr"] for r in line]
        drawn = ax.plot(lrs, [r["final_loss"] for r in line], marker="o", label=f"loss, rbs {rbs}")
        if ssim_ax:
            ssim_ax.plot(lrs, [r["avg_ssim"] for r in line], marker="x", linestyle="--",
                         color=drawn[0].get_color(), label=f"SSIM, rbs {rbs}")
    ax.set_xlabel("simulation lr (rlr)")
    ax.set_ylabel(f"final loss after {GRID_SEARCH_STEPS} steps")
    handles, names = ax.get_legend_handles_labels()
    if ssim_ax:
        ssim_ax.set_ylabel("avg SSIM (paper metric)")
        more = ssim_ax.get_legend_handles_labels()
        handles, names = handles + more[0], names + more[1]
    ax.legend(handles, names, fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def print_candidates(rows):
    """Sort the short runs' rows (rlr, rbs, final_loss[, avg_ssim]) by final loss, diverged last; print them
    as a table and return the sorted rows (the first is the paper's choice)."""
    rows = sorted(rows, key=lambda r: (not np.isfinite(r["final_loss"]), r["final_loss"]))
    with_ssim = any(r.get("avg_ssim") is not None for r in rows)
    print(f"\n{'rlr':>8} {'rbs':>5} {'final loss':>12}" + (f" {'avg SSIM':>9}" if with_ssim else ""))
    for r in rows:
        print(f"{r['rlr']:>8g} {r['rbs']:>5d} {r['final_loss']:>12.6f}"
              + (f" {r['avg_ssim']:>9.4f}" if with_ssim else ""))
    return rows


def summarise_grid_search(grid_dir, run_dirs):
    """Print the candidates sorted by final loss, write grid_search.csv/json, return the best row."""
    rows = []
    for d in run_dirs:
        result = read_json(os.path.join(d, "grid_result.json"), what="grid-search (recons.py --grid_search 1)")
        rows.append({"rlr": result["rlr"], "rbs": result["rbs"], "final_loss": result["final_loss"], "dir": d})
    rows = print_candidates(rows)
    best = rows[0]
    print(f"\nsuggested: --rlr {best['rlr']:g} --rbs {best['rbs']}  (lowest loss after the short runs)")
    os.makedirs(grid_dir, exist_ok=True)
    write_csv(os.path.join(grid_dir, "grid_search.csv"), rows, ["rlr", "rbs", "final_loss", "dir"])
    write_json(os.path.join(grid_dir, "grid_search.json"), {"best": best, "candidates": rows})
    return best


def submit_grid_search(job, argvs, folder, cluster=None, timeout_min=60, partition=None, gpus_per_job=0):
    """grid_search.sh's cluster path (LAUNCHER=submitit): job(argv) (recons.py's run_argv) per argv as a
    submitit job array (SLURM when available, cluster="local" runs them as local processes), then wait for all.
    Returns the argvs whose jobs failed; each failure is printed."""
    try:
        import submitit
    except ImportError:
        raise UserError("LAUNCHER=submitit needs submitit; pip install submitit, or drop LAUNCHER") from None
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster or None)
    params = {"timeout_min": timeout_min}
    if executor.cluster == "slurm":
        params.update({"slurm_partition": partition} if partition else {})
        params.update({"gpus_per_node": gpus_per_job} if gpus_per_job else {})
    executor.update_parameters(**params)
    jobs = executor.map_array(job, argvs)
    print(f"submitted {len(jobs)} {executor.cluster} jobs; logs in {folder}")
    failed = []
    for job, argv in zip(jobs, argvs):
        try:
            job.result()
        except Exception as err:  # a job's failure is reported, the others still count
            failed.append(argv)
            last = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            print(f"grid_search.sh: job {job.job_id} ({' '.join(argv[-8:])}) failed: {last}", file=sys.stderr)
    return failed
