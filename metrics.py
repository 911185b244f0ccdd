"""Score a reconstruction snapshot against the training subset (the paper's evaluation).

Each training image is matched to one reconstruction by SSIM (greedy as the paper code, or
Hungarian); the paper's number is the sum of matched SSIMs divided by the number of training
images. Also reports PSNR/MSE (pixel space and the paper code's normalised-space figures) and LPIPS,
and writes the matched pairs for draw_pics.py.

    python metrics.py --dataset cifar10 --num_imgs_per_class 2 --bs 20 --tlr 0.01 \
        --eval_epoch 5 --eval_step 12
"""
import argparse
import os
import re
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from utils import (UserError, add_data_args, add_eval_args, add_model_args, add_recons_id_args,
                   add_runtime_args, add_training_hparam_args, denormalise, load_checkpoint,
                   parse_with_preset, pick_device, read_json, recons_dir_from_args, run_main, write_csv,
                   write_json)

SSIM_WINDOW = 7  # skimage's default win_size
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_GOOD = 0.4  # the paper's "well reconstructed" threshold
ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet file, which LPIPS builds on
METHOD_OF_LINEAR = {0: "simudy", 1: "one_step", 2: "two_step"}


# ----------------------------------------------------------------------------------------------
# SSIM and matching


def _box_mean(t):
    """7×7 mean over the 'valid' region of N×C×H×W; separable (two 1-D pools) because it is 3×
    faster than a 2-D pool. skimage reflect-pads then crops 3 pixels, which is exactly this region."""
    return F.avg_pool2d(F.avg_pool2d(t, (SSIM_WINDOW, 1), stride=1), (1, SSIM_WINDOW), stride=1)


def ssim_matrix(train_images, recons, max_elements=2 ** 22):
    """SSIM of every training image (N×C×H×W) with every reconstruction (M×C×H×W) -> float64 N×M.

    Equals skimage's structural_similarity defaults with channel_axis and data_range = the training
    image's max - min, as the paper code calls it on normalised images.
    """
    x, y = train_images.double(), recons.double()
    n_train, n_recons = len(x), len(y)
    cov_norm = SSIM_WINDOW ** 2 / (SSIM_WINDOW ** 2 - 1)  # skimage's sample covariance
    ux, uy = _box_mean(x), _box_mean(y)
    vx = cov_norm * (_box_mean(x * x) - ux * ux)
    vy = cov_norm * (_box_mean(y * y) - uy * uy)
    data_range = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(-1, 1, 1, 1, 1)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    out = torch.empty(n_train, n_recons, dtype=torch.float64, device=x.device)
    # Only the cross term needs all pairs; chunk over training images to bound memory.
    chunk = max(1, max_elements // y.numel())
    for s in range(0, n_train, chunk):
        xs, ux_s, vx_s = x[s:s + chunk, None], ux[s:s + chunk, None], vx[s:s + chunk, None]
        uxy = _box_mean((xs * y[None]).flatten(0, 1)).view(len(xs), n_recons, *uy.shape[1:])
        vxy = cov_norm * (uxy - ux_s * uy[None])
        num = (2 * ux_s * uy[None] + c1[s:s + chunk]) * (2 * vxy + c2[s:s + chunk])
        den = (ux_s ** 2 + uy[None] ** 2 + c1[s:s + chunk]) * (vx_s + vy[None] + c2[s:s + chunk])
        out[s:s + chunk] = (num / den).mean(dim=(2, 3, 4))  # channels are the same size: mean of means
    return out


def match_by_ssim(ssim, method="greedy"):
    """Pairs (train_idx, recon_idx), one per reconstruction or training image, whichever is fewer.

    greedy (paper): repeatedly take the largest remaining SSIM and drop its row and column.
    hungarian: the assignment maximising the total SSIM.
    """
    ssim = torch.as_tensor(ssim).cpu().numpy()
    if method == "hungarian":
        rows, cols = linear_sum_assignment(ssim, maximize=True)
        return [(int(r), int(c)) for r, c in zip(rows, cols)]
    if method != "greedy":
        raise UserError(f"unknown matching {method!r}; use greedy or hungarian")
    order = np.argsort(-ssim, axis=None, kind="stable")  # ties: first in row-major order, as the loop
    used_rows, used_cols, pairs = set(), set(), []
    rows, cols = np.unravel_index(order, ssim.shape)
    for r, c in zip(rows.tolist(), cols.tolist()):
        if r not in used_rows and c not in used_cols:
            used_rows.add(r)
            used_cols.add(c)
            pairs.append((r, c))
            if len(pairs) == min(ssim.shape):
                break
    return pairs


# ----------------------------------------------------------------------------------------------
# PSNR / LPIPS


PSNR_MSE_FLOOR = 1e-10  # identical images: PSNR capped at 100 dB (peak 1), so metrics.json stays JSON


def psnr_per_pair(a, b, peak=1.0):
    """Per-image MSE and PSNR of two K×C×H×W tensors (capped at 100 dB for identical images)."""
    mse = F.mse_loss(a.double(), b.double(), reduction="none").flatten(1).mean(1)
    return mse, 10 * torch.log10(peak ** 2 / mse.clamp_min(PSNR_MSE_FLOOR))


def load_lpips(device):
    """(AlexNet LPIPS model, None) or (None, 'unavailable: <reason>'); never downloads."""
    try:
        import lpips
    except ImportError as err:
        return None, f"unavailable: lpips package not importable ({err}); pip install lpips"
    weights = os.path.join(torch.hub.get_dir(), "checkpoints", ALEXNET_WEIGHTS)
    if not os.path.isfile(weights):
        return None, f"unavailable: {weights} missing (torchvision AlexNet weights; copy it there)"
    try:
        with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=`
            warnings.simplefilter("ignore")
            # pnet_rand: build AlexNet without torchvision's download; we load the local file below.
            model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        # lpips keeps AlexNet's features as slices named slice<k>.<original index>.
        model.net.load_state_dict({k: state["features." + k.split(".", 1)[1]]
                                   for k in model.net.state_dict()})
    except Exception as err:  # a corrupt or foreign weights file must not end the evaluation
        return None, f"unavailable: could not load {weights} ({type(err).__name__}: {err})"
    return model.to(device).eval(), None


def lpips_mean(train_px, recons_px, device, batch=64):
    """Average AlexNet LPIPS of matched pairs given in [0, 1] pixel space, or 'unavailable: ...'."""
    height, width = train_px.shape[-2:]
    if min(height, width) < 31:  # AlexNet's pools shrink smaller images to nothing
        return f"unavailable: {height}x{width} images are too small for AlexNet LPIPS (needs >= 31 px)"
    model, reason = load_lpips(device)
    if model is None:
        return reason
    values = []
    with torch.no_grad():
        for s in range(0, len(train_px), batch):
            a, b = (t[s:s + batch].float().to(device) * 2 - 1 for t in (train_px, recons_px))
            if a.shape[1] == 1:
                a, b = a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)
            values.append(model(a, b).flatten().cpu())
    return float(torch.cat(values).mean())


# ----------------------------------------------------------------------------------------------
# Finding the inputs


def add_metrics_args(parser):
    """Flags shared with draw_pics.py: which reconstruction run, snapshot and matching."""
    add_data_args(parser)
    add_model_args(parser)
    add_training_hparam_args(parser, "--tlr")
    add_recons_id_args(parser)
    add_eval_args(parser)
    add_runtime_args(parser)
    g = parser.add_argument_group("metrics")
    g.add_argument("--matching", default="greedy", choices=["greedy", "hungarian"],
                   help="greedy = paper code; hungarian = best total SSIM")
    g.add_argument("--top", default=None, type=int,
                   help="score only the N first-ranked reconstructions (snapshot's 'ranking')")
    # Accepted so the paper's command lines work.
    g.add_argument("--resolution", default=None, type=int, help="ignored: shape comes from the data")
    return parser


def list_snapshots(recons_dir, pattern=r"(\d+|x)_\d+\.pth"):
    """Snapshot stems in the folder, oldest first (numeric order of epoch and step)."""
    if not os.path.isdir(recons_dir):
        raise UserError(f"reconstruction folder {recons_dir} not found; run recons.py with the same"
                        f" flags first, or pass --recons_dir / --snapshot")
    stems = [f[:-4] for f in os.listdir(recons_dir) if re.fullmatch(pattern, f)]
    return sorted(stems, key=lambda stem: [int(n) for n in re.findall(r"\d+", stem)])


def snapshot_path_from_args(args):
    """(reconstruction folder, snapshot file) named by the flags; the file need not exist.

    --snapshot last = the newest snapshot of the run the flags name (what the Makefile's demo uses).
    """
    if args.snapshot and args.snapshot != "last":
        return args.recons_dir or os.path.dirname(os.path.abspath(args.snapshot)), args.snapshot
    recons_dir = recons_dir_from_args(args, method=METHOD_OF_LINEAR[args.linear])
    prefix = str(args.eval_epoch) if args.linear == 0 else "x"  # paper code's file names
    if args.snapshot == "last":
        stems = list_snapshots(recons_dir, r"\d+_\d+\.pth" if args.linear == 0 else r"x_\d+\.pth")
        if not stems:
            raise UserError(f"no snapshots in {recons_dir}; run recons.py with the same flags first")
        return recons_dir, os.path.join(recons_dir, stems[-1] + ".pth")
    return recons_dir, os.path.join(recons_dir, f"{prefix}_{args.eval_step * 100}.pth")


def metrics_dir_from_args(args):
    recons_dir, snapshot = snapshot_path_from_args(args)
    stem = os.path.splitext(os.path.basename(snapshot))[0]
    return os.path.join(recons_dir, "metrics", stem)


def check_snapshot_exists(recons_dir, snapshot):
    if os.path.isfile(snapshot):
        return
    available = list_snapshots(recons_dir)
    raise UserError(f"snapshot {snapshot} not found; available: {', '.join(available) or 'none'};"
                    f" pick --eval_epoch/--eval_step from those (step = file's number / 100)"
                    f" or pass --snapshot")


def load_inputs(args):
    """(training subset dict, snapshot dict, snapshot path, reconstruction folder)."""
    recons_dir, snapshot_path = snapshot_path_from_args(args)
    check_snapshot_exists(recons_dir, snapshot_path)
    config_path = os.path.join(recons_dir, "config.json")
    train_dir = args.train_dir
    if not train_dir:
        train_dir = read_json(config_path, "reconstruction (recons.py)").get("train_dir")
        if not train_dir:
            raise UserError(f"{config_path} names no train_dir; pass --train_dir")
    subset = load_checkpoint(os.path.join(train_dir, "train_subset.pth"), "training subset")
    snap = load_checkpoint(snapshot_path, "snapshot")
    if torch.is_tensor(snap):
        snap = {"x": snap}
    if not isinstance(snap, dict) or "x" not in snap:
        raise UserError(f"{snapshot_path} holds no 'x' tensor of reconstructions; pass a snapshot"
                        f" written by recons.py")
    train_shape, recons_shape = tuple(subset["images"].shape[1:]), tuple(snap["x"].shape[1:])
    if train_shape != recons_shape:
        raise UserError(f"snapshot {snapshot_path} has images of shape {recons_shape} but the training"
                        f" subset in {train_dir} has {train_shape}; point --snapshot/--train_dir"
                        f" at matching runs")
    return subset, snap, snapshot_path, recons_dir


def select_top(snap, top):
    """(reconstructions, their labels or None, their indices in the snapshot)."""
    x, labels = snap["x"], snap.get("labels")
    if labels is not None and torch.as_tensor(labels).dim() > 1:  # soft labels -> their class
        labels = torch.as_tensor(labels).argmax(-1)
    order = torch.arange(len(x))
    if top is not None:
        if top < 1:
            raise UserError(f"--top {top} must be at least 1")
        if "ranking" in snap:
            order = torch.as_tensor(snap["ranking"]).long()[:top]
        else:
            print(f"note: snapshot has no 'ranking'; --top {top} scores its first {top} images")
            order = order[:top]
    return x[order], (None if labels is None else torch.as_tensor(labels)[order]), order


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_metrics_args(parser)
    return parse_with_preset(parser, argv)


def main(args):
    device = pick_device(args.device)
    subset, snap, snapshot_path, _ = load_inputs(args)
    out_dir = metrics_dir_from_args(args)
    if os.path.isfile(os.path.join(out_dir, "metrics.json")):
        print(f"replacing previous metrics in {out_dir}")
    train = subset["images"].float()
    recons, recon_labels, recon_ids = select_top(snap, args.top)
    recons = recons.detach().float()
    mean, std = subset["mean"], subset["std"]
    n_train = len(train)

    ssim = ssim_matrix(train.to(device), recons.to(device)).cpu()
    pairs = sorted(match_by_ssim(ssim, args.matching))  # in training-subset order
    train_idx = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    recon_idx = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    matched_ssim = ssim[train_idx, recon_idx]
    train_m, recons_m = train[train_idx], recons[recon_idx]
    train_px, recons_px = denormalise(train_m, mean, std), denormalise(recons_m, mean, std)
    mse_px, psnr_px = psnr_per_pair(train_px, recons_px)
    mse_norm, psnr_norm = psnr_per_pair(train_m, recons_m)  # paper code: normalised tensors, peak 1

    metrics = {
        "avg_ssim": float(matched_ssim.sum() / n_train),  # paper: unmatched images count 0
        "matching": args.matching,
        "snapshot": snapshot_path,
        "n_train": n_train,
        "n_recons": len(recons),
        f"share_ssim_ge_{SSIM_GOOD}": int((matched_ssim >= SSIM_GOOD).sum()) / n_train,
        "mse": float(mse_px.mean()),
        "psnr": float(psnr_px.mean()),
        "mse_normalised_paper": float(mse_norm.mean()),
        "psnr_normalised_paper": float(psnr_norm.mean()),
        "lpips": lpips_mean(train_px, recons_px, device),
    }

    os.makedirs(out_dir, exist_ok=True)
    for sub in ("ori", "recover"):  # drop a previous run's images so none are stale
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
        for name in os.listdir(os.path.join(out_dir, sub)):
            if name.endswith(".png"):
                os.remove(os.path.join(out_dir, sub, name))
    write_outputs(out_dir, metrics, subset, pairs, matched_ssim, psnr_px, recon_labels, recon_ids,
                  train_px, recons_px)
    torch.save({"train": train_m, "recons": recons_m, "ssim": matched_ssim.float(),
                "train_index": train_idx, "recon_index": recon_ids[recon_idx],
                "mean": mean, "std": std, "matching": args.matching, "snapshot": snapshot_path},
               os.path.join(out_dir, "matched.pth"))
    return metrics


def write_outputs(out_dir, metrics, subset, pairs, matched_ssim, psnr_px, recon_labels, recon_ids,
                  train_px, recons_px):
    from torchvision.utils import save_image
    write_json(os.path.join(out_dir, "metrics.json"), metrics)
    rows = [{"train_index": i, "dataset_index": int(subset["indices"][i]),
             "label": int(subset["labels"][i]), "recon_index": "", "recon_label": "",
             "ssim": "", "psnr": ""} for i in range(metrics["n_train"])]
    for k, (t, r) in enumerate(pairs):
        rows[t].update(recon_index=int(recon_ids[r]), ssim=f"{float(matched_ssim[k]):.6f}",
                       psnr=f"{float(psnr_px[k]):.4f}",
                       recon_label="" if recon_labels is None else int(recon_labels[r]))
    write_csv(os.path.join(out_dir, "per_image.csv"), rows,
              ["train_index", "dataset_index", "recon_index", "label", "recon_label", "ssim", "psnr"])
    for k in range(len(pairs)):
        save_image(train_px[k], os.path.join(out_dir, "ori", f"{k}.png"))
        save_image(recons_px[k], os.path.join(out_dir, "recover", f"{k}.png"))
    n_good = round(metrics[f"share_ssim_ge_{SSIM_GOOD}"] * metrics["n_train"])
    lpips_text = metrics["lpips"] if isinstance(metrics["lpips"], str) else f"{metrics['lpips']:.4f}"
    summary = "\n".join([
        f"snapshot: {metrics['snapshot']}",
        f"avg SSIM (paper: matched sum / {metrics['n_train']} training images, {metrics['matching']}"
        f" matching, {metrics['n_recons']} reconstructions): {metrics['avg_ssim']:.4f}",
        f"training images matched with SSIM >= {SSIM_GOOD}: {n_good}/{metrics['n_train']}"
        f" ({100 * metrics[f'share_ssim_ge_{SSIM_GOOD}']:.1f}%)",
        f"PSNR [0,1] pixels: {metrics['psnr']:.2f} dB (paper code, normalised tensors:"
        f" {metrics['psnr_normalised_paper']:.2f} dB)",
        f"LPIPS (AlexNet): {lpips_text}",
        f"written to: {out_dir}",
    ])
    with open(os.path.join(out_dir, "summary.txt"), "w") as f:
        f.write(summary + "\n")
    print(summary)


if __name__ == "__main__":
    run_main(main, parse_args)
