"""Issue 15: how well the paper's answers to unknown training hyper-parameters work on images no one tuned
on, and what works better. Three parts, each resumable per row (results/unknowns.json):

  truth     At the TRUE images and labels, every candidate (lr, bs) simulated once: the match loss 1 - cos
            and the norm ratio ||theta0 - theta_hat|| / ||theta0 - theta_final||. This is the objective check:
            a criterion can only pick the true lr if it separates the candidates at the truth.
  select    Per true (lr, bs): the paper's selection (the lowest loss after 50 steps from noise, its
            recipe: 8 simulated epochs; lr with bs known, bs with lr known), and the norm match: a short
            fast-recipe reconstruction at a middle guess, then the candidate lr whose simulated change on
            those dummies has the true change's norm, for each candidate bs; bs by the lowest 1 - cos there.
  rank      Unknown N: true N 10, 20, 40, M = 2N dummies; the precision of the top-N by the paper's total-
            gradient norm (last snapshot), by the norm summed over the snapshots, and by the norm with
            near-duplicates skipped; and the SSIM each keeps against the SSIM of all M. Each row also keeps
            every training image's loss at theta0 and its matched dummy's SSIM, norm and rank, and the share
            of the recognisable dummies (SSIM >= 0.3) that each top N holds.

    python benchmarks/unknowns.py                           # every part on configs A, C20 (and D: truth)
    python benchmarks/unknowns.py --parts truth --configs D
    python benchmarks/unknowns.py --table                    # print the tables of the rows so far

Images: Fashion-MNIST from index 30,000 (--offset) and CIFAR-10's test split (a folder whose train/ links
to the shared test images), neither used to develop or tune this tool. A: MLP-1000-1000 on Fashion-MNIST;
C20: the same MLP on 20 CIFAR-10 images; D: ResNet-18 width 16 on Fashion-MNIST (theta0 pretrained on
other images); D2ep: D with theta0 pretrained for 2 epochs instead of 15. 2 images per class, 20 epochs of
training.
"""
import argparse
import fcntl
import json
import math
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from simudy.api import reconstruct_from_args, reconstruction_args  # noqa: E402
from simudy.flags import pick_device  # noqa: E402
from simudy.method import initial_dummies, rank_dummies, simudy_setup  # noqa: E402
from simudy.runs import RANKING, TRAIN_SUBSET, list_snapshots, resolve_rec_lr, train_run_name  # noqa: E402
from simudy.scoring import match_by_ssim, paper_avg_ssim, ssim_matrix  # noqa: E402
from simudy.search import (NORM_MATCH_ITERATIONS, change_agreement, lr_matching_norm, norm_choice,  # noqa: E402
                           norm_search_dummies, short_run)
from simudy.target import load_training_run, loss_per_image  # noqa: E402

RUNS = os.path.join(ROOT, "benchmarks", "runs", "unknowns")
RESULTS = os.path.join(ROOT, "benchmarks", "results", "unknowns.json")
CIFAR_TEST = os.path.join(os.path.dirname(ROOT), "shared", "datasets", "cifar10-jpg", "test")
FMNIST_OFFSET = 30000

CONFIGS = {  # name -> train.py/recons.py data and model flags (the subset size comes from --num_imgs_per_class)
    "A": ["--dataset", "fashion_mnist", "--model_name", "mlp", "--offset", str(FMNIST_OFFSET)],
    "C20": ["--dataset", "folder", "--data_root", os.path.join(RUNS, "cifar10-test"), "--model_name", "mlp"],
    "D": ["--dataset", "fashion_mnist", "--model_name", "resnet18", "--width", "16", "--offset", str(FMNIST_OFFSET)],
}
# D with a weaker theta0 (2 pretraining epochs, not 15): theta0 already fits fewer of the training images, so
# more of them leave a part in theta0 - theta_final (session 24, README "Which images come back")
CONFIGS["D2ep"] = CONFIGS["D"] + ["--pretrain_epochs", "2"]
# the preset a user runs on each (the norm criterion's 200 iterations follow it): on ResNet D the fast
# preset's Adam lr 0.01 leaves the dummies at noise (SSIM 0.008), whose norm is 5x the images'
PRESET = {"A": "fast", "C20": "fast", "D": "resnet"}
PRESET["D2ep"] = PRESET["D"]
TRUE_LRS = (2e-3, 5e-3, 1e-2, 2e-2)
TRUE_BS = (10, 20)
CANDIDATE_LRS = (1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2)  # a log grid: every true lr is inside it
CANDIDATE_BS = (5, 10, 20)
NORM_MATCH = "200 fast-recipe iterations at the grid's middle lr, then the norm-matched lr"
RANK_NS = (10, 20, 40)
RANK_ITERS = 100  # the fast recipe's steps per epoch (x4 epochs) in the rank part
# the rank part's recipe beyond its preset (default: the training's epochs simulated); on ResNet D that of
# `make demo-resnet` (--steps 8: 2x the iterations per second, session 18) with the paper's clip in every
# outer epoch: from noise M = 2N dummies diverge (nan) without it, and with it in the first epoch only
# soon after it ends (session 23: N 10 at iteration 321, N 20 at 615)
RANK_RECIPE = {"D": {"steps": 8, "clip_epochs": 4}}
RANK_RECIPE["D2ep"] = RANK_RECIPE["D"]
RECOVERED_SSIM = 0.3  # a matched dummy counts as recovered (recognisable) at this SSIM to its training image
FITTED_LOSS = 0.05  # a training image with a loss at theta0 below this: one theta0 already classified


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["A", "C20"], choices=list(CONFIGS))
    p.add_argument("--parts", nargs="+", default=["truth", "select", "norm", "rank"], choices=["truth", "select", "norm", "rank"])
    p.add_argument("--true_lrs", nargs="+", type=float, default=list(TRUE_LRS))
    p.add_argument("--true_bs", nargs="+", type=int, default=list(TRUE_BS))
    p.add_argument("--rank_ns", nargs="+", type=int, default=list(RANK_NS), help="true N of the rank part")
    p.add_argument("--rank_iters", type=int, default=RANK_ITERS, help="the rank part recipe's steps per epoch (x4 epochs)")
    p.add_argument("--rank_clip_epochs", type=int, default=None,
                   help="outer epochs with the paper's clip in the rank part (default: its recipe's; on D the"
                        " dummies' simulation diverges once a 1-epoch clip ends)")
    p.add_argument("--norm_iters", type=int, default=NORM_MATCH_ITERATIONS,
                   help="the norm part's reconstruction before the norm match (--norm_iterations); rows of another"
                        " length get their own keys")
    p.add_argument("--redo", action="store_true",
                   help="recompute the rank and norm rows asked for even if results/unknowns.json has them (a"
                        " reconstruction still in benchmarks/runs/unknowns is reused)")
    p.add_argument("--table", action="store_true", help="print the tables of results/unknowns.json and exit")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Training runs and results


def train(config, lr, bs, per_class=2):
    """The training run's folder (trained once, then reused), or None when train.py refused (a training that
    diverges, as ResNet D at lr 0.02 does, is skipped, and said so)."""
    flags = CONFIGS[config]
    folder = os.path.join(RUNS, config)  # one folder per config: train.py's run name does not say the pretraining
    os.makedirs(folder, exist_ok=True)
    model = flags[flags.index("--model_name") + 1]
    width = int(flags[flags.index("--width") + 1]) if "--width" in flags else None
    dataset = flags[flags.index("--dataset") + 1]
    name = train_run_name(model, width, dataset, 10 * per_class, bs, lr)
    train_dir = os.path.join(folder, "ckpts", "model_ckpt", name)
    if not os.path.isfile(os.path.join(train_dir, "theta_final.pth")):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *flags, "--num_imgs_per_class",
                                str(per_class), "--bs", str(bs), "--lr", str(lr), "--overwrite"], cwd=folder)
        if result.returncode:
            print(f"skipped {config} lr {lr:g} bs {bs}: train.py failed (above)")
            return None
    return train_dir


def load_results():
    return json.load(open(RESULTS)) if os.path.isfile(RESULTS) else []


def save_row(row):
    """Add (or replace) one row; a lock keeps two benchmark processes from losing each other's rows."""
    with open(RESULTS + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = [r for r in load_results() if r["key"] != row["key"]] + [row]
        with open(RESULTS + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(RESULTS + ".tmp", RESULTS)


def done(key):
    return any(r["key"] == key for r in load_results())


def true_subset(train_dir):
    subset = torch.load(os.path.join(train_dir, TRAIN_SUBSET), weights_only=False)
    return subset["images"], subset["labels"]


# ----------------------------------------------------------------------------------------------
# The criteria


def candidate_table(run, x, labels, epochs):
    """For every candidate (lr, bs): 1 - cos and log of the norm ratio of the simulated change on x."""
    rows = []
    for bs in CANDIDATE_BS:
        for lr in CANDIDATE_LRS:
            cos, ratio = change_agreement(run, x, labels, lr, bs, epochs)
            rows.append({"rlr": lr, "rbs": bs, "one_minus_cos": cos, "log_norm_ratio": ratio})
    return rows


def lowest_cos(table):
    """(lr, bs) of the candidate whose simulated change points most nearly the true change's way."""
    best = min(table, key=lambda t: t["one_minus_cos"])
    return {"lr": best["rlr"], "bs": best["rbs"]}


def paper_selection(run, args, true_lr, true_bs, device):
    """The paper's criterion: 50-step runs from the same seeded noise start (its recipe, 8 simulated
    epochs), the lowest final loss wins; lr over the candidates with bs known, bs with lr known."""
    data = run.config["data"]
    losses = {}
    for lr, bs in [(c, true_bs) for c in CANDIDATE_LRS] + [(true_lr, c) for c in CANDIDATE_BS if c != true_bs]:
        x, labels, _ = initial_dummies(data["num_images"], data["image_shape"], data["num_classes"], 0, device)
        setup, _ = simudy_setup(run, lr, bs, args, x, labels)
        losses[(lr, bs)] = short_run(setup, x, labels, args.rec_lr, 50)
    best = lambda keys: min(keys, key=lambda k: losses[k] if math.isfinite(losses[k]) else math.inf)  # noqa: E731
    lr_pick = best([(c, true_bs) for c in CANDIDATE_LRS])[0]
    bs_pick = best([(true_lr, c) for c in CANDIDATE_BS])[1]
    return {"lr": lr_pick, "bs": bs_pick, "losses": [{"lr": k[0], "bs": k[1], "loss": v} for k, v in losses.items()]}


# ----------------------------------------------------------------------------------------------
# The parts


def norm_suffix(iters):
    """A norm row's key suffix: none for the default length (its rows keep their first keys), else its length."""
    return "" if iters == NORM_MATCH_ITERATIONS else f"_iters{iters}"


def row_key(part, config, lr, bs, suffix=""):
    return f"{part}/{config}/lr{lr:g}/bs{bs}{suffix}"


def open_row(part, config, lr, bs, device, suffix="", redo=False):
    """(key, training folder, TrainingRun) of a part's row, or None when the row is done (and not redone) or
    train.py refused."""
    key = row_key(part, config, lr, bs, suffix)
    if done(key) and not redo:
        return None
    train_dir = train(config, lr, bs)
    return None if train_dir is None else (key, train_dir, load_training_run(train_dir, device))


def part_truth(config, lr, bs, device):
    opened = open_row("truth", config, lr, bs, device)
    if opened is None:
        return
    key, train_dir, run = opened
    x, labels = true_subset(train_dir)
    table = candidate_table(run, x.to(device), labels.to(device), run.config["args"]["epochs"])
    save_row({"key": key, "part": "truth", "config": config, "true_lr": lr, "true_bs": bs, "table": table,
              "lowest_cos": lowest_cos(table), "norm_match_true_bs": lr_matching_norm(
                  [t for t in table if t["rbs"] == bs])})


def part_select(config, lr, bs, device):
    """The paper's criterion on one training run."""
    opened = open_row("select", config, lr, bs, device)
    if opened is None:
        return
    key, train_dir, run = opened
    started = time.time()
    paper_args = reconstruction_args(preset="paper")
    paper_args.rec_lr = resolve_rec_lr(paper_args, "simudy")
    paper = paper_selection(run, paper_args, lr, bs, device)
    save_row({"key": key, "part": "select", "config": config, "true_lr": lr, "true_bs": bs, "paper": paper,
              "seconds": time.time() - started})


def part_norm(config, lr, bs, device, iters=NORM_MATCH_ITERATIONS, redo=False):
    """recons.py's --auto_criterion norm (simudy.search.norm_search, the fast preset's recipe) on one
    training run: lr with bs known, and both unknown; plus the norm match at the noise start (no
    reconstruction first), which shows why the reconstruction comes first."""
    opened = open_row("norm", config, lr, bs, device, norm_suffix(iters), redo)
    if opened is None:
        return
    key, train_dir, run = opened
    data, epochs = run.config["data"], run.config["args"]["epochs"]
    args = reconstruction_args(preset=PRESET[config], norm_iterations=iters)
    args.steps, args.rec_lr = epochs, resolve_rec_lr(args, "simudy")
    train_x, _ = true_subset(train_dir)
    started = time.time()
    x, labels = norm_search_dummies(run, args, [(c, bs) for c in CANDIDATE_LRS], data["num_images"], device, train_x)
    known_bs = norm_choice(run, x, labels, [(c, bs) for c in CANDIDATE_LRS])
    seconds = time.time() - started
    both = norm_choice(run, x, labels, [(c, b) for b in CANDIDATE_BS for c in CANDIDATE_LRS])
    x0, labels0, _ = initial_dummies(data["num_images"], data["image_shape"], data["num_classes"], 0, device)
    at_noise = lr_matching_norm([t for t in candidate_table(run, x0.detach(), labels0, epochs) if t["rbs"] == bs])
    save_row({"key": key, "part": "norm", "config": config, "preset": PRESET[config], "true_lr": lr, "true_bs": bs,
              "seconds": seconds, "norm_iterations": iters, "dummies_ssim": paper_avg_ssim(train_x, x.cpu()),
              "known_bs": {"lr": known_bs[0]["rlr"], "table": known_bs[1:]},
              "both": {"lr": both[0]["rlr"], "bs": both[0]["rbs"], "picks": both[1:1 + len(CANDIDATE_BS)]},
              "at_noise_lr": at_noise})


def top_n_precision(order, matched, n):
    return len(set(order[:n]) & matched) / n


def top_n_recall(order, wanted, n):
    """The share of the wanted dummies that the first n of the order hold (nan when none is wanted)."""
    return len(set(order[:n]) & wanted) / len(wanted) if wanted else float("nan")


def skip_duplicates(order, ssim_between, n, threshold=0.5):
    """The ranking with a dummy skipped when it looks like (SSIM > threshold) one already kept."""
    kept = []
    for j in order:
        if all(ssim_between[j, k] <= threshold for k in kept):
            kept.append(j)
        if len(kept) == n:
            break
    return kept + [j for j in order if j not in kept][:n - len(kept)]


def part_rank(config, n, device, iters, clip_epochs=None, redo=False):
    suffix = "" if iters == RANK_ITERS else f"_iters{iters}"  # the default's rows keep their first keys
    recipe = dict(RANK_RECIPE.get(config, {}))
    if clip_epochs is not None and clip_epochs != recipe.get("clip_epochs"):
        recipe["clip_epochs"] = clip_epochs
        suffix += f"_clip{clip_epochs}"
    key = f"rank/{config}/N{n}{suffix}"
    if done(key) and not redo:
        return
    bs = min(20, n)
    train_dir = train(config, 1e-2, bs, per_class=n // 10)
    run = load_training_run(train_dir, device)
    run_dir = os.path.join(RUNS, config, f"rank_N{n}{suffix}")
    if not os.path.isfile(os.path.join(run_dir, RANKING)):  # a finished reconstruction is reused
        args = reconstruction_args(preset=PRESET[config], rec_steps_per_epoch=iters, overwrite=True,
                                   num_dummy=2 * n, **{"steps": run.config["args"]["epochs"], **recipe})
        args.rec_lr = resolve_rec_lr(args, "simudy")
        reconstruct_from_args(run, args, device, run_dir, 1e-2, bs)
    snaps = [torch.load(os.path.join(run_dir, stem + ".pth"), weights_only=False) for stem in list_snapshots(run_dir)]
    images = snaps[-1]["x"]
    train_x, train_labels = true_subset(train_dir)
    ssim = ssim_matrix(train_x, images)
    pairs = match_by_ssim(ssim)  # (training image, dummy)
    matched = {c for _, c in pairs}
    recovered = {c for r, c in pairs if ssim[r, c] >= RECOVERED_SSIM}
    summed = sum(s["grad_norms"] for s in snaps)
    orders = {"last": snaps[-1]["ranking"].tolist(),
              "summed": torch.argsort(summed, descending=True, stable=True).tolist()}
    between = ssim_matrix(images, images)
    orders["dedup"] = skip_duplicates(orders["last"], between, n)
    orders["balanced"] = rank_dummies(snaps[-1]["grad_norms"], snaps[-1]["labels"]).tolist()
    row = {"key": key, "part": "rank", "config": config, "N": n, "M": 2 * n, "iterations": 4 * iters,
           "preset": PRESET[config], "recipe": recipe,
           "ssim_all_M": paper_avg_ssim(train_x, images), "snapshots": len(snaps)}
    for name, order in orders.items():
        row[f"precision_{name}"] = top_n_precision(order, matched, n)
        row[f"ssim_{name}"] = paper_avg_ssim(train_x, images[order[:n]])
        # the ranking's precision on what could be told apart: of the dummies that came back recognisable,
        # the share in its top N (a dummy "matched" to an image that did not come back is a near-arbitrary pick)
        row[f"recovered_kept_{name}"] = top_n_recall(order, recovered, n)
    row["recovered"] = len(recovered)
    loss0 = loss_per_image(run, train_x.to(device), train_labels.to(device)).cpu()
    norms = snaps[-1]["grad_norms"]
    rank_of = {j: r for r, j in enumerate(orders["last"])}
    # per training image: its loss at theta0, its matched dummy's SSIM, norm and paper rank
    row["images"] = [{"image": r, "loss_theta0": float(loss0[r]), "ssim": float(ssim[r, c]), "dummy": c,
                      "norm": float(norms[c]), "rank": rank_of[c]} for r, c in sorted(pairs)]
    row["norm_matched_mean"] = float(norms[sorted(matched)].mean())
    row["norm_unmatched_mean"] = float(norms[[j for j in range(2 * n) if j not in matched]].mean())
    save_row(row)


# ----------------------------------------------------------------------------------------------
# Tables


def within_one_step(estimate, true):
    """The estimate lies between the true lr's neighbours on the candidate grid (inclusive)."""
    grid = list(CANDIDATE_LRS)
    k = grid.index(true)
    return grid[max(0, k - 1)] * (1 - 1e-9) <= estimate <= grid[min(len(grid) - 1, k + 1)] * (1 + 1e-9)


def score(rows, pick, config):
    """'a/b' counts over one config's rows of the lr within one grid step and of the bs exact."""
    rs = [r for r in rows if r["config"] == config]
    lr_ok = sum(within_one_step(pick(r)[0], r["true_lr"]) for r in rs)
    bs = [pick(r)[1] for r in rs]
    bs_ok = sum(b == r["true_bs"] for b, r in zip(bs, rs)) if None not in bs else None
    return f"{lr_ok}/{len(rs)}", (f"{bs_ok}/{len(rs)}" if bs_ok is not None else "-")


def print_tables(rows):
    order = lambda r: (r["config"], r["true_bs"], r["true_lr"])  # noqa: E731
    truth = sorted((r for r in rows if r["part"] == "truth" and "lowest_cos" in r), key=order)
    if truth:
        print("\n## At the true images: 1 - cos per candidate lr (bs = the true bs); the lowest 1 - cos over every"
              " (lr, bs); the lr of the norm match at the true bs")
        print("| config | true lr | true bs | " + " | ".join(f"{c:g}" for c in CANDIDATE_LRS)
              + " | lowest 1 - cos (lr, bs) | norm match lr |")
        print("|---" * (len(CANDIDATE_LRS) + 5) + "|")
        for r in truth:
            line = {t["rlr"]: t for t in r["table"] if t["rbs"] == r["true_bs"]}
            print(f"| {r['config']} | {r['true_lr']:g} | {r['true_bs']} | "
                  + " | ".join(f"{line[c]['one_minus_cos']:.1e}" for c in CANDIDATE_LRS)
                  + f" | {r['lowest_cos']['lr']:g}, {r['lowest_cos']['bs']} | {r['norm_match_true_bs']:.3g} |")
    select = {(r["config"], r["true_lr"], r["true_bs"]): r for r in rows if r["part"] == "select"}
    norm = {(r["config"], r["true_lr"], r["true_bs"]): r for r in rows if r["part"] == "norm"
            and r.get("norm_iterations", NORM_MATCH_ITERATIONS) == NORM_MATCH_ITERATIONS}  # the scored length
    longer = [r for r in rows if r["part"] == "norm" and r.get("norm_iterations", NORM_MATCH_ITERATIONS)
              != NORM_MATCH_ITERATIONS]
    keys = sorted(set(select) | set(norm), key=lambda k: (k[0], k[2], k[1]))
    if keys:
        print("\n## Selection: the paper's (lowest loss after 50 steps from noise; lr with bs known, bs with lr"
              f" known) and --auto_criterion norm ({NORM_MATCH}); lr candidates "
              + ", ".join(f"{c:g}" for c in CANDIDATE_LRS) + f"; bs candidates {', '.join(map(str, CANDIDATE_BS))}")
        print("| config | true lr | true bs | paper: lr | paper: bs | norm, bs known: lr | norm at noise: lr "
              "| norm, both unknown: lr, bs | lr/bs, true vs chosen |")
        print("|---" * 9 + "|")
        for k in keys:
            p, n = select.get(k, {}).get("paper"), norm.get(k)
            cells = [f"{p['lr']:g}", str(p["bs"])] if p else ["", ""]
            if n:
                cells += [f"{n['known_bs']['lr']:.3g}", f"{n['at_noise_lr']:.3g}", f"{n['both']['lr']:.3g}, {n['both']['bs']}",
                          f"{k[1] / k[2]:.2g} vs {n['both']['lr'] / n['both']['bs']:.2g}"]
            else:
                cells += ["", "", "", ""]
            print(f"| {k[0]} | {k[1]:g} | {k[2]} | " + " | ".join(cells) + " |")
        for config in sorted({k[0] for k in keys}):
            sel = [r for r in select.values() if r["config"] == config]
            nrm = [r for r in norm.values() if r["config"] == config]
            if sel:
                lr_ok, bs_ok = score(sel, lambda r: (r["paper"]["lr"], r["paper"]["bs"]), config)
                print(f"- {config}, paper's criterion: lr within one grid step {lr_ok}, bs exact {bs_ok}")
            if nrm:
                lr_ok, _ = score(nrm, lambda r: (r["known_bs"]["lr"], None), config)
                noise_ok, _ = score(nrm, lambda r: (r["at_noise_lr"], None), config)
                both_lr, both_bs = score(nrm, lambda r: (r["both"]["lr"], r["both"]["bs"]), config)
                ratio_ok = sum(within_one_step(r["both"]["lr"] * r["true_bs"] / r["both"]["bs"], r["true_lr"])
                               for r in nrm)
                print(f"- {config}, norm criterion: bs known, lr within one grid step {lr_ok} (at the noise start"
                      f" {noise_ok}); both unknown: lr {both_lr}, bs exact {both_bs}, lr/bs within one grid step"
                      f" {ratio_ok}/{len(nrm)}")
    if longer:
        print("\n## The norm criterion after a longer reconstruction (--norm_iters; not in the scores above)")
        print("| config | true lr | true bs | iterations | dummies' SSIM | bs known: lr | both unknown: lr, bs |")
        print("|---" * 7 + "|")
        for r in sorted(longer, key=lambda r: (r["config"], r["true_bs"], r["true_lr"], r["norm_iterations"])):
            print(f"| {r['config']} | {r['true_lr']:g} | {r['true_bs']} | {r['norm_iterations']} | {r['dummies_ssim']:.3f}"
                  f" | {r['known_bs']['lr']:.3g} | {r['both']['lr']:.3g}, {r['both']['bs']} |")
    rank = [r for r in rows if r["part"] == "rank"]
    if rank:
        print("\n## Unknown N: M = 2N dummies, precision of the top N and the SSIM it keeps")
        print("| config | N | M | iterations | SSIM all M | norm (paper): precision | SSIM | summed: precision | SSIM "
              "| dedup: precision | SSIM | class_balanced: precision | SSIM | mean norm matched / unmatched |")
        print("|---" * 14 + "|")
        iterations = lambda r: r.get("iterations", 4 * RANK_ITERS)  # noqa: E731 (rows before session 12 lack it)
        for r in sorted(rank, key=lambda r: (r["config"], r["N"], iterations(r))):
            print(f"| {r['config']} | {r['N']} | {r['M']} | {iterations(r)} | {r['ssim_all_M']:.3f} | "
                  + " | ".join(f"{r[f'precision_{k}']:.2f} | {r[f'ssim_{k}']:.3f}" for k in ("last", "summed", "dedup", "balanced"))
                  + f" | {r['norm_matched_mean']:.3g} / {r['norm_unmatched_mean']:.3g} |")
        detailed = [r for r in rank if "images" in r]  # rows from session 24 on
        if detailed:
            print(f"\n## The ranking on what came back: dummies matched at SSIM >= {RECOVERED_SSIM} (recovered),"
                  " the share of them in the top N, and the training images' loss at theta0")
            print("| config | N | iterations | precision (paper) | recovered | recovered in top N: paper "
                  f"| class_balanced | images with loss at theta0 < {FITTED_LOSS} | their mean SSIM "
                  "| the others' mean SSIM | the others' dummies in the paper's top N |")
            print("|---" * 11 + "|")
            for r in sorted(detailed, key=lambda r: (r["config"], r["N"], iterations(r))):
                fitted = [i["ssim"] for i in r["images"] if i["loss_theta0"] < FITTED_LOSS]
                rest = [i for i in r["images"] if i["loss_theta0"] >= FITTED_LOSS]
                print(f"| {r['config']} | {r['N']} | {iterations(r)} | {r['precision_last']:.2f} | {r['recovered']} | "
                      f"{r['recovered_kept_last']:.2f} | {r['recovered_kept_balanced']:.2f} | {len(fitted)} | "
                      f"{mean_or_nan(fitted):.3f} | {mean_or_nan([i['ssim'] for i in rest]):.3f} | "
                      f"{held_in_top(rest, r['N'])} |")


def held_in_top(images, n):
    """'k/m (share)': of the training images theta0 did not yet fit (the ones theta0 - theta_f holds), how many
    have their matched dummy in the paper ranking's top n."""
    kept = sum(i["rank"] < n for i in images)
    return f"{kept}/{len(images)} ({kept / len(images):.2f})" if images else "-"


def mean_or_nan(values):
    return sum(values) / len(values) if values else float("nan")


def main(args):
    if args.table:
        print_tables(load_results())
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(RUNS, exist_ok=True)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    link = os.path.join(RUNS, "cifar10-test", "train")  # ImageFolder reads <root>/train: the test split
    if not os.path.exists(link):
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(CIFAR_TEST, link)
    device = pick_device(args.device)
    for config in args.configs:
        for part in args.parts:
            if part == "rank":
                for n in args.rank_ns:
                    part_rank(config, n, device, args.rank_iters, args.rank_clip_epochs, args.redo)
                continue
            for bs in args.true_bs:
                for lr in args.true_lrs:
                    if part == "norm":
                        part_norm(config, lr, bs, device, args.norm_iters, args.redo)
                    else:
                        {"truth": part_truth, "select": part_select}[part](config, lr, bs, device)
                    suffix = norm_suffix(args.norm_iters) if part == "norm" else ""
                    state = "done" if done(row_key(part, config, lr, bs, suffix)) else "not done (see above)"
                    print(f"{part} {config} lr {lr:g} bs {bs} {state}", flush=True)
    print_tables(load_results())


if __name__ == "__main__":
    main(parse_args())
