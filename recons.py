"""Stage 2: reconstruct the training images from theta0 and theta_final alone (SimuDy).

Dummy images start as noise (randn * 0.5) with balanced random labels. Each iteration simulates the
training on them (same lr, batch size, `--steps` epochs, unrolled SGD) and moves the dummies so that
the simulated change theta0 - theta_hat_f points the way of theta0 - theta_f:
    loss = 1 - cos(theta0 - theta_hat_f, theta0 - theta_f) + tv_weight * sum_batches TV(x_batch)

    python ./recons.py --num_imgs_per_class 2 --tlr 1e-2 --bs 20 --rec_lr 1e-2
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
from utils import (UserError, add_data_args, add_model_args, add_recons_id_args, add_runtime_args,
                   add_training_hparam_args, library_versions, load_checkpoint, pick_device, prepare_run_dir,
                   read_json, recons_dir_from_args, resolve_simulation_hparams, run_main, set_seed,
                   train_dir_from_args, write_json)

# The paper code's constants, as named defaults.
INIT_SCALE = 0.5          # dummy images start as randn * 0.5
ADAM_BETAS = (0.8, 0.9)
COSINE_T_MAX = 100        # CosineAnnealingLR(T_max=100), stepped every iteration (period 200)
GRID_SEARCH_STEPS = 50    # --grid_search 1: one epoch of 50 steps
LOG_FIELDS = ["iteration", "epoch", "step", "total", "cos", "tv", "lr", "seconds"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_hparam_args(p, "--tlr")
    add_model_args(p)
    add_data_args(p)
    add_recons_id_args(p)
    add_runtime_args(p)
    g = p.add_argument_group("reconstruction")
    g.add_argument("--grid_search", default=0, type=int, choices=[0, 1],
                   help="1: a short run (1 x 50 steps) whose final loss grid_search.sh compares")
    g.add_argument("--loss_type", default="cos", type=loss_type_name,
                   help="cos (or 0, the paper's) or l2 (or 1): how simulated and true change compare")
    g.add_argument("--tv_weight", default=1e-3, type=float,
                   help="weight of total variation (the paper code's effective 0.1*0.01)")
    g.add_argument("--rec_epochs", default=20, type=int, help="outer epochs (paper code: 20)")
    g.add_argument("--rec_steps_per_epoch", default=1500, type=int, help="iterations per outer epoch")
    g.add_argument("--save_every", default=100, type=int, help="snapshot <epoch>_<step>.pth every N steps")
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
    return p.parse_args(argv)


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
    model.train(sgd.bn_train)
    run_buffers = {k: v.clone() for k, v in buffers.items()} if sgd.bn_train else buffers
    schedule = [b for _ in range(epochs) for b in range(len(batches))]
    params, velocity = [theta0[n].detach() for n in names], None
    displacement = [torch.zeros_like(p) for p in params]
    kept = {}
    for t, b in enumerate(schedule):
        if t % keep_every == 0:
            kept[t] = (params, velocity)
        x, y = batches[b]
        params, velocity, update = sgd_step(model, params, velocity, run_buffers, x.detach(), y, sgd)
        displacement = [d + u for d, u in zip(displacement, update)]

    change = flat(displacement).requires_grad_(True)
    loss = loss_of_change(change)
    (dloss_dchange,) = torch.autograd.grad(loss, [change])
    # theta_T = theta0 - change, so dL/dtheta_T = -dL/dchange
    a_theta = [-a.view_as(p) for a, p in zip(dloss_dchange.split([p.numel() for p in params]), params)]
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


def load_training_run(train_dir, device):
    """theta0, theta_final (params and buffers split), the model and the training config."""
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
    param_names = [n for n, _ in model.named_parameters()]
    theta0 = {n: states["theta0"][n] for n in param_names}
    buffers = {n: v for n, v in states["theta0"].items() if n not in theta0}
    weight_change = flat(states["theta0"][n] - states["theta_final"][n] for n in param_names)
    return model, theta0, buffers, weight_change, config


def sgd_config_from_training(train_config, rlr, clip_norm=math.inf, clip_to=5.0):
    targs = train_config["args"]
    return SGDConfig(lr=rlr, momentum=targs.get("momentum", 0.0), weight_decay=targs.get("weight_decay", 0.0),
                     bn_train=targs.get("bn_mode", "eval") == "train", clip_norm=clip_norm, clip_to=clip_to)


def snapshot_path(run_dir, epoch, step):
    return os.path.join(run_dir, f"{epoch}_{step}.pth")


def save_snapshot(run_dir, x, labels, epoch, step):
    torch.save({"x": x.detach().cpu().clone(), "labels": labels.cpu(), "epoch": epoch, "step": step},
               snapshot_path(run_dir, epoch, step))


def save_resume_state(run_dir, x, opt, sched, iteration):
    path = os.path.join(run_dir, "resume.pth")
    torch.save({"x": x.detach().cpu(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "iteration": iteration}, path + ".tmp")
    os.replace(path + ".tmp", path)


def truncate_log(path, iterations):
    """Keep the log rows of the first `iterations` iterations (rows written after the last resume state)."""
    with open(path) as f:
        rows = list(csv.DictReader(f))[:iterations]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        w.writeheader()
        w.writerows(rows)


def main(args):
    device = pick_device(args.device)
    set_seed(args.seed)
    rlr, rbs = resolve_simulation_hparams(args)
    train_dir = args.train_dir or train_dir_from_args(args, args.tlr)
    run_dir = recons_dir_from_args(args)
    if args.grid_search:
        epochs, steps_per_epoch, save_every = 1, GRID_SEARCH_STEPS, 0
    else:
        epochs, steps_per_epoch, save_every = args.rec_epochs, args.rec_steps_per_epoch, args.save_every

    model, theta0, buffers, weight_change, train_config = load_training_run(train_dir, device)
    data = train_config["data"]
    num_dummy = args.num_imgs_per_class * data["num_classes"]
    if args.train_dir and num_dummy != data["num_images"]:
        num_dummy = data["num_images"]  # --train_dir given: the folder, not the flags, says how many
    sgd = sgd_config_from_training(train_config, rlr)
    clipped_sgd = sgd_config_from_training(train_config, rlr, args.clip_norm, args.clip_to)

    # Dummies and labels come from a CPU generator, so a seed gives the same start on any device.
    gen = torch.Generator().manual_seed(args.seed)
    x = (torch.randn(num_dummy, *data["image_shape"], generator=gen) * INIT_SCALE).to(device)
    labels = balanced_random_labels(num_dummy, data["num_classes"], gen).to(device)
    x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=args.rec_lr, betas=ADAM_BETAS)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=COSINE_T_MAX)

    log_path = os.path.join(run_dir, "log.csv")
    start_iteration = 0
    resume_path = os.path.join(run_dir, "resume.pth")
    if args.resume:
        if not os.path.isfile(resume_path):
            raise UserError(f"nothing to resume in {run_dir} (no resume.pth); start without --resume")
        state = torch.load(resume_path, map_location="cpu", weights_only=False)
        with torch.no_grad():
            x.copy_(state["x"].to(device))
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_iteration = state["iteration"] + 1
        labels = torch.load(os.path.join(run_dir, "labels.pth")).to(device)
        truncate_log(log_path, start_iteration)
        print(f"resuming {run_dir} at iteration {start_iteration}")
    else:
        prepare_run_dir(run_dir, args.overwrite)
        torch.save(labels.cpu(), os.path.join(run_dir, "labels.pth"))
        with open(log_path, "w", newline="") as f:
            csv.DictWriter(f, fieldnames=LOG_FIELDS).writeheader()
    backprop, graph_bytes = choose_backprop(args.backprop, model, theta0, buffers, x, labels, rbs, args.steps,
                                            sgd)
    if graph_bytes is not None:
        print(f"backprop: {backprop} (the unrolled graph would need ~{graph_bytes / 2**30:.1f} GiB)")
    write_json(os.path.join(run_dir, "config.json"), {
        "stage": "recons", "method": "simudy", "args": vars(args), "train_dir": train_dir, "seed": args.seed,
        "rlr": rlr, "rbs": rbs, "num_dummy": num_dummy, "simulation": vars(sgd), "backprop": backprop,
        "versions": library_versions(), "device": str(device)})

    total_iterations = epochs * steps_per_epoch
    end_iteration = min(total_iterations, args.max_iterations or total_iterations)
    log_file = open(log_path, "a", newline="")
    log = csv.DictWriter(log_file, fieldnames=LOG_FIELDS)
    bar = tqdm(range(start_iteration, end_iteration), desc="recons", disable=None)
    started, last_good, loss_value = time.time(), None, float("nan")
    try:
        for iteration in bar:
            epoch, step = divmod(iteration, steps_per_epoch)
            sim = clipped_sgd if epoch < args.clip_epochs else sgd
            loss, match, tv, grad = reconstruction_loss_and_grad(
                model, theta0, buffers, x, labels, weight_change, rbs, args.steps, sim, args.tv_weight,
                args.loss_type, backprop, args.keep_every)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise UserError(f"the loss became {loss_value} at epoch {epoch} step {step}; the last good"
                                f" snapshot is {last_good or 'none'}; lower --rec_lr or --rlr and restart")
            log.writerow({"iteration": iteration, "epoch": epoch, "step": step, "total": loss_value,
                          "cos": match.item(), "tv": tv.item(), "lr": sched.get_last_lr()[0],
                          "seconds": round(time.time() - started, 3)})
            x.grad = grad
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
            last_step = iteration == total_iterations - 1
            if (save_every and step % save_every == 0) or (last_step and not args.grid_search):
                log_file.flush()
                save_snapshot(run_dir, x, labels, epoch, step)
                save_resume_state(run_dir, x, opt, sched, iteration)
                last_good = snapshot_path(run_dir, epoch, step)
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with --resume (from {last_good or 'the start'})")
    finally:
        log_file.close()
    if end_iteration < total_iterations and end_iteration > start_iteration and not args.grid_search:
        save_resume_state(run_dir, x, opt, sched, end_iteration - 1)
        print(f"stopped after {end_iteration} iterations; continue with --resume")
    if args.grid_search:
        write_json(os.path.join(run_dir, "grid_result.json"),
                   {"rlr": rlr, "rbs": rbs, "final_loss": loss_value, "iterations": end_iteration})
    print(f"final loss {loss_value:.5f}; run folder {run_dir}")
    return run_dir


if __name__ == "__main__":
    run_main(main, parse_args)
