"""Reconstruction quality per CPU-minute: the whole pipeline (train -> recons -> metrics) on named
configurations, one table.

    python benchmarks/quality.py --configs A            # MLP on 20 Fashion-MNIST images
    python benchmarks/quality.py --configs A --extra "--tv_weight 2e-3" --label "TV 2e-3"

A: MLP-1000-1000, Fashion-MNIST, 2 images per class, lr 1e-2, bs 20.
B: ResNet-18 width 16, theta0 pretrained on CIFAR-10 images disjoint from the subset (the shared
   cifar10-jpg folder), 2 images per class, lr 1e-2, bs 20.
C: MLP-1000-1000, CIFAR-10 (same folder), 10 images per class, bs 100.
Run with nothing else on the machine: two jobs on 2 cores distort wall times by up to 10x.
"""
import argparse
import contextlib
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CIFAR10_JPG = os.path.join(os.path.dirname(ROOT), "shared", "datasets", "cifar10-jpg")
SSIM_GOOD = 0.4

# name -> (data/model flags shared by all stages, train-only flags, recons iterations (epochs, steps))
CONFIGS = {
    "A": (["--dataset", "fashion_mnist", "--model_name", "mlp", "--num_imgs_per_class", "2", "--bs", "20"],
          ["--lr", "1e-2"], (4, 300)),
    "B": (["--dataset", "folder", "--data_root", CIFAR10_JPG, "--model_name", "resnet18", "--width", "16",
           "--num_imgs_per_class", "2", "--bs", "20"], ["--lr", "1e-2"], (4, 500)),
    "C": (["--dataset", "folder", "--data_root", CIFAR10_JPG, "--model_name", "mlp",
           "--num_imgs_per_class", "10", "--bs", "100"], ["--lr", "1e-2"], (4, 500)),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--rec_epochs", type=int, default=None, help="override the config's outer epochs")
    p.add_argument("--rec_steps_per_epoch", type=int, default=None)
    p.add_argument("--extra", default="", help="extra recons.py flags, e.g. '--tv_weight 2e-3'")
    p.add_argument("--label", default="paper", help="name of this recipe in the table")
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


def run_config(name, args):
    import metrics
    import recons
    import train
    shared, train_only, (epochs, steps) = CONFIGS[name]
    epochs, steps = args.rec_epochs or epochs, args.rec_steps_per_epoch or steps
    # The whole pipeline runs in its own folder; a cached pretraining (config B) is reused across runs.
    with working_directory(os.path.join(args.work_dir, name)):
        start = time.time()
        train.main(train.parse_args(shared + train_only + ["--overwrite"]))
        trained = time.time()
        recons_dir = recons.main(recons.parse_args(
            shared + ["--tlr", "1e-2", "--rec_epochs", str(epochs), "--rec_steps_per_epoch", str(steps),
                      "--overwrite"] + args.extra.split()))
        reconstructed = time.time()
        result = metrics.main(metrics.parse_args(shared + ["--tlr", "1e-2", "--snapshot", "last"]))
        with open(os.path.join(recons_dir, "config.json")) as f:
            backprop = json.load(f).get("backprop")
    return {"config": name, "recipe": args.label, "extra": args.extra, "avg_ssim": result["avg_ssim"],
            f"share_ssim_ge_{SSIM_GOOD}": result[f"share_ssim_ge_{SSIM_GOOD}"],
            "iterations": epochs * steps, "train_seconds": trained - start,
            "recons_seconds": reconstructed - trained, "wall_seconds": time.time() - start,
            "backprop": backprop}


def main(args):
    rows = []
    for name in args.configs:
        rows.append(run_config(name, args))
        print(json.dumps(rows[-1]), flush=True)
    previous = []
    if os.path.isfile(args.out):
        with open(args.out) as f:
            previous = json.load(f)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(previous + rows, f, indent=1)
    print("\n| config | recipe | SSIM (paper metric) | share SSIM >= 0.4 | iterations | wall time |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['recipe']} | {r['avg_ssim']:.3f} | {r[f'share_ssim_ge_{SSIM_GOOD}']:.2f}"
              f" | {r['iterations']} | {r['wall_seconds'] / 60:.1f} min |")
    return rows


if __name__ == "__main__":
    main(parse_args())
