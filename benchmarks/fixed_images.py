"""Which images limit a reconstruction? (issue 12, session 27)

SimuDy with the training images whose part of theta0 - theta_final (simudy.exposure.image_shares) is below
--part held fixed for the whole run, at the truth (--fix truth) or at the never-trained pool images of their
class that theta0 fits best (--fix fitted: objective.py --swap_part's third kind, what an attacker with public
data of the same kind could put there), and the others from recons.py's noise start; every dummy has its
training image's label. The rest is recons.py's run, from the flags after `--` (they must name --train_dir
and --recons_dir; --resume and --max_minutes work as there; the run folder also gets fixed_images.json: which
dummies were held, at what). If the images the change holds came back
better here than in a plain run, the free dummies' errors on the other images would be what stops them; if
not, what stops them is in their own part of the objective.

At the end it prints, per snapshot of this run and of each --compare run (plain recons.py runs on the same
training): the paper's average SSIM, the mean SSIM of the images with a part >= --part (each matched as
metrics.py matches, over all dummies) and how many of them reach 0.4.

    python benchmarks/fixed_images.py --fix truth --compare benchmarks/runs/D24/rec_base -- \
      --dataset fashion_mnist --model_name resnet18 --width 16 --num_imgs_per_class 2 --bs 20 --tlr 1e-2 \
      --preset resnet --steps 8 --rec_steps_per_epoch 325 --train_dir benchmarks/runs/D24 \
      --recons_dir benchmarks/runs/D24/rec_fixed_truth
"""
import argparse
import json
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import recons  # noqa: E402
from simudy.api import reconstruct_from_args  # noqa: E402
from simudy.exposure import class_pools, image_shares  # noqa: E402
from simudy.flags import pick_device, set_seed  # noqa: E402
from simudy.method import initial_dummies  # noqa: E402
from simudy.runs import CONFIG, TRAIN_SUBSET, list_snapshots, resolve_run, write_json  # noqa: E402
from simudy.scoring import matched_ssim, ssim_matrix  # noqa: E402
from simudy.target import load_training_run  # noqa: E402
from utils import run_main  # noqa: E402

HELD_RECORD = "fixed_images.json"  # in the run folder, beside recons.py's config.json
RECOGNISED = 0.4  # a matched SSIM a person tells apart (benchmarks/README.md, the D tables' ">= 0.4")


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    own, flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fix", choices=["truth", "fitted"], required=True,
                   help="hold the small-part images at the truth, or at the pool images theta0 fits best")
    p.add_argument("--part", type=float, default=0.2, help="images with a part of the change below this are held")
    p.add_argument("--compare", nargs="*", default=[], metavar="DIR", help="plain runs to print beside this one")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(own)
    args.recons = recons.parse_args(flags)
    if not args.recons.train_dir or not args.recons.recons_dir:
        p.error("pass recons.py's --train_dir and --recons_dir after --")
    return args


def held_images(run, x_true, y_true, held, fix, data_root):
    """The images the `held` training images are fixed at: themselves, or per class the pool images theta0 fits
    best, in order."""
    if fix == "truth":
        return x_true.clone()
    per_class = max(int((y_true[held] == c).sum()) for c in y_true.unique())
    _, by_loss, _ = class_pools(run, y_true, per_class, data_root, "pass --fix truth")
    fixed = x_true.clone()
    for c, images in by_loss.items():
        slots = ((y_true == c) & held).nonzero().flatten()
        fixed[slots] = images[:len(slots)].to(fixed)
    return fixed


def visible_curve(recons_dir, x_true, visible):
    """Per snapshot: (iteration, the paper's average SSIM, mean SSIM of the `visible` training images, how many
    of them reach RECOGNISED)."""
    with open(os.path.join(recons_dir, CONFIG)) as f:
        steps_per_epoch = json.load(f)["args"]["rec_steps_per_epoch"]
    rows = []
    for stem in list_snapshots(recons_dir):
        snap = torch.load(os.path.join(recons_dir, stem + ".pth"))
        matched = matched_ssim(ssim_matrix(x_true, snap["x"]))
        seen = matched[visible]
        rows.append((snap["epoch"] * steps_per_epoch + snap["step"], float(matched.mean()), float(seen.mean()),
                     int((seen >= RECOGNISED).sum())))
    return sorted(rows)


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    rec = args.recons
    recons.check_args(rec)
    device = pick_device(rec.device)
    set_seed(rec.seed)
    resolved = resolve_run(rec)  # as recons.py: --steps 0, the rlr/rbs and the rec_lr the preset leaves open
    rec.steps, rec.rec_lr = resolved.steps, resolved.rec_lr
    run = load_training_run(rec.train_dir, device, resolved.train_config)
    subset = torch.load(os.path.join(rec.train_dir, TRAIN_SUBSET))
    x_true, y_true = subset["images"], subset["labels"]
    shares, _ = image_shares(run, x_true.to(device), y_true.to(device))
    held = shares.cpu() < args.part
    fixed = held_images(run, x_true, y_true, held, args.fix, rec.data_root)
    print(f"{int(held.sum())} of {len(held)} images held at {args.fix} (part < {args.part:g}); free:"
          f" {(~held).nonzero().flatten().tolist()}")
    mask = held.view(-1, 1, 1, 1)
    mask_on_device, fixed_on_device = mask.to(device), fixed.to(device)  # once, not every iteration

    def hold(x):
        x.copy_(torch.where(mask_on_device, fixed_on_device, x))

    with tempfile.TemporaryDirectory() as tmp:
        if not rec.resume:  # a resumed run restores its own dummies, held ones included
            noise, _, _ = initial_dummies(len(y_true), tuple(x_true.shape[1:]), run.config["data"]["num_classes"],
                                          rec.seed, "cpu")
            rec.init_snapshot = os.path.join(tmp, "start.pth")
            torch.save({"x": torch.where(mask, fixed, noise.detach()), "labels": y_true.clone(), "epoch": 0,
                        "step": 0}, rec.init_snapshot)
        reconstruct_from_args(run, rec, device, rec.recons_dir, resolved.rlr, resolved.rbs, rec.train_dir,
                              constrain=hold)
    # config.json names a start file that is gone: say in the folder which dummies were held, and at what
    write_json(os.path.join(rec.recons_dir, HELD_RECORD), {"fix": args.fix, "part": args.part,
                                                          "held": held.nonzero().flatten().tolist()})
    curves = {d: visible_curve(d, x_true, ~held) for d in [rec.recons_dir, *args.compare]}
    print(f"\n| run | iteration | avg SSIM | part >= {args.part:g}: mean SSIM | ... >= {RECOGNISED} |\n|---|---|---|---|---|")
    for d, rows in curves.items():
        for iteration, avg, seen, count in rows:
            print(f"| {d} | {iteration} | {avg:.3f} | {seen:.3f} | {count}/{int((~held).sum())} |")
    return {"held": held, "fixed": fixed, "curves": curves}


if __name__ == "__main__":
    run_main(main, parse_args)
