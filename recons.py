"""Stage 2: reconstruct the training images from theta0 and theta_final alone (SimuDy, or a baseline).

SimuDy (--method simudy, the default). Dummy images start as noise (randn * 0.5) with balanced random
labels. Each iteration simulates the training on them (same lr, batch size, `--steps` epochs, unrolled
SGD) and moves the dummies so that the simulated change theta0 - theta_hat_f points the way of
theta0 - theta_f:
    loss = 1 - cos(theta0 - theta_hat_f, theta0 - theta_f) + tv_weight * sum_batches TV(x_batch)
--num_dummy M reconstructs M dummies when the dataset size is unknown and ranks them by the norm of their
total gradient over the simulated training (the paper's appendix); --rlr auto / --rbs auto pick the
simulation's lr and batch size by the paper's short runs before the full one. --preset picks the recipe
for the dummies' optimisation (paper, or fast).

Baselines, as the paper's recons_1step.py / recons_2step.py re-implemented them: 2N candidates with
dual variables lambda, matching grad_theta sum_i lambda_i loss(x_i, y_i) at theta_f (one_step, Buzaglo
et al.) or at theta0 and theta_f (two_step, Loo et al.) to theta0 - theta_f.

    python ./recons.py --num_imgs_per_class 2 --tlr 1e-2 --bs 20 --rec_lr 1e-2
    python ./recons.py --num_imgs_per_class 2 --tlr 1e-2 --bs 20 --method one_step
"""
import argparse
import csv
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call
from tqdm import tqdm

from models import build_model
from utils import (AUTO, UserError, add_data_args, add_model_args, add_recons_id_args, add_runtime_args,
                   add_training_hparam_args, library_versions, load_checkpoint, parse_with_preset, pick_device,
                   prepare_run_dir, print_candidates, read_json, recons_dir_from_args, resolve_rec_lr,
                   resolve_simulation_hparams, resolve_steps, run_main, set_seed, train_dir_from_args, write_csv,
                   write_json)

# The paper code's constants, as named defaults.
INIT_SCALE = 0.5          # dummy images start as randn * 0.5
ADAM_BETAS = (0.8, 0.9)
COSINE_T_MAX = 100        # CosineAnnealingLR(T_max=100), stepped every iteration (period 200)
GRID_SEARCH_STEPS = 50    # --grid_search 1 and --rlr/--rbs auto: one epoch of 50 steps
SAVE_EVERY = {"simudy": 100, "baseline": 500}  # snapshot interval in steps (paper code)
# The paper's lr sweep (grid_search.sh): 0.020 down to 0.001 in steps of 0.001.
PAPER_RLR_CANDIDATES = tuple(round(0.001 * k, 3) for k in range(20, 0, -1))
# "l2" is the baselines' squared distance (empty in SimuDy rows, whose match loss goes in "cos").
LOG_FIELDS = ["iteration", "epoch", "step", "total", "cos", "tv", "l2", "lr", "seconds"]
METHODS = ("simudy", "one_step", "two_step")

# The baselines (paper code's recons_1step.py / recons_2step.py).
BASELINE_CANDIDATE_RATIO = 2   # candidates per training image
BASELINE_STEPS = 100_000
BASELINE_COSINE_T_MAX = 2000
DUAL_INIT_HALF_WIDTH = 0.5     # lambda ~ U[-0.5, 0.5]
DUAL_MOMENTUM = 0.9
# Their loss by step: rows (until step, l2 weight, cos weight, tv weight), the first row whose `until` lies
# beyond the step applies. The l2 weight grows so the duals and images first find the gradient's scale;
# the last phase is 30 * (1 - cos) + 0.1 * 0.01 * TV (the paper code's 0.1 * tv_loss, tv_loss = 0.01 * TV).
BASELINE_LOSS_SCHEDULE = (
    (600, 1 / 100, 0, 0),
    (1600, 1 / 30, 0, 0),
    (4000, 1 / 20, 0, 0),
    (8000, 1, 0, 0),
    (12000, 5, 0, 0),
    (math.inf, 0, 30, 0.1 * 0.01),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_hparam_args(p, "--tlr")
    add_model_args(p)
    add_data_args(p)
    add_recons_id_args(p)
    add_runtime_args(p)
    g = p.add_argument_group("reconstruction")
    g.add_argument("--method", default="simudy", choices=METHODS,
                   help="simudy (the paper's); one_step (Buzaglo et al.) or two_step (Loo et al.), the"
                        " paper's baselines (metrics.py --linear 1 / 2)")
    g.add_argument("--grid_search", default=0, type=int, choices=[0, 1],
                   help="1: a short run (1 x 50 steps) whose final loss grid_search.sh compares")
    g.add_argument("--loss_type", default="cos", type=loss_type_name,
                   help="cos (or 0, the paper's) or l2 (or 1): how simulated and true change compare")
    g.add_argument("--tv_weight", default=1e-3, type=float,
                   help="weight of total variation (the paper code's effective 0.1*0.01)")
    g.add_argument("--rec_epochs", default=20, type=int, help="outer epochs (paper code: 20)")
    g.add_argument("--rec_steps_per_epoch", default=1500, type=int, help="iterations per outer epoch")
    g.add_argument("--schedule", default="paper", choices=["paper", "cosine"],
                   help="Adam lr schedule: paper = CosineAnnealingLR(T_max=100) stepped every iteration"
                        " (periodic); cosine = one decay to 0 over all iterations")
    g.add_argument("--save_every", default=None, type=int,
                   help=f"snapshot every N steps; default {SAVE_EVERY['simudy']} (SimuDy, <epoch>_<step>.pth)"
                        f" or {SAVE_EVERY['baseline']} (baselines, x_<step>.pth), as the paper code")
    g.add_argument("--clip_norm", default=20.0, type=float,
                   help="a simulated gradient with norm above this is rescaled to --clip_to ...")
    g.add_argument("--clip_to", default=5.0, type=float)
    g.add_argument("--clip_epochs", default=5, type=int, help="... during the first N outer epochs")
    g.add_argument("--backprop", default="auto", choices=["auto", "recompute", "unrolled"],
                   help="unrolled: the paper's, the whole simulated graph in memory (fastest);"
                        " recompute: memory-flat, one simulated step's graph at a time (~1.3x slower);"
                        " auto: unrolled while its graph needs < 40%% of the device's memory")
    g.add_argument("--keep_every", default=0, type=int,
                   help="recompute: keep theta_t every k steps (0 = all while they fit in 512 MB, else ~sqrt(T))")
    g.add_argument("--resume", action="store_true", help="continue from the last snapshot of the run")
    g.add_argument("--max_iterations", default=0, type=int,
                   help="stop (resumably) after this many iterations in total; 0 = run to the end")
    g.add_argument("--max_minutes", default=0, type=float,
                   help="stop (resumably, with a snapshot) after this many minutes of iterations; 0 = no limit")
    g = p.add_argument_group("--rlr auto / --rbs auto (the paper's selection, in-process)")
    g.add_argument("--rlr_candidates", default=None, type=float, nargs="+",
                   help="simulation lrs to try; default the paper's 0.020 down to 0.001 in steps of 0.001")
    g.add_argument("--rbs_candidates", default=None, type=int, nargs="+",
                   help="simulation batch sizes to try; default the training's --bs, its half and its double")
    g = p.add_argument_group("baselines (--method one_step / two_step)")
    g.add_argument("--baseline_steps", default=BASELINE_STEPS, type=int,
                   help="optimisation steps (paper code: 100,000)")
    return parse_with_preset(p, argv)


def loss_type_name(value):
    """The paper's --loss_type 0/1 and names cos/l2."""
    names = {"0": "cos", "1": "l2", "cos": "cos", "l2": "l2"}
    if value not in names:
        raise argparse.ArgumentTypeError("choose cos (0) or l2 (1)")
    return names[value]


# ----------------------------------------------------------------------------------------------
# The simulation: differentiable unrolled SGD, written with torch.func.functional_call.


@dataclass
class SGDConfig:
    """How the real training updated parameters (mirrors torch.optim.SGD), plus the paper's clip."""
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    bn_train: bool = False        # BatchNorm mode during training (paper: eval)
    clip_norm: float = math.inf   # a gradient with a larger norm is rescaled ...
    clip_to: float = 5.0          # ... to this norm (paper, first 5 outer epochs)


def loss_gradient(model, params, buffers, x, y, clip_norm, clip_to, create_graph):
    """Gradient of the cross-entropy of one batch at `params`, clipped as in the paper code."""
    out = functional_call(model, {**params, **buffers}, (x,))
    loss = F.cross_entropy(out, y)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
    if clip_norm < math.inf:
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        if norm > clip_norm:  # the paper's clip: rescale to a fixed norm, not to the threshold
            grads = [g * (clip_to / norm) for g in grads]
    return grads


def simulate_training(model, theta0, buffers, batches, epochs, sgd, create_graph=True):
    """Unrolled SGD from theta0 over `batches` (list of (x, y)) for `epochs` epochs, in order.

    Returns (theta_hat_final, displacement, buffers): dicts of tensors; displacement = theta0 - theta_hat_final
    accumulated as the sum of lr * update (the paper's sum of gradients, without cancellation error).
    With create_graph, both are differentiable with respect to the batch images.
    """
    model.train(sgd.bn_train)
    if sgd.bn_train:  # train-mode BN updates running statistics in place: work on copies
        buffers = {k: v.clone() for k, v in buffers.items()}
    # theta0 is a leaf that requires grad so each step can differentiate the loss w.r.t. its params
    params = {k: v.detach().requires_grad_(True) for k, v in theta0.items()}
    displacement = {k: torch.zeros_like(v) for k, v in params.items()}
    velocity = None
    for _ in range(epochs):
        for x, y in batches:
            grads = loss_gradient(model, params, buffers, x, y, sgd.clip_norm, sgd.clip_to, create_graph)
            direction = _direction(grads, list(params.values()), velocity, sgd)
            velocity = direction if sgd.momentum else None
            params = {k: p - sgd.lr * d for (k, p), d in zip(params.items(), direction)}
            displacement = {k: s + sgd.lr * d for (k, s), d in zip(displacement.items(), direction)}
    return params, displacement, buffers


def sgd_step(model, params, velocity, buffers, x, y, sgd):
    """One SGD step without a graph: returns (params, velocity, update) with update = lr * direction."""
    p_list = [p.detach().requires_grad_(True) for p in params]
    grads = loss_gradient(model, dict(zip(_names(model), p_list)), buffers, x, y, sgd.clip_norm, sgd.clip_to,
                          create_graph=False)
    direction = _direction(grads, params, velocity, sgd)
    new_velocity = direction if sgd.momentum else None
    return [p - sgd.lr * d for p, d in zip(params, direction)], new_velocity, [sgd.lr * d for d in direction]


def _names(model):
    return [n for n, _ in model.named_parameters()]


def _direction(grads, params, velocity, sgd):
    """torch.optim.SGD's update direction from the (clipped) loss gradient: weight decay, then
    momentum buf = momentum * buf + grad (buf = grad at the first step), no dampening or Nesterov."""
    if sgd.weight_decay:
        grads = [g + sgd.weight_decay * p for g, p in zip(grads, params)]
    if sgd.momentum and velocity is not None:
        grads = [sgd.momentum * v + g for v, g in zip(velocity, grads)]
    return grads


def step_schedule(num_batches, epochs):
    """The batch index of every simulated step: the batches in order, `epochs` times (shuffle=False)."""
    return [b for _ in range(epochs) for b in range(num_batches)]


def graph_free_steps(model, theta0, buffers, batches, epochs, sgd):
    """The simulation without a graph, a step at a time: yields (t, batch index, theta_t, velocity before
    the step, lr * update of the step). `buffers` are updated in place in train-mode BN (pass a copy)."""
    params, velocity = [theta0[n].detach() for n in _names(model)], None
    for t, b in enumerate(step_schedule(len(batches), epochs)):
        x, y = batches[b]
        model.train(sgd.bn_train)  # a consumer may switch modes between steps
        new_params, new_velocity, update = sgd_step(model, params, velocity, buffers, x.detach(), y, sgd)
        yield t, b, params, velocity, update
        params, velocity = new_params, new_velocity


def simulate_training_recompute(model, theta0, buffers, batches, epochs, sgd, loss_of_change, keep_every=1):
    """Memory-flat gradient of loss_of_change(theta0 - theta_hat_final) w.r.t. the batch images.

    Forward: the simulation without a graph, keeping theta_t (and the velocity) every `keep_every` steps.
    Backward, step by step from the last: recompute theta_t from the nearest kept one, rebuild that one
    step's graph, and take a single vector-Jacobian product. With u_t = clip(g_t(theta_t, x_b)) the
    update direction is v_t = momentum * v_{t-1} + u_t + wd * theta_t and theta_{t+1} = theta_t - lr * v_t,
    so with adjoints a_theta = dL/dtheta_{t+1} and a_v = dL/dv_{t+1}:
        w = dL/dv_t = -lr * a_theta + momentum * a_v
        a_theta <- a_theta + J_theta(u_t)^T w + wd * w,   dL/dx_b += J_x(u_t)^T w.
    Clipping is inside u_t, so autograd differentiates it. Train-mode BN statistics are replayed in the
    forward only: in train mode the outputs use batch statistics, so the recomputation runs on a scratch
    copy. Memory: one step's graph plus the kept parameters, whatever the number of steps.
    Returns (loss value tensor, list of image gradients per batch, final buffers).
    """
    names = _names(model)
    run_buffers = {k: v.clone() for k, v in buffers.items()} if sgd.bn_train else buffers
    schedule = step_schedule(len(batches), epochs)
    displacement = [torch.zeros_like(theta0[n]) for n in names]
    kept = {}
    for t, _, params, velocity, update in graph_free_steps(model, theta0, run_buffers, batches, epochs, sgd):
        if t % keep_every == 0:
            kept[t] = (params, velocity)
        displacement = [d + u for d, u in zip(displacement, update)]

    change = flat(displacement).requires_grad_(True)
    loss = loss_of_change(change)
    (dloss_dchange,) = torch.autograd.grad(loss, [change])
    # theta_T = theta0 - change, so dL/dtheta_T = -dL/dchange
    a_theta = [-a.view_as(d) for a, d in zip(dloss_dchange.split([d.numel() for d in displacement]), displacement)]
    a_v = None
    image_grads = [torch.zeros_like(x) for x, _ in batches]
    scratch = {k: v.clone() for k, v in buffers.items()} if sgd.bn_train else buffers
    for start in reversed(range(0, len(schedule), keep_every)):
        stop = min(start + keep_every, len(schedule))
        states = [kept.pop(start)]
        for t in range(start, stop - 1):  # recompute theta_t inside the segment
            x, y = batches[schedule[t]]
            p, v, _ = sgd_step(model, *states[-1], scratch, x.detach(), y, sgd)
            states.append((p, v))
        for t in reversed(range(start, stop)):
            p_t, _ = states.pop()
            x, y = batches[schedule[t]]
            p_leaf = [p.detach().requires_grad_(True) for p in p_t]
            x_leaf = x.detach().requires_grad_(True)
            u = loss_gradient(model, dict(zip(names, p_leaf)), scratch, x_leaf, y, sgd.clip_norm, sgd.clip_to,
                              create_graph=True)
            w = [-sgd.lr * a for a in a_theta]
            if sgd.momentum and a_v is not None:
                w = [wi + sgd.momentum * av for wi, av in zip(w, a_v)]
            vjp = torch.autograd.grad(u, p_leaf + [x_leaf], grad_outputs=w, allow_unused=True)
            a_theta = [a + (j if j is not None else 0) + sgd.weight_decay * wi
                       for a, j, wi in zip(a_theta, vjp[:-1], w)]
            if vjp[-1] is not None:
                image_grads[schedule[t]] += vjp[-1]
            a_v = w
    return loss.detach(), image_grads, run_buffers


def total_variation(x):
    """Mean absolute difference of neighbouring pixels (paper code)."""
    return (x[..., :, 1:] - x[..., :, :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def match_loss(sim_change, true_change, loss_type):
    """1 - cos (paper default) or squared distance between the simulated and true parameter change."""
    if loss_type == "cos":
        return 1 - F.cosine_similarity(sim_change, true_change, dim=0, eps=1e-20)
    return (sim_change - true_change).pow(2).sum()


def reconstruction_loss(model, theta0, buffers, x, labels, weight_change, rbs, epochs, sgd, tv_weight,
                        loss_type):
    """Simulate training on the dummies x (M×C×H×W, split in batches of rbs) and compare. Returns
    (total, match, tv) where tv is the unweighted sum over batches of TV(x_batch), as the paper code."""
    batches = list(zip(x.split(rbs), labels.split(rbs)))
    _, displacement, _ = simulate_training(model, theta0, buffers, batches, epochs, sgd)
    match = match_loss(flat(displacement.values()), weight_change, loss_type)
    tv = sum(total_variation(xb) for xb, _ in batches)
    return match + tv_weight * tv, match, tv


def reconstruction_loss_and_grad(model, theta0, buffers, x, labels, weight_change, rbs, epochs, sgd, tv_weight,
                                 loss_type, backprop="recompute", keep_every=None):
    """(total, match, tv) as reconstruction_loss, and d total / d x, by either reverse pass:
    'unrolled' keeps the whole simulated graph (the paper's), 'recompute' one step's graph at a time."""
    if backprop == "unrolled":
        total, match, tv = reconstruction_loss(model, theta0, buffers, x, labels, weight_change, rbs, epochs,
                                               sgd, tv_weight, loss_type)
        (grad,) = torch.autograd.grad(total, [x])
        return total.detach(), match.detach(), tv.detach(), grad
    x_leaf = x.detach().requires_grad_(True)
    batches = list(zip(x_leaf.split(rbs), labels.split(rbs)))
    steps = epochs * len(batches)
    k = keep_every or auto_keep_every(steps, sum(p.numel() * p.element_size() for p in theta0.values()))
    match, image_grads, _ = simulate_training_recompute(
        model, theta0, buffers, batches, epochs, sgd, lambda c: match_loss(c, weight_change, loss_type), k)
    tv = sum(total_variation(xb) for xb, _ in batches)
    (tv_grad,) = torch.autograd.grad(tv, [x_leaf])
    grad = torch.cat(image_grads) + tv_weight * tv_grad
    return match + tv_weight * tv.detach(), match, tv.detach(), grad


KEEP_ALL_BUDGET_BYTES = 512 * 2**20
AUTO_MEMORY_SHARE = 0.4  # --backprop auto: unrolled while its graph needs < 40% of the device's memory


def unrolled_graph_bytes(model, theta0, buffers, x, labels, rbs, epochs, sgd):
    """What the unrolled graph would hold: per simulated step, the tensors autograd saves (counted once per
    storage with saved-tensor hooks, so any model and device) plus two parameter-sized temporaries;
    calibrated on this CPU: ResNet-18 w16 53 MB/step predicted vs 50 measured, MLP-1000 47 vs 56."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    model.train(sgd.bn_train)
    params = {k: v.detach().requires_grad_(True) for k, v in theta0.items()}
    scratch = {k: v.clone() for k, v in buffers.items()} if sgd.bn_train else buffers
    xb = x[:rbs].detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_gradient(model, params, scratch, xb, labels[:rbs], math.inf, 1.0, create_graph=True)
    param_bytes = sum(p.numel() * p.element_size() for p in params.values())
    return (sum(storages.values()) + 2 * param_bytes) * epochs * math.ceil(len(x) / rbs)


def device_memory_bytes(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_backprop(requested, model, theta0, buffers, x, labels, rbs, epochs, sgd):
    """'auto': the paper's unrolled pass (faster) while its graph fits, else the memory-flat one."""
    if requested != "auto":
        return requested, None
    need = unrolled_graph_bytes(model, theta0, buffers, x, labels, rbs, epochs, sgd)
    budget = AUTO_MEMORY_SHARE * device_memory_bytes(x.device)
    return ("unrolled" if need <= budget else "recompute"), need


def auto_keep_every(steps, param_bytes, budget=KEEP_ALL_BUDGET_BYTES):
    """Keep every theta_t while they fit in `budget`; beyond, every ~sqrt(T)-th (T/k kept + k recomputed)."""
    if steps * param_bytes <= budget:
        return 1
    return max(1, math.ceil(math.sqrt(steps)))


# ----------------------------------------------------------------------------------------------
# Setting up a run from the training run folder.


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


@dataclass
class TrainingRun:
    """A training run folder, loaded: the model, theta0 and theta_final (parameters and buffers apart),
    the true change theta0 - theta_final over the parameters (flat) and its config.json."""
    model: torch.nn.Module
    theta0: dict
    buffers: dict
    theta_final: dict
    final_buffers: dict
    weight_change: torch.Tensor
    config: dict


def load_training_run(train_dir, device):
    config = read_json(os.path.join(train_dir, "config.json"), what="training (train.py)")
    targs = config["args"]
    model = build_model(targs["model_name"], config["data"]["num_classes"], config["data"]["image_shape"],
                        targs["width"])
    states = {}
    for name in ("theta0", "theta_final"):
        path = os.path.join(train_dir, f"{name}.pth")
        state = load_checkpoint(path, name)
        try:
            model.load_state_dict(state)
        except RuntimeError:
            raise UserError(f"{path} was saved from another architecture than {targs['model_name']}"
                            f" (width {targs['width']}); retrain with train.py or fix the run folder") from None
        states[name] = {k: v.to(device) for k, v in state.items()}
    model.to(device)
    names = _names(model)  # parameter order = weight_change order = the simulation's

    def split(state):
        return {n: state[n] for n in names}, {k: v for k, v in state.items() if k not in names}
    theta0, buffers = split(states["theta0"])
    theta_final, final_buffers = split(states["theta_final"])
    weight_change = flat(theta0[n] - theta_final[n] for n in names)
    return TrainingRun(model, theta0, buffers, theta_final, final_buffers, weight_change, config)


def num_dummies(requested, num_imgs_per_class, train_dir_given, data, method):
    """--num_dummy, else N (SimuDy) or 2N candidates (baselines); N from the flags, or from the training
    folder when --train_dir names it (then the folder, not the flags, says how many)."""
    if requested is not None:
        if requested < 1:
            raise UserError(f"--num_dummy {requested} must be at least 1")
        return requested
    num_train = num_imgs_per_class * data["num_classes"]
    if train_dir_given and num_train != data["num_images"]:
        num_train = data["num_images"]
    return num_train if method == "simudy" else BASELINE_CANDIDATE_RATIO * num_train


def sgd_config_from_training(train_config, rlr, clip_norm=math.inf, clip_to=5.0):
    targs = train_config["args"]
    return SGDConfig(lr=rlr, momentum=targs.get("momentum", 0.0), weight_decay=targs.get("weight_decay", 0.0),
                     bn_train=targs.get("bn_mode", "eval") == "train", clip_norm=clip_norm, clip_to=clip_to)


def snapshot_path(run_dir, prefix, step):
    """<epoch>_<step>.pth (SimuDy) or x_<step>.pth (baselines): the paper code's names."""
    return os.path.join(run_dir, f"{prefix}_{step}.pth")


def save_snapshot(run_dir, prefix, x, labels, epoch, step, **extra):
    path = snapshot_path(run_dir, prefix, step)
    torch.save({"x": x.detach().cpu().clone(), "labels": labels.cpu(), "epoch": epoch, "step": step, **extra},
               path)
    return path


# ----------------------------------------------------------------------------------------------
# The outer loop and its bookkeeping (run folder, log, snapshots, resume, NaN), shared by the methods.


@dataclass
class RunState:
    """What a run moves and what --resume restores in place: tensors (x, duals), objects with a
    state_dict (optimisers, schedulers) and the dummies' labels."""
    tensors: dict
    stateful: dict
    labels: torch.Tensor


class NonFiniteLoss(Exception):
    """An iteration's loss is nan or inf (raised before the dummies move)."""


def check_finite(value, where):
    if not math.isfinite(value):
        raise NonFiniteLoss(f"the loss became {value} at {where}")
    return value


def save_resume_state(run_dir, state, iteration):
    path = os.path.join(run_dir, "resume.pth")
    torch.save({**{k: t.detach().cpu() for k, t in state.tensors.items()},
                **{k: o.state_dict() for k, o in state.stateful.items()}, "iteration": iteration}, path + ".tmp")
    os.replace(path + ".tmp", path)


def truncate_log(path, iterations):
    """Keep the log rows of the first `iterations` iterations (rows written after the last resume state)."""
    with open(path) as f:
        rows = list(csv.DictReader(f))[:iterations]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        w.writeheader()
        w.writerows(rows)


def open_run(run_dir, state, resume, overwrite, device):
    """A fresh run folder (labels.pth, log header), or with `resume` the folder's last resume state and
    labels restored into `state` and the log cut to it. Returns the first iteration to run."""
    log_path = os.path.join(run_dir, "log.csv")
    if not resume:
        prepare_run_dir(run_dir, overwrite)
        torch.save(state.labels.cpu(), os.path.join(run_dir, "labels.pth"))
        with open(log_path, "w", newline="") as f:
            csv.DictWriter(f, fieldnames=LOG_FIELDS).writeheader()
        return 0
    resume_path = os.path.join(run_dir, "resume.pth")
    if not os.path.isfile(resume_path):
        raise UserError(f"nothing to resume in {run_dir} (no resume.pth); start without --resume")
    saved = torch.load(resume_path, map_location="cpu", weights_only=False)
    with torch.no_grad():
        for k, t in state.tensors.items():
            t.copy_(saved[k].to(device))
        state.labels.copy_(torch.load(os.path.join(run_dir, "labels.pth")).to(device))
    for k, o in state.stateful.items():
        o.load_state_dict(saved[k])
    start = saved["iteration"] + 1
    truncate_log(log_path, start)
    print(f"resuming {run_dir} at iteration {start}")
    return start


def run_iterations(iterate, iterations, log_path=None, save=None, stop_on_nonfinite=False, deadline=None):
    """The outer loop: iterate(i) computes the loss, moves the dummies and returns the log row; a log.csv
    row per iteration; save(i) writes a snapshot when one is due and returns its path (else None).

    A non-finite loss ends the run with a one-line error naming the last good snapshot, or with
    `stop_on_nonfinite` (short runs) a last row of total nan. Ctrl-C ends a run that saves resumably.
    The loop also ends after the first iteration that finishes past `deadline` (a time.time() value).
    Returns (last row or None, whether the loop ended without Ctrl-C)."""
    log_file = open(log_path, "a", newline="") if log_path else None
    log = csv.DictWriter(log_file, fieldnames=LOG_FIELDS) if log_file else None
    bar = tqdm(iterations, desc="recons", disable=None)
    started, last_good, row = time.time(), None, None
    try:
        for iteration in bar:
            try:
                row = {"iteration": iteration, **iterate(iteration)}
            except NonFiniteLoss as err:
                if stop_on_nonfinite:
                    return {"iteration": iteration, "total": float("nan")}, True
                raise UserError(f"{err}; the last good snapshot is {last_good or 'none'}; lower --rec_lr or"
                                f" --rlr and restart") from None
            row["seconds"] = round(time.time() - started, 3)
            if log:
                log.writerow(row)
                log_file.flush()  # before a snapshot's resume state, so the log never lags it
            bar.set_postfix(loss=f"{row['total']:.4f}", refresh=False)
            last_good = (save(iteration) if save else None) or last_good
            if deadline is not None and time.time() >= deadline:
                break
    except KeyboardInterrupt:
        if save is None:  # a short run has nothing to resume from: end the whole search
            raise
        print(f"\ninterrupted; continue with --resume (from {last_good or 'the start'})")
        return row, False
    finally:
        if log_file:
            log_file.close()
    return row, True


def run_to_end(run_dir, state, start, total, max_iterations, iterate, save_every, steps_per_epoch,
               write_snapshot, max_minutes=0):
    """Iterations start .. total, with a snapshot (write_snapshot(i) -> its path) and the resume state every
    `save_every` steps of an outer epoch (0: none) and at the last iteration. A run stopped early by
    --max_iterations or --max_minutes writes both at its last iteration, so it can be scored and resumed.
    Returns the last loss (nan if no iteration ran)."""
    end = min(total, max_iterations or total)
    deadline = time.time() + 60 * max_minutes if max_minutes else None

    def due(iteration):
        return (save_every and iteration % steps_per_epoch % save_every == 0) or iteration == total - 1

    newest = None  # (iteration, path) of the newest snapshot

    def save(iteration, stopping=False):
        nonlocal newest
        if not (due(iteration) or stopping):
            return None
        newest = (iteration, write_snapshot(iteration))
        save_resume_state(run_dir, state, iteration)
        return newest[1]
    row, finished = run_iterations(iterate, range(start, end), os.path.join(run_dir, "log.csv"), save,
                                   deadline=deadline)
    last = row["iteration"] if row else None
    if finished and last is not None and last < total - 1:
        path = newest[1] if newest and newest[0] == last else save(last, stopping=True)
        print(f"stopped after {last + 1} of {total} iterations (snapshot {path}); continue with --resume")
    return float("nan") if row is None else row["total"]


def snapshot_interval(requested, kind):
    """--save_every, or the paper code's interval for SimuDy / the baselines."""
    return SAVE_EVERY[kind] if requested is None else requested


def run_config(args, train_dir, device, **fields):
    return {"stage": "recons", "method": args.method, "args": vars(args), "train_dir": train_dir,
            "seed": args.seed, **fields, "versions": library_versions(), "device": str(device),
            "cpu_threads": torch.get_num_threads(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}  # set per job by grid_search.sh


def final_loss_text(loss, run_dir):
    return f"final loss {loss:.5f}; run folder {run_dir}"


# ----------------------------------------------------------------------------------------------
# SimuDy's iterations, full and short (--grid_search 1, --rlr/--rbs auto).


@dataclass
class SimuDySetup:
    """Everything a SimuDy iteration needs besides the dummies and their optimiser."""
    run: TrainingRun
    rbs: int
    epochs: int            # simulated epochs (--steps)
    sgd: SGDConfig
    clipped_sgd: SGDConfig  # during the first clip_epochs outer epochs
    clip_epochs: int
    tv_weight: float
    loss_type: str
    backprop: str
    keep_every: int


def simudy_setup(run, rlr, rbs, args, x, labels):
    """(SimuDySetup, bytes the unrolled graph would need or None) for this rlr/rbs and the flags."""
    sgd = sgd_config_from_training(run.config, rlr)
    backprop, graph_bytes = choose_backprop(args.backprop, run.model, run.theta0, run.buffers, x, labels, rbs,
                                            args.steps, sgd)
    return SimuDySetup(run, rbs, args.steps, sgd, sgd_config_from_training(run.config, rlr, args.clip_norm,
                                                                            args.clip_to),
                       args.clip_epochs, args.tv_weight, args.loss_type, backprop, args.keep_every), graph_bytes


def simudy_optimisers(x, rec_lr, schedule="paper", total=None):
    """Adam on the dummies and its lr schedule, stepped every iteration. "paper": CosineAnnealingLR(T_max=100),
    which is periodic (the lr returns to rec_lr every 200 iterations); "cosine": one decay from rec_lr to 0
    over the run's `total` iterations, so the run ends at a small lr instead of on a peak."""
    opt = torch.optim.Adam([x], lr=rec_lr, betas=ADAM_BETAS)
    t_max = COSINE_T_MAX if schedule == "paper" or not total else total
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max)


def simudy_iteration(setup, x, labels, opt, sched, steps_per_epoch):
    """iterate(i) for run_iterations: one SimuDy step (the loss gradient stays in x.grad)."""
    run = setup.run

    def iterate(iteration):
        epoch, step = divmod(iteration, steps_per_epoch)
        sim = setup.clipped_sgd if epoch < setup.clip_epochs else setup.sgd
        loss, match, tv, grad = reconstruction_loss_and_grad(
            run.model, run.theta0, run.buffers, x, labels, run.weight_change, setup.rbs, setup.epochs, sim,
            setup.tv_weight, setup.loss_type, setup.backprop, setup.keep_every)
        total = check_finite(loss.item(), f"epoch {epoch} step {step}")
        row = {"epoch": epoch, "step": step, "total": total, "cos": match.item(), "tv": tv.item(),
               "lr": sched.get_last_lr()[0]}
        x.grad = grad
        opt.step()
        sched.step()
        return row
    return iterate


def short_run(setup, x, labels, rec_lr, iterations, log_path=None):
    """The paper's selection run (--grid_search 1, --rlr/--rbs auto): `iterations` SimuDy steps in one
    epoch from the given start, no snapshots. Returns the last loss (nan if it diverged)."""
    opt, sched = simudy_optimisers(x, rec_lr)
    row, _ = run_iterations(simudy_iteration(setup, x, labels, opt, sched, iterations), range(iterations),
                            log_path, stop_on_nonfinite=True)
    return float("nan") if row is None else row["total"]


RANKING_BUDGET_BYTES = 256 * 2**20  # per-dummy gradient sums held at once; more dummies = more passes


def total_gradient_norms(model, theta0, buffers, x, labels, rbs, epochs, sgd, budget=RANKING_BUDGET_BYTES):
    """||sum_t grad_theta loss(theta_t; x_j, y_j)|| for every dummy j: its total gradient over the simulated
    training (theta_t along the simulation without a graph), the quantity the paper's appendix ranks by
    (matched dummies 1.55 on average, unmatched 0.55). Per-dummy gradients use BatchNorm's running
    statistics and no clip. Dummies are taken in chunks whose sums fit in `budget` bytes, one graph-free
    simulation per chunk, so memory stays bounded whatever the number of dummies."""
    from torch.func import grad, vmap
    x, labels = x.detach(), labels.detach()
    batches = list(zip(x.split(rbs), labels.split(rbs)))
    names = list(theta0)
    param_bytes = sum(p.numel() * p.element_size() for p in theta0.values())
    chunk = max(1, budget // param_bytes)
    was_training = model.training

    def sample_loss(params, xi, yi, bufs):
        return F.cross_entropy(functional_call(model, {**params, **bufs}, (xi[None],)), yi[None])
    per_sample_grads = vmap(grad(sample_loss), in_dims=(None, 0, 0, None))
    norms = []
    for lo in range(0, len(x), chunk):
        hi = min(lo + chunk, len(x))
        sums = {k: torch.zeros((hi - lo, *v.shape), device=v.device, dtype=v.dtype) for k, v in theta0.items()}
        bufs = {k: v.clone() for k, v in buffers.items()}
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


def rank_dummies(norms):
    """Dummy indices by descending total-gradient norm (ties keep index order)."""
    return torch.argsort(norms, descending=True, stable=True)


def write_ranking(path, ranking, norms, labels):
    write_csv(path, [{"rank": r, "dummy": int(j), "label": int(labels[j]), "grad_norm": float(norms[j])}
                     for r, j in enumerate(ranking)], ["rank", "dummy", "label", "grad_norm"])


# ----------------------------------------------------------------------------------------------
# --rlr auto / --rbs auto: the paper's selection (grid_search.sh) in-process.


def search_candidates(rlr, rbs, tlr, bs, rlr_candidates, rbs_candidates):
    """(rlr, rbs) pairs to try: the candidates of each flag that is auto, the resolved value of the other."""
    if rlr == AUTO:
        rlrs = rlr_candidates or list(PAPER_RLR_CANDIDATES)
    else:
        rlrs = [rlr or tlr]
    if rbs == AUTO:
        rbss = rbs_candidates or sorted({max(1, bs // 2), bs, 2 * bs})
    else:
        rbss = [rbs or bs]
    if min(rlrs) <= 0 or min(rbss) < 1:
        raise UserError("--rlr_candidates must be positive and --rbs_candidates at least 1; fix the lists")
    return [(lr, b) for b in dict.fromkeys(rbss) for lr in dict.fromkeys(rlrs)]


def paper_avg_ssim(train_images, recons):
    """metrics.py's number: greedy SSIM matching, matched sum over the number of training images."""
    from metrics import match_by_ssim, ssim_matrix  # scipy and friends only when a search runs
    ssim = ssim_matrix(train_images, recons)
    return float(sum(ssim[r, c] for r, c in match_by_ssim(ssim)) / len(train_images))


def auto_search(run, args, candidates, num_dummy, rec_lr, device, train_images=None):
    """A short run per (rlr, rbs) from the same seeded start; returns rows sorted by final loss (best
    first), with each run's avg SSIM against the training images when those are given."""
    data = run.config["data"]
    rows = []
    for rlr, rbs in candidates:
        x, labels, _ = initial_dummies(num_dummy, data["image_shape"], data["num_classes"], args.seed, device)
        setup, _ = simudy_setup(run, rlr, rbs, args, x, labels)
        loss = short_run(setup, x, labels, rec_lr, GRID_SEARCH_STEPS)
        ssim = None if train_images is None else paper_avg_ssim(train_images, x.detach().cpu())
        rows.append({"rlr": rlr, "rbs": rbs, "final_loss": loss, "avg_ssim": ssim})
    rows = print_candidates(rows)
    if not math.isfinite(rows[0]["final_loss"]):
        raise UserError("every short run's loss became nan or inf; lower --rec_lr or try smaller --rlr_candidates")
    return rows


def plot_auto_search(rows, path):
    """Final loss vs rlr, a line per rbs; avg SSIM on a second axis (the paper's Fig. 2: loss tracks SSIM)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ssim_ax = ax.twinx() if any(r["avg_ssim"] is not None for r in rows) else None
    for rbs in sorted({r["rbs"] for r in rows}):
        line = sorted((r for r in rows if r["rbs"] == rbs), key=lambda r: r["rlr"])
        lrs = [r["rlr"] for r in line]
        drawn = ax.plot(lrs, [r["final_loss"] for r in line], marker="o", label=f"loss, rbs {rbs}")
        if ssim_ax:
            ssim_ax.plot(lrs, [r["avg_ssim"] for r in line], marker="x", linestyle="--",
                         color=drawn[0].get_color(), label=f"SSIM, rbs {rbs}")
    ax.set_xlabel("simulation lr (rlr)")
    ax.set_ylabel(f"final loss after {GRID_SEARCH_STEPS} steps")
    handles, names = ax.get_legend_handles_labels()
    if ssim_ax:
        ssim_ax.set_ylabel("avg SSIM (paper metric)")
        more = ssim_ax.get_legend_handles_labels()
        handles, names = handles + more[0], names + more[1]
    ax.legend(handles, names, fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# The baselines: one_step (Buzaglo et al.) and two_step (Loo et al.).


def weighted_gradient(model, params, buffers, x, labels, duals):
    """grad_theta sum_i lambda_i * CE(f_theta(x_i), y_i) at `params`, flat; differentiable w.r.t. x and the
    duals (create_graph), as the paper code's autograd.grad of the per-sample losses dotted with lambda."""
    params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    out = functional_call(model, {**params, **buffers}, (x,))
    losses = F.cross_entropy(out, labels, reduction="none")
    return flat(torch.autograd.grad(losses @ duals, list(params.values()), create_graph=True))


def baseline_loss_weights(step):
    """(l2, cos, tv) weights of the baselines' loss at this step (BASELINE_LOSS_SCHEDULE)."""
    return next(tuple(weights) for until, *weights in BASELINE_LOSS_SCHEDULE if step < until)


def baseline_loss(gradient, weight_change, x, step):
    """(total, l2, cos, tv): l2 = ||g - (theta0 - theta_f)||^2, cos = 1 - cos(g, theta0 - theta_f),
    tv = TV(x) over all candidates, total weighted by the step's row of the schedule."""
    l2 = (gradient - weight_change).pow(2).sum()
    cos = 1 - F.cosine_similarity(gradient, weight_change, dim=0, eps=1e-20)
    tv = total_variation(x)
    # terms of weight 0 are left out, not multiplied: 0 * inf would make the loss nan
    total = sum(w * term for w, term in zip(baseline_loss_weights(step), (l2, cos, tv)) if w)
    return total, l2, cos, tv


def baseline_points(run, method):
    """(name, params, buffers) where the baseline takes its weighted gradients: theta_f (one_step), or
    theta0 and theta_f (two_step)."""
    points = [("theta_final", run.theta_final, run.final_buffers)]
    if method == "two_step":
        points.insert(0, ("theta0", run.theta0, run.buffers))
    return points


def baseline_iteration(run, points, x, labels, duals, opt, sched, dual_opt):
    """iterate(i) for run_iterations: one baseline step on the candidates and their duals."""
    run.model.eval()  # BatchNorm in eval mode, as the paper code

    def iterate(iteration):
        gradient = sum(weighted_gradient(run.model, params, buffers, x, labels, duals[name])
                       for name, params, buffers in points)
        total, l2, cos, tv = baseline_loss(gradient, run.weight_change, x, iteration)
        check_finite(total.item(), f"step {iteration}")
        moved = [x, *duals.values()]
        for t, g in zip(moved, torch.autograd.grad(total, moved)):  # not backward: theta needs no grad
            t.grad = g
        row = {"epoch": 0, "step": iteration, "total": total.item(), "cos": cos.item(), "tv": tv.item(),
               "l2": l2.item(), "lr": sched.get_last_lr()[0]}
        opt.step()
        dual_opt.step()
        sched.step()
        return row
    return iterate


def reconstruct_baseline(args, run, train_dir, run_dir, num_dummy, rec_lr, device):
    data = run.config["data"]
    x, labels, gen = initial_dummies(num_dummy, data["image_shape"], data["num_classes"], args.seed, device)
    points = baseline_points(run, args.method)
    duals = {name: ((torch.rand(num_dummy, generator=gen) * 2 - 1) * DUAL_INIT_HALF_WIDTH).to(device)
             .requires_grad_(True) for name, _, _ in points}
    opt = torch.optim.Adam([x], lr=rec_lr, betas=ADAM_BETAS)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=BASELINE_COSINE_T_MAX)
    dual_opt = torch.optim.SGD(list(duals.values()), lr=args.rec_lambda_lr, momentum=DUAL_MOMENTUM)
    state = RunState({"x": x, **{f"duals_{k}": v for k, v in duals.items()}},
                     {"optimizer": opt, "scheduler": sched, "dual_optimizer": dual_opt}, labels)
    start = open_run(run_dir, state, args.resume, args.overwrite, device)
    write_json(os.path.join(run_dir, "config.json"), run_config(args, train_dir, device, num_dummy=num_dummy,
                                                                rec_lr=rec_lr, rec_lambda_lr=args.rec_lambda_lr))
    total = args.baseline_steps
    loss = run_to_end(run_dir, state, start, total, args.max_iterations,
                      baseline_iteration(run, points, x, labels, duals, opt, sched, dual_opt),
                      snapshot_interval(args.save_every, "baseline"), total,
                      lambda i: save_snapshot(run_dir, "x", x, labels, 0, i,
                                              duals={k: v.detach().cpu().clone() for k, v in duals.items()}),
                      args.max_minutes)
    print(final_loss_text(loss, run_dir))
    return run_dir


# ----------------------------------------------------------------------------------------------


def resolved_args(args, **values):
    """A copy of args with resolved values (rec_lr, chosen rlr/rbs), so config.json and the folder name
    record what ran."""
    return argparse.Namespace(**{**vars(args), **values})


def main(args):
    device = pick_device(args.device)
    set_seed(args.seed)
    auto = AUTO in (args.rlr, args.rbs)
    if args.method != "simudy" and (auto or args.grid_search):
        raise UserError(f"--rlr/--rbs auto and --grid_search tune SimuDy's simulation; drop them for"
                        f" --method {args.method}")
    if auto and (args.grid_search or args.resume):
        raise UserError("--rlr/--rbs auto runs its own short runs and cannot resume; pass the chosen"
                        " --rlr/--rbs (printed, and in auto_search.csv) with --grid_search or --resume")
    args = resolved_args(args, rec_lr=resolve_rec_lr(args, args.method))
    train_dir = args.train_dir or train_dir_from_args(args, args.tlr)
    run = load_training_run(train_dir, device)
    args = resolved_args(args, steps=resolve_steps(args))  # --steps 0: the training's epochs
    data = run.config["data"]
    num_dummy = num_dummies(args.num_dummy, args.num_imgs_per_class, bool(args.train_dir), data, args.method)
    if args.method != "simudy":
        return reconstruct_baseline(args, run, train_dir, recons_dir_from_args(args, args.method), num_dummy,
                                    args.rec_lr, device)

    search = None
    if auto:
        subset_path, train_images = os.path.join(train_dir, "train_subset.pth"), None
        if os.path.isfile(subset_path):  # then each short run's SSIM too (the paper's Fig. 2)
            train_images = load_checkpoint(subset_path, "training subset")["images"]
        candidates = search_candidates(args.rlr, args.rbs, args.tlr, args.bs, args.rlr_candidates,
                                       args.rbs_candidates)
        search = auto_search(run, args, candidates, num_dummy, args.rec_lr, device, train_images)
        args = resolved_args(args, rlr=search[0]["rlr"], rbs=search[0]["rbs"])
    rlr, rbs = resolve_simulation_hparams(args)
    run_dir = recons_dir_from_args(args)
    if search:
        print(f"\nauto search chose --rlr {rlr:g} --rbs {rbs} (lowest loss after {GRID_SEARCH_STEPS} steps);"
              f" run folder {run_dir}")

    x, labels, _ = initial_dummies(num_dummy, data["image_shape"], data["num_classes"], args.seed, device)
    setup, graph_bytes = simudy_setup(run, rlr, rbs, args, x, labels)
    if graph_bytes is not None:
        print(f"backprop: {setup.backprop} (the unrolled graph would need ~{graph_bytes / 2**30:.1f} GiB)")
    opt, sched = simudy_optimisers(x, args.rec_lr, args.schedule, args.rec_epochs * args.rec_steps_per_epoch)
    state = RunState({"x": x}, {"optimizer": opt, "scheduler": sched}, labels)
    start = open_run(run_dir, state, args.resume, args.overwrite, device)
    config = run_config(args, train_dir, device, rlr=rlr, rbs=rbs, num_dummy=num_dummy,
                        simulation=vars(setup.sgd), backprop=setup.backprop)
    if search:
        write_csv(os.path.join(run_dir, "auto_search.csv"), search, ["rlr", "rbs", "final_loss", "avg_ssim"])
        plot_auto_search(search, os.path.join(run_dir, "auto_search.png"))
        config["auto_search"] = {"steps": GRID_SEARCH_STEPS, "chosen": {"rlr": rlr, "rbs": rbs},
                                 "candidates": search}
    elif args.resume:  # a resumed run keeps the record of the search that chose its values
        config.update({k: v for k, v in read_json(os.path.join(run_dir, "config.json")).items()
                       if k == "auto_search"})
    write_json(os.path.join(run_dir, "config.json"), config)

    if args.grid_search:
        iterations = min(GRID_SEARCH_STEPS, args.max_iterations or GRID_SEARCH_STEPS)
        loss = short_run(setup, x, labels, args.rec_lr, iterations, os.path.join(run_dir, "log.csv"))
        write_json(os.path.join(run_dir, "grid_result.json"),
                   {"rlr": rlr, "rbs": rbs, "final_loss": loss, "iterations": iterations})
        print(final_loss_text(loss, run_dir))
        return run_dir

    steps_per_epoch = args.rec_steps_per_epoch
    total = args.rec_epochs * steps_per_epoch

    def dummy_norms():  # the unknown-N ranking (--num_dummy); the simulation's sgd, clip off
        return total_gradient_norms(run.model, run.theta0, run.buffers, x, labels, setup.rbs, setup.epochs,
                                    setup.sgd)

    ranked = {}  # the newest snapshot's ranking, for ranking.csv

    def write_snapshot(iteration):
        epoch, step = divmod(iteration, steps_per_epoch)
        if args.num_dummy:
            norms = dummy_norms()
            ranked.update(ranking=rank_dummies(norms), grad_norms=norms)
        return save_snapshot(run_dir, epoch, x, labels, epoch, step, **ranked)
    loss = run_to_end(run_dir, state, start, total, args.max_iterations,
                      simudy_iteration(setup, x, labels, opt, sched, steps_per_epoch),
                      snapshot_interval(args.save_every, "simudy"), steps_per_epoch, write_snapshot,
                      args.max_minutes)
    if ranked:  # every run that ends or stops writes a snapshot at its last iteration
        write_ranking(os.path.join(run_dir, "ranking.csv"), ranked["ranking"], ranked["grad_norms"], labels)
    print(final_loss_text(loss, run_dir))
    return run_dir


if __name__ == "__main__":
    run_main(main, parse_args)
