"""The memory-flat reverse pass (--backprop recompute) and the choice between it and the unrolled one.

The unrolled pass keeps every simulated step's graph (memory grows with steps x images); this one keeps
one step's graph at a time and recomputes theta_t from kept checkpoints, so memory stays flat at ~1.3-1.6x
the time. `choose_backprop` ('auto') takes the unrolled pass while its predicted graph fits.
"""
import math
import os

import torch

from .simulate import (flat, graph_free_steps, loss_gradient, parameter_bytes, parameter_names, scratch_buffers,
                       sgd_step, step_schedule)


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
    names = parameter_names(model)
    run_buffers = scratch_buffers(buffers, sgd)
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
    scratch = scratch_buffers(buffers, sgd)
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
            u = loss_gradient(model, dict(zip(names, p_leaf)), scratch, x_leaf, y, sgd, create_graph=True)
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
    scratch = scratch_buffers(buffers, sgd)
    xb = x[:rbs].detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_gradient(model, params, scratch, xb, labels[:rbs], sgd, create_graph=True, clip=False)
    return (sum(storages.values()) + 2 * parameter_bytes(params)) * epochs * math.ceil(len(x) / rbs)


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
