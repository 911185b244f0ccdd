"""Stage 1: fine-tune a model from known parameters theta0 on a small class-balanced subset.

Plain mini-batch SGD over the first k images per class, in dataset order (shuffle=False), BatchNorm in
eval mode, 20 epochs (the paper code). Writes a run folder with theta0, theta_final, the subset and
config.json; recons.py reads it.

    python ./train.py --num_imgs_per_class 2 --lr 1e-2 --bs 20
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models import build_model, uses_batchnorm
from simudy.data import load_dataset, load_subset, pretraining_indices
from simudy.defences import Defence
from simudy.errors import UserError
from simudy.flags import (add_data_args, add_model_args, add_runtime_args, add_training_hparam_args, pick_device,
                          set_seed)
from simudy.runs import (CONFIG, THETA0, THETA_FINAL, TRAIN_SUBSET, library_versions, load_checkpoint,
                         prepare_run_dir, pretrained_cache_path, pretraining_record_path, read_json,
                         train_dir_from_args, write_json)
from utils import run_main

PAPER_PRETRAINED = "./models/pretrained.pth"  # the paper's (unpublished) theta0 for ResNet-18/CIFAR-10


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_hparam_args(p, "--lr")
    add_model_args(p)
    add_data_args(p)
    add_runtime_args(p)
    g = p.add_argument_group("training")
    g.add_argument("--epochs", default=20, type=int, help="real training epochs (paper code: 20)")
    g.add_argument("--momentum", default=0.0, type=float, help="SGD momentum (paper code: 0)")
    g.add_argument("--weight_decay", default=0.0, type=float)
    g.add_argument("--bn_mode", default="eval", choices=["eval", "train"],
                   help="BatchNorm mode during training (paper code: eval)")
    g.add_argument("--run_dir", default=None, help="output folder; default derived from the flags")
    g = p.add_argument_group("theta0 (initial parameters)")
    g.add_argument("--init", default="auto", choices=["auto", "pretrained", "random"],
                   help="auto: ResNets start pretrained, MLPs random (as the paper)")
    g.add_argument("--pretrained", default=None,
                   help=f"theta0 file; default {PAPER_PRETRAINED} if it fits, else a cached pretraining")
    g.add_argument("--pretrain_imgs", default=500, type=int,
                   help="images per class for pretraining, disjoint from the fine-tuning subset")
    g.add_argument("--pretrain_epochs", default=15, type=int)
    g.add_argument("--pretrain_lr", default=0.05, type=float)
    g.add_argument("--pretrain_bs", default=128, type=int)
    return p.parse_args(argv)


def sgd_train(model, images, labels, lr, bs, epochs, momentum=0.0, weight_decay=0.0, bn_mode="eval",
              progress=True, defence=None):
    """Plain mini-batch SGD in a fixed order (shuffle=False), as the paper's train.py. Returns history.
    With a Defence: label smoothing, seeded augmentation of each batch, and DP-SGD through Opacus (its
    per-image clipping and noise; batches stay the fixed ones); its privacy report is in defence.report."""
    defence = defence or Defence()
    model.train(bn_mode == "train")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if defence.dp:
        model, opt = defence.make_private(model, opt, images, labels, bs, epochs)
    history = []
    for epoch in tqdm(range(epochs), desc="train", disable=None if progress else True):
        total_loss, correct = 0.0, 0
        for x, y in zip(images.split(bs), labels.split(bs)):
            out = model(defence.augment_batch(x))
            loss = F.cross_entropy(out, y, label_smoothing=defence.label_smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total_loss += loss.item() * len(y)
            correct += (out.argmax(1) == y).sum().item()
        history.append({"epoch": epoch, "loss": total_loss / len(labels), "acc": correct / len(labels)})
    return history


def pretrain(model, args, subset_indices, device):
    """Make a theta0 for ResNets: train on images of the same dataset disjoint from the subset.

    The paper fine-tunes from an unpublished models/pretrained.pth. A ResNet from random init with
    eval-mode BatchNorm does not learn in 20 steps (loss stays 2.30), so we pretrain, with train-mode
    BN (to learn its running statistics), random crops and flips, momentum 0.9 and a cosine schedule.
    """
    data = load_subset(args.dataset, args.data_root, args.pretrain_imgs, 0, exclude=subset_indices,
                       strict=False)
    x, y = data["images"].to(device), data["labels"].to(device)
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.SGD(model.parameters(), lr=args.pretrain_lr, momentum=0.9, weight_decay=5e-4)
    steps = args.pretrain_epochs * ((len(y) + args.pretrain_bs - 1) // args.pretrain_bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.pretrain_lr, total_steps=steps)
    model.train()
    pad = 4 if x.shape[-1] >= 32 else 2
    for epoch in tqdm(range(args.pretrain_epochs), desc="pretrain theta0", disable=None):
        order = torch.randperm(len(y), generator=gen).to(device)
        for idx in order.split(args.pretrain_bs):
            xb = F.pad(x[idx], [pad] * 4, mode="reflect")
            i, j = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
            xb = xb[..., i:i + x.shape[-2], j:j + x.shape[-1]]
            if torch.rand(1, generator=gen).item() < 0.5:
                xb = xb.flip(-1)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    return {"pretrain_images": len(y), "pretrain_train_acc": acc}


def load_state_into(model, path, what):
    state = load_checkpoint(path, what)
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise UserError(f"{what} {path} does not fit --model_name/--width/--dataset of this run;"
                        f" pass the matching flags or another --pretrained file") from None


def make_theta0(model, args, subset_indices, num_classes, device):
    """Set the model to theta0; returns a note on where it came from (saved in config.json)."""
    init = args.init
    if init == "auto":
        init = "pretrained" if uses_batchnorm(args.model_name) else "random"
    if init == "random":
        return {"theta0": "random init (seeded)", "theta0_data": None}
    if args.pretrained:
        load_state_into(model, args.pretrained, "--pretrained file")
        return {"theta0": args.pretrained, "theta0_data": None}  # its data is not known here
    if os.path.isfile(PAPER_PRETRAINED):
        try:
            model.load_state_dict(torch.load(PAPER_PRETRAINED, map_location="cpu"))
            return {"theta0": PAPER_PRETRAINED, "theta0_data": None}
        except RuntimeError:
            pass  # the paper's file is for another architecture; fall through to our pretraining
    loaded, cache = load_cached_pretraining(model, args, subset_indices, num_classes)
    if loaded:
        return loaded
    model.to(device)
    info = pretrain(model, args, subset_indices, device)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    # theta0_data: which images the pretraining used, so that no later subset is one theta0 already saw
    # (the cache's name does not hold the subset) and metrics.py --null_pool skips exactly those. Written
    # first: a record without its cache is harmless, a cache without its record is not checked.
    record = {"dataset": args.dataset, "images_per_class": args.pretrain_imgs, "excluded": sorted(subset_indices)}
    write_json(pretraining_record_path(cache), record)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, cache)
    print(f"pretrained theta0 saved to {cache} (train acc {info['pretrain_train_acc']:.3f})")
    return {"theta0": cache, "theta0_data": record, **info}


def load_cached_pretraining(model, args, subset_indices, num_classes):
    """(theta0 info, cache) with a cached pretraining loaded into the model, or (None, the path to pretrain
    into). A cache whose pretraining used an image of this subset (made for a smaller --num_imgs_per_class,
    say) is not loaded: the subset gets a cache of its own."""
    cache = pretrained_cache_path(args)
    if not os.path.isfile(cache):
        return None, cache
    record_path = pretraining_record_path(cache)
    if not os.path.isfile(record_path):
        print(f"note: the cached theta0 {cache} has no record of its pretraining images (made before"
              f" train.py kept one); delete it to pretrain anew with a record")
        load_state_into(model, cache, "cached pretraining")
        return {"theta0": cache}, cache
    record = read_json(record_path)
    _, targets, _ = load_dataset(args.dataset, args.data_root)
    seen = set(subset_indices) & set(pretraining_indices(targets, num_classes, record))
    if seen:
        cache = pretrained_cache_path(args, excluded=subset_indices)
        print(f"the shared cached theta0 was pretrained on {len(seen)} of this subset's images;"
              f" using one pretrained without them: {cache}")
        if not os.path.isfile(cache):
            return None, cache
        record = read_json(pretraining_record_path(cache))
    load_state_into(model, cache, "cached pretraining")
    return {"theta0": cache, "theta0_data": record}, cache


def main(args):
    defence = Defence.from_args(args)  # its flag errors come before any data is read
    device = pick_device(args.device)
    set_seed(args.seed)
    run_dir = args.run_dir or train_dir_from_args(args, args.lr)
    subset = load_subset(args.dataset, args.data_root, args.num_imgs_per_class, args.offset)
    image_shape = list(subset["images"].shape[1:])
    model = build_model(args.model_name, subset["num_classes"], image_shape, args.width)
    prepare_run_dir(run_dir, args.overwrite)  # before a possibly long pretraining
    theta0_info = make_theta0(model, args, subset["indices"].tolist(), subset["num_classes"], device)

    model.to(device)
    theta0 = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    start = time.time()
    history = sgd_train(model, subset["images"].to(device), subset["labels"].to(device), args.lr, args.bs,
                        args.epochs, args.momentum, args.weight_decay, args.bn_mode, defence=defence)
    theta_final = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if not all(torch.isfinite(v).all() for v in theta_final.values() if v.is_floating_point()):
        if not os.listdir(run_dir):  # a diverged training leaves no run folder behind
            os.rmdir(run_dir)
        raise UserError(f"the training diverged (train loss {history[-1]['loss']}, parameters not finite) at"
                        f" --lr {args.lr:g}; lower --lr")

    torch.save(theta0, os.path.join(run_dir, THETA0))
    torch.save(theta_final, os.path.join(run_dir, THETA_FINAL))
    torch.save(subset, os.path.join(run_dir, TRAIN_SUBSET))
    config = {
        "stage": "train", "args": {**vars(args), **defence.simulated_args()}, "seed": args.seed,
        "versions": library_versions(), "defence": defence.report,
        "data": {"dataset": args.dataset, "num_classes": subset["num_classes"], "image_shape": image_shape,
                 "num_images": len(subset["labels"]), "mean": subset["mean"].tolist(),
                 "std": subset["std"].tolist(), "classes": subset["classes"]},
        "model": {"name": args.model_name, "width": args.width}, **theta0_info,
        "results": {"final_train_loss": history[-1]["loss"], "final_train_acc": history[-1]["acc"],
                    "first_epoch_loss": history[0]["loss"], "seconds": time.time() - start},
        "history": history,
    }
    write_json(os.path.join(run_dir, CONFIG), config)
    print(f"trained {args.model_name} on {len(subset['labels'])} {args.dataset} images:"
          f" loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f},"
          f" acc {history[-1]['acc']:.3f}; run folder {run_dir}")
    if defence.dp:
        print(defence.privacy_summary())
    return run_dir


if __name__ == "__main__":
    run_main(main, parse_args)
