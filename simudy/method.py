"""SimuDy: dummies, the loss, one iteration, and the unknown-N ranking.

Dummy images start as noise (randn * 0.5) with balanced random labels. Each iteration simulates the
training on them (same lr, batch size, simulated epochs, unrolled SGD) and moves the dummies so that the
simulated change theta0 - theta_hat_f points the way of theta0 - theta_f:
    loss = 1 - cos(theta0 - theta_hat_f, theta0 - theta_f) + tv_weight * sum_batches TV(x_batch)
"""
import collections
import contextlib
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from .adjoint import auto_keep_every, choose_backprop, simulate_training_recompute
from .errors import UserError
from .loop import DEFAULT_NONFINITE_FIX, LOG_FIELDS, check_finite, main_run_iterations
from .reparam import CHROMA_FROM_RGB, coarse_stage, mix_colours, pyramid_dummies
from .simulate import (SGDConfig, flat, graph_free_steps, parameter_bytes, scratch_buffers, sgd_config_from_training,
                       simulate_training)
from .target import TrainingRun

# The paper code's constants, as named defaults.
INIT_SCALE = 0.5          # dummy images start as randn * 0.5
ADAM_BETAS = (0.8, 0.9)
COSINE_T_MAX = 100        # CosineAnnealingLR(T_max=100), stepped every iteration (period 200)


# ----------------------------------------------------------------------------------------------
# Dummies


def balanced_random_labels(num, num_classes, generator):
    """Balanced labels in random order: class c fills [c*M/C, (c+1)*M/C) before the shuffle (paper)."""
    labels = torch.zeros(num, dtype=torch.long)
    for c in range(num_classes):
        labels[int(c * num / num_classes): int((c + 1) * num / num_classes)] = c
    return labels[torch.randperm(num, generator=generator)]


def initial_dummies(num, image_shape, num_classes, seed, device):
    """(x, labels, generator): randn * 0.5 images and balanced random labels, from a CPU generator so a
    seed gives the same start on any device; the generator goes on to draw anything else a method needs."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(num, *image_shape, generator=gen) * INIT_SCALE).to(device)
    labels = balanced_random_labels(num, num_classes, gen).to(device)
    return x.requires_grad_(True), labels, gen


# ----------------------------------------------------------------------------------------------
# The loss


def total_variation(x):
    """Mean absolute difference of neighbouring pixels (paper code)."""
    return (x[..., :, 1:] - x[..., :, :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()


# --chroma_tv: B's reconstructions carry 4-8x the training images' TV in the two chroma coordinates at
# about their luminance TV (benchmarks/README.md, session 20), so a TV prior on the chroma alone.
def chroma_total_variation(x):
    """total_variation of the two chroma coordinates (COLOUR_MIX's) of the RGB images x."""
    return total_variation(mix_colours(x, CHROMA_FROM_RGB))


def cosine_distance(a, b):
    """1 - cos(a, b) of two flat vectors; eps small enough never to bias a real parameter change."""
    return 1 - F.cosine_similarity(a, b, dim=0, eps=1e-20)


def squared_distance(a, b):
    return (a - b).pow(2).sum()


def match_loss(sim_change, true_change, loss_type):
    """1 - cos (paper default) or squared distance between the simulated and true parameter change."""
    return (cosine_distance if loss_type == "cos" else squared_distance)(sim_change, true_change)


class BatchNormPrior:
    """DeepInversion's prior (Yin et al., CVPR 2020) from theta0's BatchNorm running statistics, which are
    real-image statistics the attacker has for free: for each batch of dummies at theta0, the sum over BN
    layers of ||batch mean - running mean||_2 + ||batch var - running var||_2 of the layer's input.

    `recording()` arms forward hooks for one forward pass through the model (each layer records once, then
    its hook removes itself), so the simulation's own first step (batch 0 at theta0) is measured without
    a second forward; `at_theta0` runs the forward for the other batches. `value` is the last total, unweighted.
    `floor`: the level below which it stops pulling (`penalty`); real images' own batches sit well above 0.
    """

    def __init__(self, model, buffers, floor=0.0):
        self.model = model
        self.floor = floor
        self.layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.running = {n: (buffers[f"{n}.running_mean"].detach().clone(), buffers[f"{n}.running_var"].detach().clone())
                        for n, _ in self.layers}  # copies: train-mode BN updates the buffers in place
        self.value = 0.0

    @contextlib.contextmanager
    def recording(self):
        terms, handles = [], {}

        def hook_for(name):
            def hook(module, inputs, output):
                handles.pop(name).remove()  # the first forward only
                h = inputs[0]
                dims = [0] + list(range(2, h.dim()))
                mean, var = h.mean(dims), h.var(dims, unbiased=False)
                running_mean, running_var = self.running[name]
                terms.append(torch.norm(mean - running_mean) + torch.norm(var - running_var))
            return hook
        for name, module in self.layers:
            handles[name] = module.register_forward_hook(hook_for(name))
        try:
            yield terms
        finally:
            for handle in handles.values():
                handle.remove()

    def at_theta0(self, theta0, buffers, xs, sgd):
        """The prior of each batch in xs from its own forward at theta0, in the simulation's BN mode."""
        self.model.train(sgd.bn_train)
        scratch = scratch_buffers(buffers, sgd)
        total = 0.0
        for xb in xs:
            with self.recording() as terms:
                functional_call(self.model, {**theta0, **scratch}, (xb,))
            total = total + sum(terms)
        return total

    def penalty(self, prior):
        """What the loss adds for a prior value: the part above `floor` (below it, no pull: session 34 saw the
        warm start pull B30's dummies to half the level of the training images' own batch)."""
        return (prior - self.floor).clamp(min=0)


def reconstruction_loss(model, theta0, buffers, x, labels, weight_change, rbs, epochs, sgd, tv_weight,
                        loss_type, bn_prior=None, bn_weight=0.0):
    """Simulate training on the dummies x (M×C×H×W, split in batches of rbs) and compare. Returns
    (total, match, tv) where tv is the unweighted sum over batches of TV(x_batch), as the paper code.
    With a BatchNormPrior and bn_weight > 0, total also holds bn_weight * prior (prior in bn_prior.value);
    batch 0's statistics come from the simulation's first step, which runs at theta0."""
    batches = list(zip(x.split(rbs), labels.split(rbs)))
    with (bn_prior.recording() if bn_weight else contextlib.nullcontext([])) as first_step:
        _, displacement, _ = simulate_training(model, theta0, buffers, batches, epochs, sgd)
    match = match_loss(flat(displacement.values()), weight_change, loss_type)
    tv = sum(total_variation(xb) for xb, _ in batches)
    total = match + tv_weight * tv
    if bn_weight:
        prior = sum(first_step) + bn_prior.at_theta0(theta0, buffers, [xb for xb, _ in batches[1:]], sgd)
        bn_prior.value = float(prior.detach())
        total = total + bn_weight * bn_prior.penalty(prior)
    return total, match, tv


def reconstruction_loss_and_grad(model, theta0, buffers, x, labels, weight_change, rbs, epochs, sgd, tv_weight,
                                 loss_type, backprop="recompute", keep_every=None, bn_prior=None, bn_weight=0.0):
    """(total, match, tv) as reconstruction_loss, and d total / d x, by either reverse pass:
    'unrolled' keeps the whole simulated graph (the paper's), 'recompute' one step's graph at a time
    (its BN prior takes its own forward at theta0: the recomputed forward has no graph)."""
    if backprop == "unrolled":
        total, match, tv = reconstruction_loss(model, theta0, buffers, x, labels, weight_change, rbs, epochs,
                                               sgd, tv_weight, loss_type, bn_prior, bn_weight)
        (grad_x,) = torch.autograd.grad(total, [x])
        return total.detach(), match.detach(), tv.detach(), grad_x
    x_leaf = x.detach().requires_grad_(True)
    batches = list(zip(x_leaf.split(rbs), labels.split(rbs)))
    steps = epochs * len(batches)
    k = keep_every or auto_keep_every(steps, parameter_bytes(theta0))
    match, image_grads, _ = simulate_training_recompute(
        model, theta0, buffers, batches, epochs, sgd, lambda c: match_loss(c, weight_change, loss_type), k)
    tv = sum(total_variation(xb) for xb, _ in batches)
    (tv_grad,) = torch.autograd.grad(tv, [x_leaf])
    grad_x = torch.cat(image_grads) + tv_weight * tv_grad
    total = match + tv_weight * tv.detach()
    if bn_weight:
        prior = bn_prior.at_theta0(theta0, buffers, [xb for xb, _ in batches], sgd)
        penalty = bn_prior.penalty(prior)
        (prior_grad,) = torch.autograd.grad(penalty, [x_leaf])
        grad_x = grad_x + bn_weight * prior_grad
        bn_prior.value = float(prior.detach())
        total = total + bn_weight * float(penalty.detach())
    return total, match, tv.detach(), grad_x


# ----------------------------------------------------------------------------------------------
# One iteration


@dataclass
class SimuDySetup:
    """Everything a SimuDy iteration needs besides the dummies and their optimiser."""
    run: TrainingRun
    rbs: int
    epochs: int            # simulated epochs (--steps)
    sgd: SGDConfig
    clipped_sgd: SGDConfig  # during the first clip_epochs outer epochs
    clip_epochs: int
    steps_per_epoch: int   # outer iterations per outer epoch (--rec_steps_per_epoch)
    tv_weight: float
    loss_type: str
    backprop: str
    keep_every: int
    bn_prior: object = None        # a BatchNormPrior when --bn_prior > 0
    bn_weight: float = 0.0
    bn_until: int = 0              # iterations with the BN prior on
    box: tuple = None              # (low, high) per-channel pixel bounds, 1×C×1×1, when --box
    signed_grad: bool = False
    reparam: object = None         # what Adam moves instead of the dummies (reparam.py): a CoarseStage
    #                                (--coarse) or PyramidDummies (--pyramid); the main run only, never a short run
    chroma_tv: float = 0.0         # --chroma_tv's weight
    steps_epochs: int = 0          # --steps_epochs: outer epochs that simulate `epochs`; after them, full_epochs
    full_epochs: int = 0           # the training's epochs
    smooth_sigma: float = 0.0      # --smooth_sigma (the main run only): the objective's noise std at iteration 0
    smooth_iterations: int = 0     # iterations over which it falls to 0 (--smooth_until x the run)
    seed: int = 0                  # the smoothing noise's seed (with the iteration, so a resume draws the same)


def smoothing_noise(setup, x, iteration):
    """--smooth_sigma's noise for this iteration (None when off): std falling linearly from smooth_sigma to 0
    over smooth_iterations, drawn from (seed, iteration) on the CPU so a resumed run or another device
    draws the same."""
    if not setup.smooth_sigma or iteration >= setup.smooth_iterations:
        return None
    sigma = setup.smooth_sigma * (1 - iteration / setup.smooth_iterations)
    gen = torch.Generator().manual_seed(setup.seed * 1_000_003 + iteration)
    return (sigma * torch.randn(x.shape, generator=gen)).to(x)


def simulated_epochs(setup, epoch):
    """How many of the training's epochs outer epoch `epoch` simulates: --steps, or with --steps_epochs N
    all of them from outer epoch N on."""
    return setup.full_epochs if setup.steps_epochs and epoch >= setup.steps_epochs else setup.epochs


def simudy_log_fields(setup):
    """log.csv's columns for a SimuDy run on `setup`: LOG_FIELDS with the priors' own before seconds."""
    priors = ["bn"] * (setup.bn_prior is not None) + ["chroma_tv"] * bool(setup.chroma_tv)
    return LOG_FIELDS[:-1] + priors + LOG_FIELDS[-1:]


def pixel_box(data, device):
    """(low, high): where [0, 1] pixels land after the data's normalisation, per channel (1×C×1×1)."""
    if "mean" not in data or "std" not in data:
        raise UserError("--box needs the data's normalisation (mean and std); pass them or drop --box")
    mean, std = (torch.tensor(data[k], dtype=torch.float32, device=device).view(1, -1, 1, 1) for k in ("mean", "std"))
    return (0 - mean) / std, (1 - mean) / std


def simudy_setup(run, rlr, rbs, args, x, labels):
    """(SimuDySetup, bytes the unrolled graph would need or None) for this rlr/rbs and the flags."""
    train_args = run.config["args"]
    sgd = sgd_config_from_training(train_args, rlr)
    if args.steps_epochs and not args.steps < train_args["epochs"]:
        raise UserError(f"--steps_epochs {args.steps_epochs} switches from --steps {args.steps} to the training's"
                        f" {train_args['epochs']} epochs; pass --steps below that, or --steps_epochs 0")
    most_epochs = train_args["epochs"] if args.steps_epochs else args.steps  # the graph's size at its largest
    backprop, graph_bytes = choose_backprop(args.backprop, run.model, run.theta0, run.buffers, x, labels, rbs,
                                            most_epochs, sgd)
    bn_prior = None
    if args.bn_prior:
        bn_prior = BatchNormPrior(run.model, run.buffers, args.bn_prior_floor)
        if not bn_prior.layers:
            raise UserError("--bn_prior needs a model with BatchNorm layers (a ResNet); drop it for this model")
    total = main_run_iterations(args)
    return SimuDySetup(run, rbs, args.steps, sgd, sgd_config_from_training(train_args, rlr, args.clip_norm,
                                                                            args.clip_to),
                       args.clip_epochs, args.rec_steps_per_epoch, args.tv_weight, args.loss_type, backprop,
                       args.keep_every, bn_prior, args.bn_prior, math.ceil(args.bn_prior_until * total),
                       pixel_box(run.config["data"], x.device) if args.box else None, args.signed_grad,
                       chroma_tv=args.chroma_tv, steps_epochs=args.steps_epochs,
                       full_epochs=train_args["epochs"]), graph_bytes


def with_smoothing(setup, args, total):
    """The main run's setup with --smooth_sigma's noise over the first --smooth_until of its `total` iterations
    (short runs, for restarts and searches, take the loss at the dummies themselves)."""
    return dataclasses.replace(setup, smooth_sigma=args.smooth_sigma,
                               smooth_iterations=math.ceil(args.smooth_until * total), seed=args.seed)


def main_run_setup(run, rlr, rbs, args, x, labels, total):
    """(SimuDySetup, graph bytes or None) of the main run over `total` iterations: simudy_setup with the
    smoothing and the reparametrisation (--coarse, or --pyramid / --decorrelate_colours) that only the main
    run and its --restarts use (the searches' short runs move the images themselves)."""
    setup, graph_bytes = simudy_setup(run, rlr, rbs, args, x, labels)
    setup = with_smoothing(setup, args, total)
    if args.coarse:
        setup = dataclasses.replace(setup, reparam=coarse_stage(x, args.coarse, args.coarse_iters))
    elif (args.pyramid or args.decorrelate_colours) and not args.grid_search:  # its short run moves the images
        setup = dataclasses.replace(setup, reparam=pyramid_dummies(x, max(args.pyramid, 1), args.decorrelate_colours))
    return setup, graph_bytes


def adam_with_schedule(tensors, lr, t_max=None, lr_lambda=None):
    """Adam with the paper code's betas and its lr schedule, stepped every iteration: CosineAnnealingLR(T_max),
    or LambdaLR(lr_lambda) when one is given."""
    opt = torch.optim.Adam(tensors, lr=lr, betas=ADAM_BETAS)
    if lr_lambda is not None:
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max)


STEP_DECAYS = (3 / 8, 5 / 8, 7 / 8)  # --schedule step: lr x0.1 at these shares of the run (Geiping et al.)


def lr_factor(iteration, total, schedule, warmup):
    """The lr multiplier of --schedule cosine/step after `warmup` iterations of linear warm-up."""
    if iteration < warmup:
        return (iteration + 1) / warmup
    if schedule == "step":
        return 0.1 ** sum(iteration >= share * total for share in STEP_DECAYS)
    return 0.5 * (1 + math.cos(math.pi * (iteration - warmup) / max(1, total - warmup)))


def simudy_optimisers(x, rec_lr, schedule="paper", total=None, warmup=0, reparam=None):
    """Adam on the dummies and its lr schedule, stepped every iteration. "paper": CosineAnnealingLR(T_max=100),
    which is periodic (the lr returns to rec_lr every 200 iterations); "cosine": one decay from rec_lr to 0
    over the run's `total` iterations, so the run ends at a small lr instead of on a peak; "step": x0.1 at
    3/8, 5/8 and 7/8 of the run. `warmup` > 0 prepends a linear warm-up (cosine and step). With a
    CoarseStage, one Adam holds x and its z: Adam skips a tensor whose grad is None, so each stage moves
    only its own, and x's moments start fresh at the switch, on the run's one schedule. PyramidDummies'
    levels are all moved, x never."""
    tensors = [x] + ([] if reparam is None else list(reparam.named_tensors().values()))
    if schedule == "step" or (warmup and schedule == "cosine"):
        return adam_with_schedule(tensors, rec_lr, lr_lambda=lambda i: lr_factor(i, total, schedule, warmup))
    return adam_with_schedule(tensors, rec_lr, COSINE_T_MAX if schedule == "paper" or not total else total)


# From noise the simulated SGD can blow up on a ResNet whose theta0 is sharp there (benchmarks/README.md,
# session 14: gradient norm 80 -> 3,900 -> nan within 7 simulated steps on one Fashion-MNIST instance);
# the paper's clip of the simulated gradients in the first outer epochs is what bounds it.
SIMULATION_DIVERGED_FIX = ("the simulated training diverged on the dummies: clip its gradients as the paper"
                           " does (--clip_epochs 1, --clip_norm 20 --clip_to 5) or lower --rlr, and restart")


def nonfinite_fix(match, sgd):
    """What a non-finite loss's error should tell: a non-finite match with the simulation unclipped means the
    simulated training diverged (clip it); otherwise the outer step was too large."""
    return SIMULATION_DIVERGED_FIX if not math.isfinite(match) and math.isinf(sgd.clip_norm) else \
        DEFAULT_NONFINITE_FIX


def simudy_iteration(setup, x, labels, opt, sched, iteration):
    """One SimuDy iteration: simulate the training on the dummies, compare the simulated change with the
    true one, move the dummies by Adam. Returns the log row; the loss gradient stays in x.grad."""
    run = setup.run
    epoch, step = divmod(iteration, setup.steps_per_epoch)
    sgd = setup.clipped_sgd if epoch < setup.clip_epochs else setup.sgd  # the paper's clip, early epochs only
    bn_weight = setup.bn_weight if iteration < setup.bn_until else 0.0
    noise = smoothing_noise(setup, x, iteration)  # the objective at a nearby point, its gradient applied to x
    at = x if noise is None else (x.detach() + noise).requires_grad_(True)
    loss, match, tv, grad_x = reconstruction_loss_and_grad(
        run.model, run.theta0, run.buffers, at, labels, run.weight_change, setup.rbs, simulated_epochs(setup, epoch), sgd,
        setup.tv_weight, setup.loss_type, setup.backprop, setup.keep_every, setup.bn_prior, bn_weight)
    if setup.chroma_tv:  # a prior on the dummies alone, outside the simulation: its own small graph
        with torch.enable_grad():
            x_leaf = x.detach().requires_grad_(True)
            chroma_tv = chroma_total_variation(x_leaf)
            (chroma_grad,) = torch.autograd.grad(chroma_tv, [x_leaf])
        loss, grad_x = loss + setup.chroma_tv * chroma_tv.detach(), grad_x + setup.chroma_tv * chroma_grad
    cos = match.item()
    total = check_finite(loss.item(), f"epoch {epoch} step {step}", nonfinite_fix(cos, sgd))
    row = {"epoch": epoch, "step": step, "total": total, "cos": cos, "tv": tv.item(),
           "lr": sched.get_last_lr()[0]}
    if setup.bn_prior is not None:
        row["bn"] = setup.bn_prior.value if bn_weight else ""
    if setup.chroma_tv:
        row["chroma_tv"] = chroma_tv.item()
    reparam = setup.reparam if setup.reparam is not None and setup.reparam.active(iteration) else None
    moved = [x] if reparam is None else list(reparam.named_tensors().values())
    grads = [grad_x]
    if reparam is not None:  # the chain rule through the upsampling; x.grad None, so Adam leaves x alone
        with torch.enable_grad():
            grads = torch.autograd.grad(reparam.composed(x.shape[-2:]), moved, grad_x)
        x.grad = None
    elif setup.reparam is not None:  # after the coarse stage: its z stays where it is
        for z in setup.reparam.named_tensors().values():
            z.grad = None
    for tensor, g in zip(moved, grads):
        tensor.grad = g.sign() if setup.signed_grad else g
    opt.step()
    sched.step()
    with torch.no_grad():
        if reparam is not None:
            if setup.box is not None:
                reparam.clamp_into(setup.box, x.shape[-2:])
            x.copy_(reparam.composed(x.shape[-2:]))
        if setup.box is not None:  # back inside the valid pixel range (a pyramid's sum rounds past it by an ulp)
            x.copy_(torch.maximum(torch.minimum(x, setup.box[1]), setup.box[0]))
    return row


# ----------------------------------------------------------------------------------------------
# The unknown-N ranking (--num_dummy)

RANKING_BUDGET_BYTES = 256 * 2**20  # per-dummy gradient sums held at once; more dummies = more passes


def total_gradient_norms(model, theta0, buffers, x, labels, rbs, epochs, sgd, budget=RANKING_BUDGET_BYTES):
    """||sum_t grad_theta loss(theta_t; x_j, y_j)|| for every dummy j: its total gradient over the simulated
    training (theta_t along the simulation without a graph), the quantity the paper's appendix ranks by
    (matched dummies 1.55 on average, unmatched 0.55). Per-dummy gradients use BatchNorm's running
    statistics and no clip. Dummies are taken in chunks whose sums fit in `budget` bytes, one graph-free
    simulation per chunk, so memory stays bounded whatever the number of dummies."""
    x, labels = x.detach(), labels.detach()
    batches = list(zip(x.split(rbs), labels.split(rbs)))
    names = list(theta0)
    chunk = max(1, budget // parameter_bytes(theta0))
    was_training = model.training

    def sample_loss(params, xi, yi, bufs):
        return F.cross_entropy(functional_call(model, {**params, **bufs}, (xi[None],)), yi[None])
    per_sample_grads = vmap(grad(sample_loss), in_dims=(None, 0, 0, None))
    norms = []
    for lo in range(0, len(x), chunk):
        hi = min(lo + chunk, len(x))
        sums = {k: torch.zeros((hi - lo, *v.shape), device=v.device, dtype=v.dtype) for k, v in theta0.items()}
        bufs = scratch_buffers(buffers, sgd)
        for _, b, params, _, _ in graph_free_steps(model, theta0, bufs, batches, epochs, sgd):
            a, z = max(lo, b * rbs), min(hi, (b + 1) * rbs)  # the chunk's dummies in batch b
            if a < z:  # this batch holds dummies of the chunk: add their gradients at theta_t
                model.eval()
                g = per_sample_grads(dict(zip(names, params)), x[a:z], labels[a:z], bufs)
                for k in names:
                    sums[k][a - lo:z - lo] += g[k].detach()
        norms.append(torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in sums.values())))
    model.train(was_training)
    return torch.cat(norms).cpu()


def rank_dummies(norms, labels=None):
    """Dummy indices by descending total-gradient norm (ties keep index order): the paper's ranking. With
    labels (--ranking class_balanced), round by round: each round takes every class's next-best dummy,
    classes in descending order of that dummy's norm, so the first k*C ranks hold k dummies of each class, as a
    class-balanced training subset (the paper's first k per class) has."""
    by_norm = torch.argsort(norms, descending=True, stable=True)
    if labels is None:
        return by_norm
    depth, above = [], collections.Counter()  # depth: how many of its class rank above a dummy by norm
    for j in by_norm.tolist():
        depth.append(above[int(labels[j])])
        above[int(labels[j])] += 1
    return by_norm[torch.argsort(torch.tensor(depth), stable=True)]
