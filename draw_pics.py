"""Draw the paper's Figure 1 (reconstructions above their matched training images) and the loss curve.

Reads matched.pth written by metrics.py with the same flags:

    python metrics.py   --eval_epoch 5 --eval_step 12 ...
    python draw_pics.py --eval_epoch 5 --eval_step 12 ...
"""
import argparse
import csv
import math
import os

import torch
import torch.nn.functional as F

from simudy.data import denormalise
from simudy.errors import UserError
from simudy.flags import add_metrics_args, parse_with_preset
from simudy.runs import LOG, load_checkpoint, metrics_dir_from_args, snapshot_path_from_args
from utils import run_main


def figure_rows(recons, train, per_row):
    """Rows of `per_row` reconstructions, each followed by the row of their training images.

    A short last row is filled with blank (white) tiles so the pairs stay aligned in the grid.
    """
    tiles = []
    for s in range(0, len(train), per_row):
        for block in (recons[s:s + per_row], train[s:s + per_row]):
            blank = torch.ones(per_row - len(block), *block.shape[1:], dtype=block.dtype)
            tiles.append(torch.cat([block, blank]))
    return torch.cat(tiles)


MIN_TILE_PX = 96  # --scale 0: enlarge small images until a tile is at least this many pixels high


def tile_scale(scale, height):
    """--scale, or (0) the smallest whole factor that makes an image at least MIN_TILE_PX high."""
    return scale if scale else max(1, math.ceil(MIN_TILE_PX / height))


FRAME = (0.0, 0.8, 0.0)  # the colour around a reconstruction nearer its training image than every pool image


def framed(images, marked, width):
    """RGB copies of images (N×C×H×W, C = 1 or 3) with a `width`-pixel FRAME around those marked."""
    rgb = images.expand(-1, 3, -1, -1).clone()
    colour = torch.tensor(FRAME).view(3, 1, 1)
    for i in marked.nonzero().flatten().tolist():
        for edge in (slice(0, width), slice(-width, None)):
            rgb[i, :, edge, :] = colour
            rgb[i, :, :, edge] = colour
    return rgb


def draw_reconstruction(matched, sort, per_row, path, scale=1):
    """The Figure 1 grid; each image enlarged `scale` times by nearest neighbour (pixels stay pixels). With
    metrics.py --null_pool, the reconstructions nearer their training image than every image never trained
    on are framed in green: the ones that show their image, not their class."""
    from torchvision.utils import save_image
    order = torch.arange(len(matched["train"]))
    if sort == "ssim":
        order = torch.argsort(matched["ssim"], descending=True, stable=True)
    train = denormalise(matched["train"][order].float(), matched["mean"], matched["std"])
    recons = denormalise(matched["recons"][order].float(), matched["mean"], matched["std"])
    if scale > 1:
        train, recons = (F.interpolate(t, scale_factor=scale, mode="nearest") for t in (train, recons))
    if "nearer_than_pool" in matched:
        recons = framed(recons, matched["nearer_than_pool"][order], max(1, scale))
        train = train.expand(-1, 3, -1, -1)
    grid = figure_rows(recons, train, per_row)
    save_image(grid, path, nrow=per_row, padding=2, pad_value=1.0)
    return path


def read_loss_log(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    try:
        return {key: [float(r[key]) for r in rows] for key in ("iteration", "total", "cos")}
    except (KeyError, ValueError) as err:
        raise UserError(f"{path} lacks a numeric column ({err}); it should be recons.py's log.csv"
                        f" with iteration,total,cos columns") from None


def draw_loss_curve(log_path, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    log = read_loss_log(log_path)
    if not log["iteration"]:
        print(f"note: {log_path} has no rows yet; no loss curve drawn")
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(log["iteration"], log["total"], label="total")
    ax.plot(log["iteration"], log["cos"], label="cos")
    ax.set_yscale("log")  # losses fall over orders of magnitude
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_metrics_args(parser)
    g = parser.add_argument_group("figure")
    g.add_argument("--sort", default="none", choices=["none", "ssim"],
                   help="none = training-subset order; ssim = best-matched pairs first")
    g.add_argument("--per_row", default=10, type=int, help="images per row")
    g.add_argument("--scale", default=0, type=int,
                   help=f"enlarge each image this many times (nearest neighbour); 0 = enough for"
                        f" {MIN_TILE_PX} px (3x for 32 px CIFAR, 4x for 28 px Fashion-MNIST)")
    return parse_with_preset(parser, argv)


def main(args):
    if args.per_row < 1 or args.scale < 0:
        raise UserError(f"--per_row must be at least 1 and --scale at least 0 (got {args.per_row}, {args.scale})")
    out_dir = metrics_dir_from_args(args)
    matched_path = os.path.join(out_dir, "matched.pth")
    if not os.path.isfile(matched_path):
        raise UserError(f"{matched_path} not found; run metrics.py with the same flags first")
    matched = load_checkpoint(matched_path, "matched pairs")
    if matched.get("matching", args.matching) != args.matching:
        raise UserError(f"{matched_path} holds {matched['matching']} matching; run metrics.py with"
                        f" --matching {args.matching} first, or draw with --matching"
                        f" {matched['matching']}")
    if len(matched["train"]) == 0:
        raise UserError(f"{matched_path} has no matched pairs; the snapshot had no reconstructions")

    scale = tile_scale(args.scale, matched["train"].shape[-2])
    paths = [draw_reconstruction(matched, args.sort, args.per_row, os.path.join(out_dir, "reconstruction.png"),
                                 scale)]
    log_path = os.path.join(snapshot_path_from_args(args)[0], LOG)
    if os.path.isfile(log_path):
        curve = draw_loss_curve(log_path, os.path.join(out_dir, "loss_curve.png"))
        paths += [curve] if curve else []
    else:
        print(f"note: {log_path} not found; no loss curve drawn")
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    run_main(main, parse_args)
