"""Does a defence stop the reconstruction? One configuration trained at each strength of each defence,
every training attacked with the same SimuDy budget, one table, one plot, one picture (issue 14).

    python benchmarks/audit.py                                   # config A, every defence (~30 min, 2 cores)
    python benchmarks/audit.py --defences dp --sigmas 0 0.01 0.1 # one defence, other strengths
    python benchmarks/audit.py --table                           # the table and pictures of what ran

Defences: DP-SGD through Opacus (noise multiplier sigma over a grid, per-image clip C fixed; epsilon at
delta 1e-5 for the training's fixed batches, see simudy/defences.py), weight decay over a grid,
augmentation (flip, crop_flip) and label smoothing. The attacker (recons.py) knows every hyper-parameter,
C included, and simulates the clipping, weight decay and label smoothing exactly; it does not know the
noise or augmentation draws and leaves them out (recons.py prints that assumption).

Each row is resumable: a row whose metrics exist is read, not rerun (--rerun to redo it). Rows are in
results/audit.json; the plot (SSIM against sigma with epsilon on top, against weight decay, and the
others) is results/audit.png; the reconstructions of the first training images at every strength, side
by side, are results/audit_grids.png.
"""
import argparse
import json
import os
import sys
import time

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import metrics  # noqa: E402
import recons  # noqa: E402
import train  # noqa: E402
from simudy.data import denormalise  # noqa: E402
from simudy.runs import metrics_dir  # noqa: E402
from simudy.scoring import SSIM_GOOD  # noqa: E402

CONFIGS = {  # name -> data/model flags and the training's lr (benchmarks/quality.py's)
    "A": (["--dataset", "fashion_mnist", "--model_name", "mlp", "--num_imgs_per_class", "2", "--bs", "20"], 1e-2),
}
DEFENCES = ("none", "dp", "weight_decay", "augment", "label_smoothing")
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="A", choices=list(CONFIGS))
    p.add_argument("--defences", nargs="+", default=list(DEFENCES), choices=DEFENCES)
    p.add_argument("--sigmas", type=float, nargs="+", default=[0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0],
                   help="DP-SGD noise multipliers (0: clipping only)")
    p.add_argument("--clip", type=float, default=5.0,
                   help="DP-SGD's per-image clip C (config A: the images' gradient norms at theta0 are 4.7-12)")
    p.add_argument("--weight_decays", type=float, nargs="+", default=[1e-2, 1e-1, 1.0])
    p.add_argument("--augments", nargs="+", default=["flip", "crop_flip"])
    p.add_argument("--label_smoothings", type=float, nargs="+", default=[0.1, 0.3])
    p.add_argument("--recons_flags", default="--preset fast --rec_epochs 4 --rec_steps_per_epoch 100",
                   help="the attack, the same for every row")
    p.add_argument("--grid_images", type=int, default=10, help="training images shown in the picture")
    p.add_argument("--work_dir", default=os.path.join(ROOT, "benchmarks", "runs", "audit"))
    p.add_argument("--out", default=os.path.join(RESULTS, "audit"), help="prefix of the .json and .png outputs")
    p.add_argument("--rerun", action="store_true", help="redo rows that already have metrics")
    p.add_argument("--table", action="store_true", help="only print the table and draw the pictures")
    return p.parse_args(argv)


def planned_rows(args):
    """(defence, strength, train.py flags) of every row, in the order of the table."""
    rows = []
    if "none" in args.defences:
        rows.append(("none", None, []))
    if "dp" in args.defences:
        rows += [("dp", s, ["--dp_noise_multiplier", str(s), "--dp_max_grad_norm", str(args.clip)])
                 for s in args.sigmas]
    if "weight_decay" in args.defences:
        rows += [("weight_decay", w, ["--weight_decay", str(w)]) for w in args.weight_decays]
    if "augment" in args.defences:
        rows += [("augment", a, ["--augment", a]) for a in args.augments]
    if "label_smoothing" in args.defences:
        rows += [("label_smoothing", s, ["--label_smoothing", str(s)]) for s in args.label_smoothings]
    return rows


def row_dir(args, defence, strength):
    return os.path.join(args.work_dir, args.config, f"{defence}_{strength}" if strength is not None else defence)


def run_row(args, defence, strength, train_flags):
    """Train with the defence, attack, score; returns the row (also written as row.json in its folder)."""
    shared, lr = CONFIGS[args.config]
    folder = row_dir(args, defence, strength)
    train_dir, recons_dir = os.path.join(folder, "train"), os.path.join(folder, "recons")
    start = time.time()
    train.main(train.parse_args(shared + train_flags + ["--lr", str(lr), "--run_dir", train_dir, "--overwrite"]))
    trained = time.time()
    recons.main(recons.parse_args(shared + ["--tlr", str(lr), "--train_dir", train_dir, "--recons_dir", recons_dir,
                                            "--overwrite"] + args.recons_flags.split()))
    result = metrics.main(metrics.parse_args(shared + ["--tlr", str(lr), "--train_dir", train_dir, "--recons_dir",
                                                       recons_dir, "--snapshot", "last"]))
    with open(os.path.join(train_dir, "config.json")) as f:
        train_config = json.load(f)
    defence_report = train_config.get("defence") or {}
    row = {"config": args.config, "defence": defence, "strength": strength, "train_flags": train_flags,
           "recons_flags": args.recons_flags, "epsilon": defence_report.get("epsilon"),
           "delta": defence_report.get("delta"), "train_acc": train_config["results"]["final_train_acc"],
           "avg_ssim": result["avg_ssim"], f"share_ssim_ge_{SSIM_GOOD}": result[f"share_ssim_ge_{SSIM_GOOD}"],
           "label_agreement": result["label_agreement"],
           "matched": os.path.relpath(metrics_dir(recons_dir, result["snapshot"]), ROOT),  # metrics.py's folder
           "train_seconds": trained - start, "seconds": time.time() - start}
    with open(os.path.join(folder, "row.json"), "w") as f:
        json.dump(row, f, indent=1)
    return row


def load_row(args, defence, strength):
    path = os.path.join(row_dir(args, defence, strength), "row.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return None


def strength_text(row):
    if row["defence"] == "none":
        return "-"
    return f"{row['strength']:g}" if isinstance(row["strength"], float) else str(row["strength"])


def epsilon_text(row):
    if row["defence"] != "dp":
        return "-"
    return "inf (no noise)" if row["epsilon"] is None else f"{row['epsilon']:.3g}"


def table(rows):
    lines = ["| defence | strength | epsilon (delta 1e-5) | train accuracy | SSIM | share SSIM >= 0.4 | labels right |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        labels = "-" if r["label_agreement"] is None else f"{r['label_agreement']:.2f}"
        lines.append(f"| {r['defence']} | {strength_text(r)} | {epsilon_text(r)} | {r['train_acc']:.2f} |"
                     f" {r['avg_ssim']:.3f} | {r[f'share_ssim_ge_{SSIM_GOOD}']:.2f} | {labels} |")
    return "\n".join(lines)


def where_it_stops(rows, threshold=0.2):
    """The sentence the README quotes: the smallest sigma > 0 at which SSIM falls below the threshold."""
    dp = sorted((r for r in rows if r["defence"] == "dp" and r["strength"] > 0), key=lambda r: r["strength"])
    below = [r for r in dp if r["avg_ssim"] < threshold]
    if not below:
        return f"SSIM stays at or above {threshold} at every sigma tried (up to {dp[-1]['strength']:g})." if dp else ""
    r = below[0]
    undefended = next((x for x in rows if x["defence"] == "none"), None)
    cost = f", train accuracy {r['train_acc']:.2f}"
    if undefended:
        cost += f" (undefended {undefended['train_acc']:.2f})"
    return (f"SSIM falls below {threshold} at sigma {r['strength']:g} (SSIM {r['avg_ssim']:.3f},"
            f" epsilon {epsilon_text(r)} at delta 1e-5{cost}).")


def plot(rows, path):
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    undefended = next((r["avg_ssim"] for r in rows if r["defence"] == "none"), None)
    dp = sorted((r for r in rows if r["defence"] == "dp" and r["strength"] > 0), key=lambda r: r["strength"])
    ax = axes[0]
    if dp:
        ax.semilogx([r["strength"] for r in dp], [r["avg_ssim"] for r in dp], "o-", label="SimuDy SSIM")
        ax.semilogx([r["strength"] for r in dp], [r["train_acc"] for r in dp], "s--", color="grey",
                    label="train accuracy")
        for k, r in enumerate(dp):  # alternate above and below so neighbours do not overlap
            ax.annotate(f"eps {r['epsilon']:.2g}", (r["strength"], r["avg_ssim"]), textcoords="offset points",
                        xytext=(0, 7 if k % 2 else -12), ha="center", fontsize=6)
    clip_only = next((r for r in rows if r["defence"] == "dp" and r["strength"] == 0), None)
    if clip_only:
        ax.axhline(clip_only["avg_ssim"], color="C1", ls=":", label="clipping only (sigma 0)")
    ax.set(xlabel="DP-SGD noise multiplier sigma", ylabel="avg SSIM / accuracy", title="DP-SGD", ylim=(0, 1.05))
    ax = axes[1]
    wd = sorted((r for r in rows if r["defence"] == "weight_decay"), key=lambda r: r["strength"])
    if wd:
        ax.semilogx([r["strength"] for r in wd], [r["avg_ssim"] for r in wd], "o-")
    ax.set(xlabel="weight decay", title="weight decay", ylim=(0, 1.05))
    ax = axes[2]
    others = [r for r in rows if r["defence"] in ("augment", "label_smoothing")]
    ax.bar(range(len(others)), [r["avg_ssim"] for r in others])
    ax.set_xticks(range(len(others)), [f"{r['defence'].replace('label_smoothing', 'smooth')}\n{strength_text(r)}"
                                       for r in others], fontsize=8)
    ax.set(title="augmentation, label smoothing", ylim=(0, 1.05))
    for ax in axes:
        if undefended is not None:
            ax.axhline(undefended, color="k", lw=0.8, label="undefended")
        ax.axhline(0.2, color="r", lw=0.5, ls="--")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def grids(rows, path, n_images):
    """Row 0: the first n training images; then each row's matched reconstructions of the same images."""
    tiles, names = [], []
    for r in rows:
        matched = torch.load(os.path.join(ROOT, r["matched"], "matched.pth"))
        order = matched["train_index"].argsort()[:n_images]
        if not tiles:
            tiles.append(denormalise(matched["train"][order], matched["mean"], matched["std"]))
            names.append("training images")
        tiles.append(denormalise(matched["recons"][order], matched["mean"], matched["std"]))
        names.append(f"{r['defence']} {strength_text(r)}  SSIM {r['avg_ssim']:.2f}")
    rows_img = [torch.cat(list(t), dim=-1) for t in tiles]  # each C×H×(n W)
    picture = torch.cat(rows_img, dim=-2)
    h = tiles[0].shape[-2]
    fig, ax = plt.subplots(figsize=(3 + 0.6 * n_images, 0.6 * len(tiles)))
    ax.imshow(picture.permute(1, 2, 0).squeeze(-1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks([h * (i + 0.5) for i in range(len(tiles))], names, fontsize=7)
    ax.set_xticks([])
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(args):
    rows = []
    for defence, strength, flags in planned_rows(args):
        row = None if args.rerun else load_row(args, defence, strength)
        if row is None and not args.table:
            row = run_row(args, defence, strength, flags)
        if row is not None:
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "matched"}), flush=True)
    if not rows:
        sys.exit("error: no audit rows have run yet; run without --table first")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    plot(rows, args.out + ".png")
    grids(rows, args.out + "_grids.png", args.grid_images)
    print("\n" + table(rows) + "\n\n" + where_it_stops(rows))
    print(f"written: {args.out}.json, {args.out}.png, {args.out}_grids.png;"
          f" {sum(r['seconds'] for r in rows) / 60:.1f} min of runs")
    return rows


if __name__ == "__main__":
    main(parse_args())
