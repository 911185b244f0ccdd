"""The simulation: the real training's SGD replayed on dummy images, differentiable and unrolled
(torch.func.functional_call), or one graph-free step at a time.

A model's state is split in two dicts everywhere: parameters (in named_parameters order, which is the
order of every flat parameter vector) and buffers (BatchNorm statistics).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call


@dataclass
class SGDConfig:
    """How the real training updated parameters (mirrors torch.optim.SGD), plus the paper's clip."""
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    bn_train: bool = False        # BatchNorm mode during training (paper: eval)
    clip_norm: float = math.inf   # a gradient with a larger norm is rescaled ...
    clip_to: float = 5.0          # ... to this norm (paper, first 5 outer epochs)
    label_smoothing: float = 0.0  # the training's cross-entropy label smoothing
    per_sample_clip: float = None  # DP-SGD's C: each image's gradient clipped to norm <= C (Opacus) ...
    dp_batch_size: int = None     # ... and the clipped sum divided by this (Opacus: the expected batch size)


def sgd_config_from_training(train_args, rlr, clip_norm=math.inf, clip_to=5.0):
    """The SGDConfig of a training run (train.py's args) at the simulation lr `rlr`."""
    return SGDConfig(lr=rlr, momentum=train_args.get("momentum", 0.0),
                     weight_decay=train_args.get("weight_decay", 0.0),
                     bn_train=train_args.get("bn_mode", "eval") == "train", clip_norm=clip_norm, clip_to=clip_to,
                     label_smoothing=train_args.get("label_smoothing", 0.0),
                     per_sample_clip=train_args.get("dp_max_grad_norm"),
                     dp_batch_size=train_args.get("dp_expected_batch_size"))


def parameter_names(model):
    return [n for n, _ in model.named_parameters()]


def split_state(model, state):
    """(parameters, buffers) of a state_dict, parameters in the model's order."""
    names = parameter_names(model)
    return {n: state[n] for n in names}, {k: v for k, v in state.items() if k not in names}


def parameter_bytes(params):
    return sum(p.numel() * p.element_size() for p in params.values())


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def scratch_buffers(buffers, sgd):
    """Train-mode BatchNorm updates running statistics in place: a run works on a copy of them."""
    return {k: v.clone() for k, v in buffers.items()} if sgd.bn_train else buffers


def linear_layers_covering(model, params):
    """{module name: nn.Linear} when every parameter belongs to an nn.Linear (the MLPs), else None."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    covered = {f"{n}.{p}" for n, m in layers.items() for p, v in m.named_parameters(recurse=False)}
    return layers if covered == set(params) else None


def clipped_gradient_of_linear_layers(model, layers, params, buffers, x, y, sgd, create_graph):
    """Per-image clipping from one batched backward (Goodfellow, 2015): image i's gradient of a Linear
    layer is delta_i a_i^T (delta: the loss's gradient at the layer's output, a: its input), so its norm
    is ||delta_i|| ||a_i|| and the clipped sum is (s * delta)^T a, with no per-image graph."""
    seen = {}
    hooks = [m.register_forward_hook(lambda m, inputs, out, name=name: seen.__setitem__(name, (inputs[0], out)))
             for name, m in layers.items()]
    try:
        out = functional_call(model, {**params, **buffers}, (x,))
    finally:
        for h in hooks:
            h.remove()
    loss = F.cross_entropy(out, y, label_smoothing=sgd.label_smoothing, reduction="sum")  # sum: delta_i per image
    deltas = dict(zip(layers, torch.autograd.grad(loss, [seen[n][1] for n in layers], create_graph=create_graph)))
    norm2 = sum(deltas[n].pow(2).sum(1) * (seen[n][0].pow(2).sum(1) + (m.bias is not None))
                for n, m in layers.items())
    scale = torch.clamp(sgd.per_sample_clip / (torch.sqrt(norm2) + 1e-6), max=1.0)
    batch_size = sgd.dp_batch_size or len(x)
    grads = {}
    for n, m in layers.items():
        scaled = deltas[n] * scale[:, None]
        grads[f"{n}.weight"] = scaled.t() @ seen[n][0] / batch_size
        if m.bias is not None:
            grads[f"{n}.bias"] = scaled.sum(0) / batch_size
    return [grads[k] for k in params]


def per_sample_clipped_gradient(model, params, buffers, x, y, sgd, create_graph):
    """DP-SGD's gradient without its noise (Opacus's DPOptimizer): every image's own gradient scaled by
    min(1, C / (norm + 1e-6)) (Opacus's factor), summed, divided by the expected batch size. MLPs take
    the per-layer identity above; other models one image at a time."""
    layers = linear_layers_covering(model, params)
    if layers is not None:
        return clipped_gradient_of_linear_layers(model, layers, params, buffers, x, y, sgd, create_graph)
    return clipped_gradient_image_by_image(model, params, buffers, x, y, sgd, create_graph)


def clipped_gradient_image_by_image(model, params, buffers, x, y, sgd, create_graph):
    p = list(params.values())
    per_image = []
    for xi, yi in zip(x, y):  # one image at a time, so the result stays differentiable in x
        out = functional_call(model, {**dict(zip(params, p)), **buffers}, (xi[None],))
        loss = F.cross_entropy(out, yi[None], label_smoothing=sgd.label_smoothing)
        grads = torch.autograd.grad(loss, p, create_graph=create_graph)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        scale = torch.clamp(sgd.per_sample_clip / (norm + 1e-6), max=1.0)
        per_image.append([g * scale for g in grads])
    return [sum(gs) / (sgd.dp_batch_size or len(x)) for gs in zip(*per_image)]


def loss_gradient(model, params, buffers, x, y, sgd, create_graph, clip=True):
    """Gradient of the cross-entropy of one batch at `params` as the training took it (per-image clipped
    when it was DP-SGD's), then clipped as in the paper code (unless clip=False)."""
    if sgd.per_sample_clip is not None:
        grads = per_sample_clipped_gradient(model, params, buffers, x, y, sgd, create_graph)
    else:
        out = functional_call(model, {**params, **buffers}, (x,))
        loss = F.cross_entropy(out, y, label_smoothing=sgd.label_smoothing)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
    clip_norm, clip_to = (sgd.clip_norm, sgd.clip_to) if clip else (math.inf, 1.0)
    if clip_norm < math.inf:
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        if norm > clip_norm:  # the paper's clip: rescale to a fixed norm, not to the threshold
            grads = [g * (clip_to / norm) for g in grads]
    return grads


def sgd_direction(grads, params, velocity, sgd):
    """torch.optim.SGD's update direction from the (clipped) loss gradient: weight decay, then
    momentum buf = momentum * buf + grad (buf = grad at the first step), no dampening or Nesterov."""
    if sgd.weight_decay:
        grads = [g + sgd.weight_decay * p for g, p in zip(grads, params)]
    if sgd.momentum and velocity is not None:
        grads = [sgd.momentum * v + g for v, g in zip(velocity, grads)]
    return grads


def simulate_training(model, theta0, buffers, batches, epochs, sgd, create_graph=True):
    """Unrolled SGD from theta0 over `batches` (list of (x, y)) for `epochs` epochs, in order.

    Returns (theta_hat_final, displacement, buffers): dicts of tensors; displacement = theta0 - theta_hat_final
    accumulated as the sum of lr * update (the paper's sum of gradients, without cancellation error).
    With create_graph, both are differentiable with respect to the batch images.
    """
    model.train(sgd.bn_train)
    buffers = scratch_buffers(buffers, sgd)
    # theta0 is a leaf that requires grad so each step can differentiate the loss w.r.t. its params
    params = {k: v.detach().requires_grad_(True) for k, v in theta0.items()}
    displacement = {k: torch.zeros_like(v) for k, v in params.items()}
    velocity = None
    for _ in range(epochs):
        for x, y in batches:
            grads = loss_gradient(model, params, buffers, x, y, sgd, create_graph)
            direction = sgd_direction(grads, list(params.values()), velocity, sgd)
            velocity = direction if sgd.momentum else None
            params = {k: p - sgd.lr * d for (k, p), d in zip(params.items(), direction)}
            displacement = {k: s + sgd.lr * d for (k, s), d in zip(displacement.items(), direction)}
    return params, displacement, buffers


def sgd_step(model, params, velocity, buffers, x, y, sgd):
    """One SGD step without a graph: returns (params, velocity, update) with update = lr * direction."""
    p_list = [p.detach().requires_grad_(True) for p in params]
    grads = loss_gradient(model, dict(zip(parameter_names(model), p_list)), buffers, x, y, sgd, create_graph=False)
    direction = sgd_direction(grads, params, velocity, sgd)
    new_velocity = direction if sgd.momentum else None
    return [p - sgd.lr * d for p, d in zip(params, direction)], new_velocity, [sgd.lr * d for d in direction]


def step_schedule(num_batches, epochs):
    """The batch index of every simulated step: the batches in order, `epochs` times (shuffle=False)."""
    return [b for _ in range(epochs) for b in range(num_batches)]


def graph_free_steps(model, theta0, buffers, batches, epochs, sgd):
    """The simulation without a graph, a step at a time: yields (t, batch index, theta_t, velocity before
    the step, lr * update of the step). `buffers` are updated in place in train-mode BN (pass a copy)."""
    params, velocity = [theta0[n].detach() for n in parameter_names(model)], None
    for t, b in enumerate(step_schedule(len(batches), epochs)):
        x, y = batches[b]
        model.train(sgd.bn_train)  # a consumer may switch modes between steps
        new_params, new_velocity, update = sgd_step(model, params, velocity, buffers, x.detach(), y, sgd)
        yield t, b, params, velocity, update
        params, velocity = new_params, new_velocity
