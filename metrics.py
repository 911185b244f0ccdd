"""Score a reconstruction snapshot against the training subset (the paper's evaluation).

Each training image is matched to one reconstruction by SSIM (greedy as the paper code, or
Hungarian); the paper's number is the sum of matched SSIMs divided by the number of training
images. Also reports PSNR/MSE (pixel space and the paper code's normalised-space figures) and LPIPS,
and writes the matched pairs for draw_pics.py.

    python metrics.py --dataset cifar10 --num_imgs_per_class 2 --bs 20 --tlr 0.01 \
        --eval_epoch 5 --eval_step 12
"""
import argparse
import math
import os

import torch
from scipy.stats import spearmanr

from simudy.data import denormalise, images_never_trained_on
from simudy.errors import UserError
from simudy.exposure import check_shares_apply, image_shares
from simudy.flags import add_metrics_args, parse_with_preset, pick_device
from simudy.runs import (CONFIG, THETA0, TRAIN_SUBSET, list_snapshots, load_checkpoint, metrics_dir_from_args, read_json,
                         recorded_train_dir, snapshot_path_from_args, write_csv, write_json)
from simudy.scoring import (SSIM_GOOD, label_agreement, lpips_mean, match_by_ssim, nearest_in_pool, null_baseline,
                            psnr_per_pair, ssim_matrix)
from simudy.target import load_training_run, loss_per_image
from utils import run_main


def check_snapshot_exists(recons_dir, snapshot):
    if os.path.isfile(snapshot):
        return
    available = list_snapshots(recons_dir)
    raise UserError(f"snapshot {snapshot} not found; available: {', '.join(available) or 'none'};"
                    f" pick --eval_epoch/--eval_step from those (step = file's number / 100)"
                    f" or pass --snapshot NAME (with --recons_dir) or FILE")


def load_inputs(args):
    """(training subset dict, snapshot dict, snapshot path, training run folder)."""
    recons_dir, snapshot_path = snapshot_path_from_args(args)
    check_snapshot_exists(recons_dir, snapshot_path)
    config_path = os.path.join(recons_dir, CONFIG)
    train_dir = args.train_dir or recorded_train_dir(recons_dir, read_json(config_path, "reconstruction (recons.py)"))
    subset = load_checkpoint(os.path.join(train_dir, TRAIN_SUBSET), "training subset")
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
    return subset, snap, snapshot_path, train_dir


def training_run_or_none(train_dir, device, image_shares_wanted):
    """The TrainingRun behind the subset, None when the folder has no theta0 (a hand-made one); checks
    --image_shares can be computed before any slow work."""
    if not os.path.isfile(os.path.join(train_dir, THETA0)):
        if image_shares_wanted:
            raise UserError(f"--image_shares needs the training's theta0, and {train_dir} has none; point"
                            f" --train_dir at train.py's run folder or drop --image_shares")
        return None
    run = load_training_run(train_dir, device)
    if image_shares_wanted:
        check_shares_apply(run.config["args"])
    return run


def exact_mean(values):
    """The mean, exactly rounded (math.fsum), so the same on every CPU: a float32 tensor's .mean() sums in
    an order its vector kernels choose, and its last bits differ between machines (tests/test_reference.py)."""
    return math.fsum(values.tolist()) / len(values) if len(values) else float("nan")


def ssim_by_theta0_loss(ssim_per_train, loss):
    """How the SSIM of each training image (0 when unmatched) goes with its loss at theta0: the mean SSIM
    of the images above the median loss (those the training had to teach) and of the rest, and Spearman's
    rank correlation."""
    if loss is None:
        return None
    high = loss > loss.median()
    rho = spearmanr(ssim_per_train.numpy(), loss.numpy()).statistic if len(loss) > 2 else float("nan")
    return {"spearman": float(rho), "ssim_high_loss": exact_mean(ssim_per_train[high]),
            "ssim_low_loss": exact_mean(ssim_per_train[~high]),
            "median_loss": round(float(loss.median()), 6)}  # a label: not the kernels' last bits


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
    parser.add_argument("--image_shares", action="store_true",
                        help="also each training image's part of theta0 - theta_final (the training replayed"
                             " image by image: ~the training's cost per image; README, 'Which images come back')")
    parser.add_argument("--null_pool", default=0, type=int, metavar="K",
                        help="also score K images per class that the network never trained on (the training's"
                             " dataset, outside its subset and theta0's pretraining): the average SSIM of such"
                             " images matched as if they were reconstructions (the null baseline), and how many"
                             " reconstructions are nearer their training image than every pool image (README,"
                             " 'Is an SSIM evidence of memory?')")
    return parse_with_preset(parser, argv)


def memory_test(args, train_dir, train, labels, recons, matched_ssim, recon_idx, device):
    """--null_pool's numbers (None without it): the null baseline and, per matched pair, the reconstruction's
    highest SSIM to a pool image and whether its training image beats it."""
    if not args.null_pool:
        return None, None
    pool, pool_labels, note = images_never_trained_on(read_json(os.path.join(train_dir, CONFIG), "training run"),
                                                      args.data_root, args.null_pool)
    if note:
        print(f"note: {note}")
    null = null_baseline(ssim_matrix(train.to(device), pool.to(device)).cpu(), labels, pool_labels, args.matching)
    nearest, nearer = nearest_in_pool(matched_ssim, ssim_matrix(pool.to(device), recons[recon_idx].to(device)).cpu())
    return {"per_class": args.null_pool, "pool_size": len(pool), "note": note,
            "null_ssim": None if null is None else null[0], "null_ssim_range": None if null is None else null[1:],
            "nearer_than_pool": int(nearer.sum()), "matched": len(nearer)}, (nearest, nearer)


def main(args):
    if args.null_pool < 0:
        raise UserError(f"--null_pool {args.null_pool} must be >= 0 (images per class; 0: off)")
    device = pick_device(args.device)
    subset, snap, snapshot_path, train_dir = load_inputs(args)
    run = training_run_or_none(train_dir, device, args.image_shares)
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
    train_on_device, labels_on_device = train.to(device), subset["labels"].to(device)
    loss0 = None if run is None else loss_per_image(run, train_on_device, labels_on_device).cpu()
    shares = (None if not args.image_shares else
              [t.cpu() for t in image_shares(run, train_on_device, labels_on_device)])
    ssim_per_train = torch.zeros(n_train).index_put_((train_idx,), matched_ssim.float())
    memory, pool_test = memory_test(args, train_dir, train, subset["labels"], recons, matched_ssim, recon_idx,
                                    device)
    nearest_pool, nearer_pool = (None, None) if pool_test is None else pool_test

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
        # share of matched pairs whose dummy's label is the training image's (None: no labels saved)
        "label_agreement": label_agreement(subset["labels"], recon_labels, pairs),
        # which images come back: those theta0 got wrong (high loss), or all alike (None: no theta0)
        "ssim_by_theta0_loss": ssim_by_theta0_loss(ssim_per_train, loss0),
        "spearman_ssim_share": None if shares is None else float(spearmanr(ssim_per_train, shares[0]).statistic),
        **({} if memory is None else {"null_pool": memory}),
    }

    os.makedirs(out_dir, exist_ok=True)
    for sub in ("ori", "recover"):  # drop a previous run's images so none are stale
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
        for name in os.listdir(os.path.join(out_dir, sub)):
            if name.endswith(".png"):
                os.remove(os.path.join(out_dir, sub, name))
    write_outputs(out_dir, metrics, subset, pairs, matched_ssim, psnr_px, recon_labels, recon_ids,
                  train_px, recons_px, loss0, shares, nearest_pool)
    torch.save({"train": train_m, "recons": recons_m, "ssim": matched_ssim.float(),
                "train_index": train_idx, "recon_index": recon_ids[recon_idx],
                "mean": mean, "std": std, "matching": args.matching, "snapshot": snapshot_path,
                **({} if nearer_pool is None else {"nearer_than_pool": nearer_pool})},  # draw_pics.py frames them
               os.path.join(out_dir, "matched.pth"))
    return metrics


def write_outputs(out_dir, metrics, subset, pairs, matched_ssim, psnr_px, recon_labels, recon_ids,
                  train_px, recons_px, loss0, shares, nearest_pool=None):
    from torchvision.utils import save_image
    write_json(os.path.join(out_dir, "metrics.json"), metrics)
    rows = [{"train_index": i, "dataset_index": int(subset["indices"][i]),
             "label": int(subset["labels"][i]), "recon_index": "", "recon_label": "",
             "ssim": "", "psnr": "", "loss_theta0": "" if loss0 is None else f"{float(loss0[i]):.6f}",
             "share": "" if shares is None else f"{float(shares[0][i]):.6f}",
             "share_cos": "" if shares is None else f"{float(shares[1][i]):.6f}"}
            for i in range(metrics["n_train"])]
    for k, (t, r) in enumerate(pairs):
        rows[t].update(recon_index=int(recon_ids[r]), ssim=f"{float(matched_ssim[k]):.6f}",
                       psnr=f"{float(psnr_px[k]):.4f}",
                       recon_label="" if recon_labels is None else int(recon_labels[r]))
        if nearest_pool is not None:
            rows[t]["nearest_pool_ssim"] = f"{float(nearest_pool[k]):.6f}"
    write_csv(os.path.join(out_dir, "per_image.csv"), rows,
              ["train_index", "dataset_index", "recon_index", "label", "recon_label", "ssim", "psnr",
               "loss_theta0", "share", "share_cos"] + ([] if nearest_pool is None else ["nearest_pool_ssim"]))
    for k in range(len(pairs)):
        save_image(train_px[k], os.path.join(out_dir, "ori", f"{k}.png"))
        save_image(recons_px[k], os.path.join(out_dir, "recover", f"{k}.png"))
    n_good = round(metrics[f"share_ssim_ge_{SSIM_GOOD}"] * metrics["n_train"])
    lpips_text = metrics["lpips"] if isinstance(metrics["lpips"], str) else f"{metrics['lpips']:.4f}"
    by_loss = metrics["ssim_by_theta0_loss"]
    by_loss_text = ("unknown (no theta0 in the training run)" if by_loss is None else
                    f"mean SSIM {by_loss['ssim_high_loss']:.3f} for the half theta0 got most wrong (loss >"
                    f" {by_loss['median_loss']:.3g}), {by_loss['ssim_low_loss']:.3f} for the half it already fitted"
                    f" (Spearman {by_loss['spearman']:.2f})")
    summary = "\n".join([
        f"snapshot: {metrics['snapshot']}",
        f"avg SSIM (paper: matched sum / {metrics['n_train']} training images, {metrics['matching']}"
        f" matching, {metrics['n_recons']} reconstructions): {metrics['avg_ssim']:.4f}",
        f"training images matched with SSIM >= {SSIM_GOOD}: {n_good}/{metrics['n_train']}"
        f" ({100 * metrics[f'share_ssim_ge_{SSIM_GOOD}']:.1f}%)",
        f"PSNR [0,1] pixels: {metrics['psnr']:.2f} dB (paper code, normalised tensors:"
        f" {metrics['psnr_normalised_paper']:.2f} dB)",
        f"LPIPS (AlexNet): {lpips_text}",
        "matched pairs whose reconstruction has the training image's label: "
        + ("unknown (no labels in the snapshot)" if metrics["label_agreement"] is None
           else f"{100 * metrics['label_agreement']:.1f}%"),
        f"SSIM by the training image's loss at theta0: {by_loss_text}",
        *([] if metrics["spearman_ssim_share"] is None else
          [f"SSIM by the training image's part of theta0 - theta_final (--image_shares): Spearman"
           f" {metrics['spearman_ssim_share']:.2f}"]),
        *([] if "null_pool" not in metrics else [null_pool_text(metrics["null_pool"], metrics["n_train"])]),
        f"written to: {out_dir}",
    ])
    with open(os.path.join(out_dir, "summary.txt"), "w") as f:
        f.write(summary + "\n")
    print(summary)


def null_pool_text(memory, n_train):
    null = ("no class has enough pool images" if memory["null_ssim"] is None else
            f"{memory['null_ssim']:.4f} ({memory['null_ssim_range'][0]:.3f}-{memory['null_ssim_range'][1]:.3f} over"
            f" draws)")
    return (f"images never trained on ({memory['pool_size']}, --null_pool {memory['per_class']}): matched as if they"
            f" were reconstructions, avg SSIM {null}; reconstructions nearer their training image than every pool"
            f" image: {memory['nearer_than_pool']}/{n_train}")


if __name__ == "__main__":
    run_main(main, parse_args)
