"""The paper's baselines, as its recons_1step.py / recons_2step.py re-implemented them: 2N candidates with
dual variables lambda, matching grad_theta sum_i lambda_i loss(x_i, y_i) at theta_f (one_step, Buzaglo et
al.) or at theta0 and theta_f (two_step, Loo et al.) to theta0 - theta_f.
"""
import math
import os

import torch
import torch.nn.functional as F
from torch.func import functional_call

from .loop import RunState, check_finite, final_loss_text, open_run, run_to_end, save_snapshot, snapshot_interval
from .method import adam_with_schedule, cosine_distance, initial_dummies, squared_distance, total_variation
from .runs import CONFIG, run_config, write_json
from .simulate import flat

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
    l2 = squared_distance(gradient, weight_change)
    cos = cosine_distance(gradient, weight_change)
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
    """The baseline run args.method: candidates, duals, their optimisers, the outer loop; returns
    (candidates, labels, duals)."""
    data = run.config["data"]
    x, labels, gen = initial_dummies(num_dummy, data["image_shape"], data["num_classes"], args.seed, device)
    points = baseline_points(run, args.method)
    duals = {name: ((torch.rand(num_dummy, generator=gen) * 2 - 1) * DUAL_INIT_HALF_WIDTH).to(device)
             .requires_grad_(True) for name, _, _ in points}
    opt, sched = adam_with_schedule([x], rec_lr, BASELINE_COSINE_T_MAX)
    dual_opt = torch.optim.SGD(list(duals.values()), lr=args.rec_lambda_lr, momentum=DUAL_MOMENTUM)
    state = RunState({"x": x, **{f"duals_{k}": v for k, v in duals.items()}},
                     {"optimizer": opt, "scheduler": sched, "dual_optimizer": dual_opt}, labels)
    start = open_run(run_dir, state, args.resume, args.overwrite, device)
    write_json(os.path.join(run_dir, CONFIG), run_config(args, train_dir, device, num_dummy=num_dummy,
                                                                rec_lr=rec_lr, rec_lambda_lr=args.rec_lambda_lr))
    total = args.baseline_steps
    loss = run_to_end(run_dir, state, start, total, args.max_iterations,
                      baseline_iteration(run, points, x, labels, duals, opt, sched, dual_opt),
                      snapshot_interval(args.save_every, "baseline"), total,
                      lambda i: save_snapshot(run_dir, "x", x, labels, 0, i,
                                              duals={k: v.detach().cpu().clone() for k, v in duals.items()}),
                      args.max_minutes)
    print(final_loss_text(loss, run_dir))
    return x.detach(), labels, {k: v.detach() for k, v in duals.items()}
