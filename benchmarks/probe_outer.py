"""Probe an outer-optimisation idea on an existing training run: SSIM against the true training images
every few iterations, without writing a reconstruction run folder.

recons.py's simulation and loss are used unchanged (unrolled pass), except with --match layer_cos;
otherwise only what moves the dummies differs: the start (noise of another scale, or the true images plus
noise), the TV weight, Adam's lr, and an optional low-resolution parameterisation for the first half of
the run (x = bilinear upsampling of a res×res image, then the full-resolution pixels). The lr follows one
cosine decay over the run (the fast preset's schedule); no clip. Labels are the true ones (the balanced
multiset recons.py draws, in order).

    python benchmarks/probe_outer.py --iters 200 --tv 2e-2            # a larger TV weight, from noise
    python benchmarks/probe_outer.py --iters 200 --res 8              # 8×8 for 100 iterations, then 32×32
    python benchmarks/probe_outer.py --iters 100 --init near:0.3      # start at the truth + 0.3·noise
    python benchmarks/probe_outer.py --iters 200 --match layer_cos    # every layer's cosine weighs the same
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from simudy.flags import pick_device  # noqa: E402
from simudy.method import cosine_distance, reconstruction_loss, simudy_optimisers, total_variation  # noqa: E402
from simudy.scoring import paper_avg_ssim  # noqa: E402
from simudy.simulate import sgd_config_from_training, simulate_training  # noqa: E402
from simudy.target import load_training_run  # noqa: E402

CONFIG_B_RUN = os.path.join(ROOT, "benchmarks", "runs", "B", "ckpts", "model_ckpt",
                            "resnet18_w16_folder_num_img20_bsz20_lr0.01")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train_dir", default=CONFIG_B_RUN, help="a train.py run folder (default: quality.py's B)")
    p.add_argument("--steps", type=int, default=8, help="simulated epochs")
    p.add_argument("--bs", type=int, default=20, help="simulation batch size")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--init", default="noise", help="noise (randn·0.5) | scale:<s> (randn·s) | near:<s> (truth + randn·s)")
    p.add_argument("--tv", type=float, default=2e-3, help="TV weight")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam lr (betas 0.8, 0.9)")
    p.add_argument("--res", type=int, default=0, help="low-resolution side for the first half (0: off)")
    p.add_argument("--match", default="cos", choices=["cos", "layer_cos"],
                   help="cos: recons.py's 1 - cos over all parameters; layer_cos: the mean over parameter"
                        " tensors of 1 - cos (every layer counts equally, conv1 as much as layer4)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--every", type=int, default=25, help="print SSIM every this many iterations")
    return p.parse_args(argv)


def layer_cos_loss(run, x, labels, bs, steps, sgd, tv_weight):
    """(total, match, tv) as recons.reconstruction_loss, with match = mean over parameter tensors of
    1 - cos(simulated change, true change)."""
    batches = list(zip(x.split(bs), labels.split(bs)))
    _, displacement, _ = simulate_training(run.model, run.theta0, run.buffers, batches, steps, sgd)
    true = run.weight_change.split([v.numel() for v in displacement.values()])
    match = sum(cosine_distance(d.reshape(-1), t) for d, t in zip(displacement.values(), true)) / len(true)
    tv = sum(total_variation(xb) for xb, _ in batches)
    return match + tv_weight * tv, match, tv


def main(args):
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    run = load_training_run(args.train_dir, device)
    subset = torch.load(os.path.join(args.train_dir, "train_subset.pth"), map_location=device)
    x_true, labels = subset["images"], subset["labels"]
    # drawn on the CPU, so every device starts from the same noise
    noise = torch.randn(x_true.shape, generator=torch.Generator().manual_seed(0)).to(device)
    kind, _, scale = args.init.partition(":")
    x0 = {"noise": lambda: noise * 0.5, "scale": lambda: noise * float(scale),
          "near": lambda: x_true + float(scale) * noise}[kind]()
    sgd = sgd_config_from_training(run.config["args"], run.config["args"]["lr"])
    side = x_true.shape[-1]
    z = (F.interpolate(x0, size=(args.res, args.res), mode="area") if args.res else x0.clone()).requires_grad_(True)

    def image():
        return F.interpolate(z, size=(side, side), mode="bilinear", align_corners=False) if z.shape[-1] != side else z

    opt, sched = simudy_optimisers(z, args.lr, "cosine", args.iters)  # recons.py's Adam, one decay
    start, curve = time.time(), []
    for i in range(args.iters + 1):
        if i % args.every == 0 or i == args.iters:
            curve.append((i, paper_avg_ssim(x_true, image().detach())))
            print(f"it {i} ssim {curve[-1][1]:.4f} t {time.time() - start:.0f}s", flush=True)
        if i == args.iters:
            break
        if args.res and i == args.iters // 2 and z.shape[-1] != side:  # switch to full-resolution pixels
            z = image().detach().requires_grad_(True)
            opt, sched = simudy_optimisers(z, args.lr, "cosine", args.iters - i)
        if args.match == "cos":
            total, match, tv = reconstruction_loss(run.model, run.theta0, run.buffers, image(), labels,
                                                   run.weight_change, args.bs, args.steps, sgd, args.tv, "cos")
        else:
            total, match, tv = layer_cos_loss(run, image(), labels, args.bs, args.steps, sgd, args.tv)
        opt.zero_grad()
        total.backward()
        opt.step()
        sched.step()
        if i % args.every == 0:
            print(f"   loss {match.item():.4f} tv {tv.item():.3f}", flush=True)
    return curve


if __name__ == "__main__":
    main(parse_args())
