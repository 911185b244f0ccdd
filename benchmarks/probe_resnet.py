"""Long, resumable probes of outer-optimisation ideas on a ResNet training run (issue 12): the SSIM of
every snapshot against the true training images, and the loss, written to a JSON curve file.

The simulation and the match loss are recons.py's, unchanged (unrolled pass). What differs is only how
the dummies move: Adam's lr and schedule (one cosine decay, or step decays x0.1 at 3/8, 5/8, 7/8 of the
run, each after an optional linear warm-up), signed gradients, a box constraint (pixels kept where
[0, 1] images land after normalisation), a BatchNorm-statistics prior from theta0's running statistics
(DeepInversion's: sum over BN layers of ||batch mean - running mean||_2 + ||batch var - running var||_2),
and the number of simulated epochs. Labels are the dummies' balanced random labels (recons.py's draw).
Session 6 added: a basin test (--start_sigma: start at the true images plus noise, with the true labels),
coarse to fine (--coarse R: R x R images upsampled for the first --coarse_iters iterations) and a
layer-wise match loss (--match layers).

    python benchmarks/probe_resnet.py --name lr0.1 --lr 0.1 --iters 1500 --max_minutes 60
    python benchmarks/probe_resnet.py --name lr0.1 --resume --max_minutes 60     # continue it
    python benchmarks/probe_resnet.py --table b20_lr0.1_cos d20_lr0.1_cos        # their curves, one table
    python benchmarks/probe_resnet.py --table b20_… b32_… --seconds_per_iteration 4.83 12.0   # at equal time
"""
import argparse
import bisect
import json
import os
import signal
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from simudy.method import (ADAM_BETAS, cosine_distance, initial_dummies, reconstruction_loss,  # noqa: E402
                           total_variation)
from simudy.scoring import paper_avg_ssim  # noqa: E402
from simudy.simulate import sgd_config_from_training, simulate_training  # noqa: E402
from simudy.target import load_training_run  # noqa: E402

CONFIG_B_RUN = os.path.join(ROOT, "benchmarks", "runs", "B", "ckpts", "model_ckpt",
                            "resnet18_w16_folder_num_img20_bsz20_lr0.01")
OUT_DIR = os.path.join(ROOT, "benchmarks", "runs", "probes")
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results", "probes")  # the curves kept in git


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", help="probe name: its files are runs/probes/<name>.{json,pth}")
    p.add_argument("--table", nargs="+", metavar="NAME",
                   help="print the SSIM curves of these probes as a markdown table (every 100 iterations) and exit")
    p.add_argument("--seconds_per_iteration", nargs="+", type=float, metavar="S",
                   help="with --table: each probe's seconds per iteration measured alone (one per name): print the"
                        " SSIM at equal wall time instead (--minutes), interpolated between snapshots")
    p.add_argument("--minutes", nargs="+", type=float, default=[10, 20, 30, 40, 60],
                   help="the wall times of the --seconds_per_iteration table")
    p.add_argument("--train_dir", default=CONFIG_B_RUN)
    p.add_argument("--steps", type=int, default=20, help="simulated epochs (0 = the training's)")
    p.add_argument("--iters", type=int, default=1500, help="iterations of the whole schedule")
    p.add_argument("--lr", type=float, default=0.1, help="Adam lr (betas 0.8, 0.9, as recons.py)")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "step", "constant"])
    p.add_argument("--warmup", type=int, default=0, help="linear lr warm-up iterations")
    p.add_argument("--signed", action="store_true", help="Adam on the sign of the gradient")
    p.add_argument("--box", action="store_true", help="clamp pixels to the normalised [0, 1] range")
    p.add_argument("--tv", type=float, default=2e-3, help="TV weight (sum over batches, as recons.py)")
    p.add_argument("--coarse", type=int, default=0,
                   help="coarse to fine: for the first --coarse_iters iterations the dummies are R x R images"
                        " upsampled (bilinear) to full size, then full-size images from there (0: off)")
    p.add_argument("--coarse_iters", type=int, default=300)
    p.add_argument("--fine_lr_scale", type=float, default=1.0,
                   help="after the coarse stage, the lr schedule times this (a gentler switch to full size)")
    p.add_argument("--match", default="global", choices=["global", "layers"],
                   help="global: recons.py's 1 - cos of the whole parameter change; layers: the mean over"
                        " parameter tensors of each tensor's 1 - cos (every layer weighs the same)")
    p.add_argument("--bn_prior", type=float, default=0.0, help="weight of the BN-statistics prior")
    p.add_argument("--bn_prior_until", type=float, default=1.0, help="share of the run with the prior on")
    p.add_argument("--init_scale", type=float, default=0.5)
    p.add_argument("--start_sigma", type=float, default=None,
                   help="basin test: start at the true images plus this much Gaussian noise (normalised"
                        " units), with the true labels, instead of from noise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=50, help="SSIM and a resume point every this many iterations")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max_minutes", type=float, default=0, help="stop resumably after this long (0: no limit)")
    p.add_argument("--resume", action="store_true")
    return p.parse_args(argv)


def lr_factor(i, iters, schedule, warmup):
    """Multiplier of the base lr at iteration i."""
    if warmup and i < warmup:
        return (i + 1) / warmup
    if schedule == "cosine":
        return 0.5 * (1 + torch.cos(torch.tensor(torch.pi * i / iters)).item())
    if schedule == "step":
        return 0.1 ** sum(i >= f * iters for f in (3 / 8, 5 / 8, 7 / 8))
    return 1.0


class BNStatistics:
    """Forward hooks on every BatchNorm2d that record its input's batch mean and variance, only while
    `active` (the simulation's forwards must not be recorded)."""

    def __init__(self, model):
        self.active, self.terms = False, []
        self.modules = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for m in self.modules:
            m.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        if self.active:
            x = inputs[0]
            mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
            self.terms.append(torch.norm(mean - module.running_mean) + torch.norm(var - module.running_var))

    def prior(self, run, x):
        """sum over BN layers of ||mean - running mean||_2 + ||var - running var||_2 at theta0."""
        self.active, self.terms = True, []
        try:
            run.model.eval()
            torch.func.functional_call(run.model, {**run.theta0, **run.buffers}, (x,))
            return sum(self.terms)
        finally:
            self.active, self.terms = False, []


def layerwise_loss(run, x, labels, true_change, bs, steps, sgd, tv_weight):
    """(total, match, tv) as recons.py's reconstruction_loss, with the match averaged over parameter tensors."""
    batches = list(zip(x.split(bs), labels.split(bs)))
    _, change, _ = simulate_training(run.model, run.theta0, run.buffers, batches, steps, sgd)
    match = sum(cosine_distance(change[n].reshape(-1), true_change[n].reshape(-1)) for n in true_change) / len(true_change)
    tv = sum(total_variation(xb) for xb, _ in batches)
    return match + tv_weight * tv, match, tv


def curve_file(name):
    """A running probe's own file, else the copy kept in results/."""
    path = os.path.join(OUT_DIR, f"{name}.json")
    return path if os.path.isfile(path) else os.path.join(RESULTS_DIR, f"{name}.json")


def ssim_at(curve, iteration):
    """The SSIM at an iteration, linear between the two snapshots around it; None past the curve's end."""
    its = [c["iteration"] for c in curve]
    if iteration > its[-1]:
        return None
    k = bisect.bisect_left(its, iteration)
    if its[k] == iteration:
        return curve[k]["ssim"]
    a, b = curve[k - 1], curve[k]
    t = (iteration - a["iteration"]) / (b["iteration"] - a["iteration"])
    return a["ssim"] + t * (b["ssim"] - a["ssim"])


def equal_time_table(names, seconds_per_iteration, minutes):
    """Markdown rows: each probe's SSIM after the same wall time, its iterations being minutes * 60 / its
    seconds per iteration (measured alone: probes that share the cores run at other speeds)."""
    if len(seconds_per_iteration) != len(names):
        sys.exit("error: pass one --seconds_per_iteration per --table name")
    lines = ["| probe | s/iteration | " + " | ".join(f"{m:g} min" for m in minutes) + " |",
             "|---|---|" + "---|" * len(minutes)]
    for name, spi in zip(names, seconds_per_iteration):
        curve = json.load(open(curve_file(name)))["curve"]
        cells = []
        for m in minutes:
            it = int(m * 60 / spi)
            ssim = ssim_at(curve, it)
            cells.append("" if ssim is None else f"{ssim:.3f} ({it})")
        lines.append(f"| {name} | {spi:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_table(names, every=100):
    """Markdown rows: a probe's SSIM every `every` iterations and its last match loss."""
    records = {n: json.load(open(curve_file(n))) for n in names}
    last = max(r["curve"][-1]["iteration"] for r in records.values())
    its = list(range(0, last + 1, every))
    lines = ["| probe | " + " | ".join(str(i) for i in its) + " | match loss at the last |",
             "|---|" + "---|" * (len(its) + 1)]
    for n, r in records.items():
        at = {c["iteration"]: c for c in r["curve"]}
        cells = [f"{at[i]['ssim']:.3f}" if i in at else "" for i in its]
        end = r["curve"][-1]
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {end.get('match', '')} ({end['iteration']}) |")
    return "\n".join(lines)


def main(args):
    if args.table and args.seconds_per_iteration:
        print(equal_time_table(args.table, args.seconds_per_iteration, args.minutes))
        return None
    if args.table:
        print(curve_table(args.table))
        return None
    if not args.name:
        sys.exit("error: pass --name (or --table NAME ...)")
    torch.set_num_threads(args.threads)
    run = load_training_run(args.train_dir, "cpu")
    subset = torch.load(os.path.join(args.train_dir, "train_subset.pth"))
    x_true = subset["images"]
    data = run.config["data"]
    steps = args.steps or run.config["args"]["epochs"]
    x, labels, _ = initial_dummies(len(x_true), data["image_shape"], data["num_classes"], args.seed, "cpu")
    with torch.no_grad():
        x.mul_(args.init_scale / 0.5)
        if args.start_sigma is not None:
            noise = torch.randn(x_true.shape, generator=torch.Generator().manual_seed(args.seed))
            x.copy_(x_true + args.start_sigma * noise)
            labels = subset["labels"].clone()
    mean = torch.tensor(data["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(data["std"]).view(1, -1, 1, 1)
    lo, hi = (0 - mean) / std, (1 - mean) / std
    sgd = sgd_config_from_training(run.config["args"], run.config["args"]["lr"])
    true_change = {n: run.theta0[n] - run.theta_final[n] for n in run.theta0}
    bn = BNStatistics(run.model) if args.bn_prior else None
    full_size = tuple(x.shape[-2:])
    coarse = lambda i: args.coarse and i < args.coarse_iters  # noqa: E731  (the stage of iteration i)
    # z is what Adam moves; the images are z upsampled in the coarse stage, z itself after it
    z = F.interpolate(x.detach(), size=(args.coarse, args.coarse), mode="area").requires_grad_(True) \
        if coarse(0) else x
    image = lambda z, i: F.interpolate(z, size=full_size, mode="bilinear", align_corners=False) \
        if coarse(i) else z  # noqa: E731
    opt = torch.optim.Adam([z], lr=args.lr, betas=ADAM_BETAS)
    os.makedirs(OUT_DIR, exist_ok=True)
    json_path, state_path = (os.path.join(OUT_DIR, f"{args.name}.{ext}") for ext in ("json", "pth"))
    record = {"args": vars(args), "curve": [], "seconds_per_iteration": None}
    start, elapsed = 0, 0.0
    if args.resume:
        state = torch.load(state_path, weights_only=False)
        start, elapsed = state["iteration"], state["elapsed"]
        if args.coarse and not coarse(start):  # resumed after the switch to full size
            z = state["z"].clone().requires_grad_(True)
            opt = torch.optim.Adam([z], lr=args.lr, betas=ADAM_BETAS)
        with torch.no_grad():
            z.copy_(state["z"] if "z" in state else state["x"])
        opt.load_state_dict(state["opt"])
        record = json.load(open(json_path))
        record["curve"] = [r for r in record["curve"] if r["iteration"] <= start]
    elif os.path.exists(json_path):
        sys.exit(f"error: probe {args.name} exists; pass --resume or another --name")
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    t0 = time.time()
    deadline = t0 + 60 * args.max_minutes if args.max_minutes else None
    loss_row = {}

    def save(i):
        x = image(z, i - 1 if i else 0).detach()
        record["curve"].append({"iteration": i, "seconds": round(elapsed + time.time() - t0, 1),
                                "ssim": paper_avg_ssim(x_true, x), **loss_row})
        record["seconds_per_iteration"] = (elapsed + time.time() - t0) / max(i, 1)
        torch.save({"x": x, "z": z.detach(), "opt": opt.state_dict(), "iteration": i,
                    "elapsed": elapsed + time.time() - t0}, state_path)
        with open(json_path, "w") as f:
            json.dump(record, f, indent=1)
        print(f"{args.name} it {i} ssim {record['curve'][-1]['ssim']:.4f} {loss_row}", flush=True)

    if start == 0:
        save(0)
    for i in range(start, args.iters):
        if args.coarse and i == args.coarse_iters:  # to full size: the upsampled images, a fresh Adam
            z = image(z, i - 1).detach().requires_grad_(True)
            opt = torch.optim.Adam([z], lr=args.lr, betas=ADAM_BETAS)
        x = image(z, i)
        scale = args.fine_lr_scale if args.coarse and not coarse(i) else 1.0
        for g in opt.param_groups:
            g["lr"] = scale * args.lr * lr_factor(i, args.iters, args.schedule, args.warmup)
        if args.match == "layers":
            total, match, tv = layerwise_loss(run, x, labels, true_change, run.config["args"]["bs"], steps, sgd, args.tv)
        else:
            total, match, tv = reconstruction_loss(run.model, run.theta0, run.buffers, x, labels, run.weight_change,
                                                   run.config["args"]["bs"], steps, sgd, args.tv, "cos")
        prior = torch.zeros(())
        if bn is not None and i < args.bn_prior_until * args.iters:
            prior = bn.prior(run, x)
            total = total + args.bn_prior * prior
        (grad,) = torch.autograd.grad(total, [z])
        z.grad = grad.sign() if args.signed else grad
        opt.step()
        if args.box:  # bilinear upsampling of in-box pixels stays in the box
            with torch.no_grad():
                z.copy_(torch.max(torch.min(z, hi), lo))
        loss_row = {"match": round(match.item(), 5), "tv": round(tv.item(), 4), "bn": round(float(prior), 3)}
        done = i + 1
        if done % args.every == 0 or done == args.iters or stop["now"] or (deadline and time.time() > deadline):
            save(done)
            if stop["now"] or (deadline and time.time() > deadline):
                print(f"stopped at {done}; continue with --resume", flush=True)
                break
    return record


if __name__ == "__main__":
    main(parse_args())
