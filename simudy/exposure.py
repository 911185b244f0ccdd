"""Which training images theta0 - theta_final holds: each image's own part of the change. The defender's
view (it needs the training images, no reconstruction): on ResNets, SimuDy recovers the images whose part
is large and hardly those theta0 already fitted, whose gradients leave little in the change (README,
"Which images come back")."""
import torch
import torch.nn.functional as F

from .data import images_never_trained_on
from .errors import UserError
from .simulate import flat, loss_gradient, sgd_config_from_training
from .target import loss_per_image


def check_shares_apply(train_args):
    """The change splits into images' parts only where a batch's update is the sum of its images' parts."""
    reasons = [why for why, applies in [
        ("train-mode BatchNorm (a batch's statistics couple its images)", train_args.get("bn_mode") == "train"),
        ("weight decay (a part of no image)", train_args.get("weight_decay")),
        ("DP-SGD (its noise is no image's)", train_args.get("dp_noise_multiplier") or train_args.get("dp_max_grad_norm")),
        ("augmentation (the images seen are not the subset's)", train_args.get("augment", "none") != "none"),
    ] if applies]
    if reasons:
        raise UserError(f"per-image parts of the change need a training without {', '.join(reasons)};"
                        f" drop --image_shares for this run")


def image_parts(run, images, labels):
    """Delta_i, one row per training image: the training replayed (its batches in order, torch.optim.SGD
    with its momentum), each step's update split into its images' parts (a batch's loss is the mean of
    its images', so image i's part of the gradient is g_i / batch size, and momentum is linear in the
    gradients), summed over the steps. The rows sum to theta0 - theta_final (tests: test_exposure.py)."""
    train_args = run.config["args"]
    check_shares_apply(train_args)
    sgd = sgd_config_from_training(train_args, train_args["lr"])
    run.model.train(False)
    params = {k: v.detach() for k, v in run.theta0.items()}
    n, bs = len(images), train_args["bs"]
    parts = torch.zeros(n, sum(p.numel() for p in params.values()), device=images.device)
    velocity = torch.zeros_like(parts)  # each image's part of the momentum buffer
    for _ in range(train_args["epochs"]):
        for start in range(0, n, bs):
            batch = range(start, min(start + bs, n))
            velocity *= sgd.momentum  # 0 without momentum: velocity is this step's direction
            for i in batch:
                leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
                grads = loss_gradient(run.model, leaves, run.buffers, images[i:i + 1], labels[i:i + 1], sgd,
                                      create_graph=False, clip=False)
                velocity[i] += flat(grads) / len(batch)
            parts += sgd.lr * velocity
            steps = velocity.sum(0).split([v.numel() for v in params.values()])
            params = {k: v - sgd.lr * d.view_as(v) for (k, v), d in zip(params.items(), steps)}
    return parts


def image_shares(run, images, labels):
    """(share, cos) per training image: ||Delta_i|| / ||theta0 - theta_final|| and cos(Delta_i, theta0 -
    theta_final). An image whose part is short or at right angles to the change is one the change hardly
    holds."""
    parts = image_parts(run, images, labels)
    change = run.weight_change.to(parts)
    return parts.norm(dim=1) / change.norm(), F.cosine_similarity(parts, change[None], dim=1)


# The objective check's decoys (benchmarks/objective.py, fixed_images.py): images the objective cannot tell
# from the truth when theta0 already fits them.
FITTED_POOL = 100  # pool images per class to pick the ones theta0 fits best from (--swap_part's third kind)


def class_pools(run, y_true, need, data_root, fix):
    """Per class of y_true: the never-trained pool images (metrics.py --null_pool's pool, at least FITTED_POOL
    of them) in the pool's order, the same sorted by their loss at theta0 (the ones theta0 fits best first),
    and those losses sorted. `need` images per class must be there, else an error ending in `fix`."""
    pool, pool_labels, _ = images_never_trained_on(run.config, data_root, max(need, FITTED_POOL))
    short = [int(c) for c in y_true.unique() if int((pool_labels == c).sum()) < need]
    if short:
        raise UserError(f"the pool has under {need} never-trained images of class(es) {short}; {fix}")
    loss = loss_per_image(run, pool, pool_labels)
    classes = [int(c) for c in y_true.unique()]
    plain = {c: pool[pool_labels == c] for c in classes}
    by_loss = {c: plain[c][loss[pool_labels == c].argsort()] for c in classes}
    return plain, by_loss, {c: loss[pool_labels == c].sort().values for c in classes}
