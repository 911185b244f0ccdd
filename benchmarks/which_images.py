"""Which training images a reconstruction got back, against how much the training had to teach them.

Reads the per_image.csv that `metrics.py --image_shares` wrote for each run named, prints a table (per run:
average SSIM; mean SSIM of the images whose part of theta0 - theta_final is >= 0.2 of its norm and of the
rest; the images theta0 already fitted, loss < 0.05; Spearman of SSIM with the loss at theta0 and with the
part; the ceiling: the average if every image with a part >= 0.2 came back perfectly and the rest stayed),
and writes the rows as JSON and a scatter plot.

    python benchmarks/which_images.py NAME=METRICS_DIR ... [--json F] [--plot F.png]
"""
import argparse
import csv
import json
import os

import matplotlib
from scipy.stats import spearmanr

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after the backend)

VISIBLE = 0.2  # a part of at least this share of the change's norm
FITTED = 0.05  # a loss at theta0 below this: an image theta0 already classified


def read_rows(metrics_dir):
    path = os.path.join(metrics_dir, "per_image.csv")
    rows = list(csv.DictReader(open(path)))
    if not rows or rows[0].get("share", "") == "":
        raise SystemExit(f"error: {path} has no share column; run metrics.py with --image_shares first")
    return [{"train_index": int(r["train_index"]), "label": int(r["label"]), "ssim": float(r["ssim"] or 0),
             "loss_theta0": float(r["loss_theta0"]), "share": float(r["share"]),
             "share_cos": float(r["share_cos"])} for r in rows]


def summary(rows):
    ssim = [r["ssim"] for r in rows]
    visible = [r["ssim"] for r in rows if r["share"] >= VISIBLE]
    faint = [r["ssim"] for r in rows if r["share"] < VISIBLE]
    fitted = [r["ssim"] for r in rows if r["loss_theta0"] < FITTED]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"avg_ssim": mean(ssim), "n_visible": len(visible), "ssim_visible": mean(visible),
            "n_faint": len(faint), "ssim_faint": mean(faint), "n_fitted": len(fitted), "ssim_fitted": mean(fitted),
            "spearman_loss": float(spearmanr(ssim, [r["loss_theta0"] for r in rows]).statistic),
            "spearman_share": float(spearmanr(ssim, [r["share"] for r in rows]).statistic),
            "ceiling": (len(visible) + sum(faint)) / len(rows)}


def main(args):
    runs = dict(arg.split("=", 1) for arg in args.runs)
    rows = {name: read_rows(d) for name, d in runs.items()}
    print(f"| run | avg SSIM | part >= {VISIBLE}: n, SSIM | part < {VISIBLE}: n, SSIM | loss at theta0 < {FITTED}:"
          f" n, SSIM | Spearman SSIM~loss | Spearman SSIM~part | ceiling |")
    print("|---" * 8 + "|")
    for name, rs in rows.items():
        s = summary(rs)
        print(f"| {name} | {s['avg_ssim']:.3f} | {s['n_visible']}, {s['ssim_visible']:.3f} | {s['n_faint']},"
              f" {s['ssim_faint']:.3f} | {s['n_fitted']}, {s['ssim_fitted']:.3f} | {s['spearman_loss']:.2f} |"
              f" {s['spearman_share']:.2f} | {s['ceiling']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({name: {"metrics_dir": runs[name], "summary": summary(rs), "rows": rs}
                       for name, rs in rows.items()}, f, indent=1)
    if args.plot:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for (name, rs), marker in zip(rows.items(), "os^vD<>"):
            for ax, key in zip(axes, ("loss_theta0", "share")):
                ax.scatter([r[key] for r in rs], [r["ssim"] for r in rs], marker=marker,
                           label=f"{name} ({summary(rs)['avg_ssim']:.3f})")
        for ax, label in zip(axes, ("the training image's loss at theta0",
                                    "its part of theta0 - theta_final (||Delta_i|| / ||change||)")):
            ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("SSIM of its matched reconstruction")
            ax.axhline(0.4, color="grey", lw=0.5)
        axes[0].legend(fontsize=8)
        fig.suptitle("SimuDy recovers the images the training had to teach")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=90)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="NAME=METRICS_DIR",
                   help="a name and metrics.py's output folder (<recons folder>/metrics/<snapshot>)")
    p.add_argument("--json", help="write the rows and summaries here")
    p.add_argument("--plot", help="draw SSIM against the loss at theta0 and against the part, here")
    args = p.parse_args(argv)
    bad = [a for a in args.runs if "=" not in a]
    if bad:
        p.error(f"{bad[0]!r}: name each run, NAME=METRICS_DIR")
    return args


if __name__ == "__main__":
    main(parse_args())
