"""Reconstruction quality per CPU-minute: the whole pipeline (train -> recons -> metrics) on named
configurations, one table.

    python benchmarks/quality.py --configs A --preset fast          # the fast recipe on A
    python benchmarks/quality.py --configs B --preset paper --minutes 30   # the paper's, cut at 30 min
    python benchmarks/quality.py --configs C --method one_step --minutes 10  # a baseline, same budget
    python benchmarks/quality.py --configs B --method simudy one_step two_step --minutes 15  # side by side
    python benchmarks/quality.py --configs A --rec_epochs 1 --rec_steps_per_epoch 800 \
        --extra "--schedule cosine --tv_weight 2e-3" --label "cosine, TV 2e-3"   # an idea

A: MLP-1000-1000, Fashion-MNIST, 2 images per class, lr 1e-2, bs 20.
B: ResNet-18 width 16, theta0 pretrained on CIFAR-10 images disjoint from the subset (the shared
   cifar10-jpg folder), 2 images per class, lr 1e-2, bs 20.
C: MLP-1000-1000, CIFAR-10 (same folder), 10 images per class, bs 100.
B32: B at width 32. D: ResNet-18 width 16 on Fashion-MNIST (1 channel, 28 px), 2 images per class, bs 20.
E: ResNet-18 width 16 on CIFAR-10, 1 image per class (10 images), bs 10.

Each run is recons.py with --preset (its own iteration count) and --max_minutes (the budget; the paper's
30,000 iterations never fit, so a paper row is the paper's run stopped at the budget). The score is
metrics.py's on the last snapshot; every snapshot's SSIM is also recorded ("ssim_curve"). Rows are
appended to results/quality.json. Run with nothing else on the machine: two jobs on 2 cores distort wall
times by up to 10x.
"""
import argparse
import contextlib
import csv
import glob
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import metrics  # noqa: E402
import recons  # noqa: E402
import train  # noqa: E402
from simudy.loop import main_run_iterations  # noqa: E402
from simudy.runs import TRAIN_SUBSET, recorded_train_dir  # noqa: E402
from simudy.scoring import paper_avg_ssim  # noqa: E402

CIFAR10_JPG = os.path.join(os.path.dirname(ROOT), "shared", "datasets", "cifar10-jpg")
SSIM_GOOD = 0.4

# name -> (data/model flags shared by all stages, train-only flags, issue 4's time goal in minutes)
CONFIGS = {
    "A": (["--dataset", "fashion_mnist", "--model_name", "mlp", "--num_imgs_per_class", "2", "--bs", "20"],
          ["--lr", "1e-2"], 10),
    "B": (["--dataset", "folder", "--data_root", CIFAR10_JPG, "--model_name", "resnet18", "--width", "16",
           "--num_imgs_per_class", "2", "--bs", "20"], ["--lr", "1e-2"], 60),
    "C": (["--dataset", "folder", "--data_root", CIFAR10_JPG, "--model_name", "mlp",
           "--num_imgs_per_class", "10", "--bs", "100"], ["--lr", "1e-2"], 60),
    "B32": (["--dataset", "folder", "--data_root", CIFAR10_JPG, "--model_name", "resnet18", "--width", "32",
             "--num_imgs_per_class", "2", "--bs", "20"], ["--lr", "1e-2"], 60),
    "D": (["--dataset", "fashion_mnist", "--model_name", "resnet18", "--width", "16", "--num_imgs_per_class", "2",
           "--bs", "20"], ["--lr", "1e-2"], 30),
    "E": (["--dataset", "folder", "--data_root", CIFAR10_JPG, "--model_name", "resnet18", "--width", "16",
           "--num_imgs_per_class", "1", "--bs", "10"], ["--lr", "1e-2"], 60),
}
LINEAR_FLAG = {"simudy": "0", "one_step": "1", "two_step": "2"}  # metrics.py --linear


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--preset", default="paper", help="recons.py --preset (SimuDy)")
    p.add_argument("--method", nargs="+", default=["simudy"], choices=list(LINEAR_FLAG),
                   help="one row per method and config, each with the same budget (SimuDy vs the baselines)")
    p.add_argument("--minutes", type=float, default=None,
                   help="reconstruction budget (recons.py --max_minutes); default the config's goal (A 10,"
                        " B 60, C 60 min)")
    p.add_argument("--rec_epochs", type=int, default=None, help="override the preset's outer epochs")
    p.add_argument("--rec_steps_per_epoch", type=int, default=None)
    p.add_argument("--extra", default="", help="extra recons.py flags, e.g. '--tv_weight 2e-3'")
    p.add_argument("--label", default=None, help="name of this recipe in the table (default the preset)")
    p.add_argument("--work_dir", default=os.path.join(ROOT, "benchmarks", "runs"))
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "quality.json"))
    return p.parse_args(argv)


@contextlib.contextmanager
def working_directory(path):
    old = os.getcwd()
    os.makedirs(path, exist_ok=True)
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def ssim_curve(recons_dir):
    """[(iteration, seconds into the reconstruction, avg SSIM)] for every snapshot of a SimuDy run: where
    quality peaks, and when."""
    with open(os.path.join(recons_dir, "config.json")) as f:
        config = json.load(f)
    if config["method"] != "simudy":
        return []
    steps_per_epoch = config["args"]["rec_steps_per_epoch"]
    train_images = torch.load(os.path.join(recorded_train_dir(recons_dir, config), TRAIN_SUBSET))["images"]
    with open(os.path.join(recons_dir, "log.csv")) as f:
        seconds = {int(r["iteration"]): float(r["seconds"]) for r in csv.DictReader(f)}
    curve = []
    for path in glob.glob(os.path.join(recons_dir, "*_*.pth")):
        snap = torch.load(path)
        iteration = snap["epoch"] * steps_per_epoch + snap["step"]
        curve.append((iteration, seconds.get(iteration), round(paper_avg_ssim(train_images, snap["x"]), 4)))
    return sorted(curve)


def planned_iterations(recons_args):
    if recons_args.method == "simudy":
        return main_run_iterations(recons_args)
    return recons_args.baseline_steps


def run_config(name, method_name, args):
    shared, train_only, goal_minutes = CONFIGS[name]
    minutes = args.minutes or goal_minutes
    iteration_flags = [f for flag, value in (("--rec_epochs", args.rec_epochs),
                                      ("--rec_steps_per_epoch", args.rec_steps_per_epoch)) if value
                for f in (flag, str(value))]
    method = ["--method", method_name] if method_name != "simudy" else ["--preset", args.preset]
    # The whole pipeline runs in its own folder; a cached pretraining (config B) is reused across runs.
    with working_directory(os.path.join(args.work_dir, name)):
        start = time.time()
        train.main(train.parse_args(shared + train_only + ["--overwrite"]))
        trained = time.time()
        recons_args = recons.parse_args(shared + method + iteration_flags + args.extra.split() + [
            "--tlr", "1e-2", "--max_minutes", str(minutes), "--overwrite"])
        recons_dir = recons.main(recons_args)
        reconstructed = time.time()
        result = metrics.main(metrics.parse_args(shared + [
            "--tlr", "1e-2", "--snapshot", "last", "--linear", LINEAR_FLAG[method_name],
            "--recons_dir", recons_dir]))
        with open(os.path.join(recons_dir, "config.json")) as f:
            backprop = json.load(f).get("backprop")
        with open(os.path.join(recons_dir, "log.csv")) as f:
            iterations = sum(1 for _ in f) - 1
        curve = ssim_curve(recons_dir)
    simudy = method_name == "simudy"
    return {"config": name, "method": method_name, "preset": args.preset if simudy else "",
            "recipe": (args.label or args.preset) if simudy else method_name,
            "extra": args.extra, "budget_minutes": minutes, "avg_ssim": result["avg_ssim"],
            f"share_ssim_ge_{SSIM_GOOD}": result[f"share_ssim_ge_{SSIM_GOOD}"],
            "iterations": iterations, "planned_iterations": planned_iterations(recons_args),
            "train_seconds": trained - start,
            "recons_seconds": reconstructed - trained, "wall_seconds": time.time() - start,
            "backprop": backprop, "ssim_curve": curve}


def main(args):
    rows = []
    for name in args.configs:
        for method_name in args.method:
            rows.append(run_config(name, method_name, args))
            print(json.dumps(rows[-1]), flush=True)
    previous = []
    if os.path.isfile(args.out):
        with open(args.out) as f:
            previous = json.load(f)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(previous + rows, f, indent=1)
    print("\n| config | method | recipe | SSIM (paper metric) | share SSIM >= 0.4 | best snapshot (iteration)"
          " | iterations | reconstruction time | wall time (train + recons + metrics) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        best = max(r["ssim_curve"], key=lambda c: c[2]) if r["ssim_curve"] else None
        best_text = f"{best[2]:.3f} ({best[0]})" if best else "-"
        print(f"| {r['config']} | {r['method']} | {r['recipe']} | {r['avg_ssim']:.3f}"
              f" | {r[f'share_ssim_ge_{SSIM_GOOD}']:.2f} | {best_text} | {r['iterations']}"
              f" | {r['recons_seconds'] / 60:.1f} min | {r['wall_seconds'] / 60:.1f} min |")
    return rows


if __name__ == "__main__":
    main(parse_args())
