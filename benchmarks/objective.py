"""Check the objective before the optimiser (issue 12): on a training run, how does the match loss
1 - cos(theta0 - theta_hat_final, theta0 - theta_final) grow as the true training images are degraded,
and which layers carry it?

For each noise level sigma (in normalised pixel units) the true images plus seeded Gaussian noise are
simulated with the true labels, and the table prints their SSIM to the truth (the paper's metric), the
global match loss (recons.py's) and the per-layer 1 - cos averaged over parameter tensors, for conv1,
the first block, the last block and the classifier. A flat loss over SSIMs that a person would tell
apart means the objective, not the optimiser, limits the reconstruction.

Every table is headed by the training instance in one line: its fine-tuning's loss in the first epoch, at
its highest and in the last epoch, and ||theta0 - theta_final||.

--draws K repeats each sigma with K noise draws (seeds --seed ... --seed+K-1) and prints the spread of
the global match loss instead: on a smooth objective the draws agree and the mean grows with sigma; on a
rugged one (a training whose dynamics amplify small input changes) one sigma gives losses that differ
several-fold between draws and the mean need not grow with sigma.

--sim_epochs E ... prints instead the match loss of the truth and of each snapshot when E of the training's
epochs are simulated (recons.py's --steps E; with fewer than the training's the truth is no longer the
minimum), the first --sigmas row above 0 as a perturbed truth, and --clips C ... adds columns with every
simulated gradient longer than C rescaled to C (recons.py's --clip_norm C --clip_to C); it also prints the
true training's gradient norms, which a clip above them leaves unchanged at the truth.

--swap_part P (with --sim_epochs) adds rows where the training images whose part of theta0 - theta_final
(simudy.exposure.image_shares: ||Delta_i|| / ||theta0 - theta_final||) is below P, and then those at or above
P, are swapped for images of the same class that no network here trained on (metrics.py --null_pool's pool;
--draws K draws), and then those below P for the pool images theta0 fits best: how far the objective moves
when an image the change hardly holds is replaced by another garment, against where a run stops. A swap
that moves 1 - cos far less than a run's end is as good as the truth for this objective, from there.

--bn_prior adds a column with the BatchNorm prior of recons.py's --bn_prior (unweighted, at theta0, over
batches of the training's batch size) of each row's images: where the truth sits on the prior against
the noise and a reconstruction. --colour (colour images) adds, per row, the std and TV of each of
--decorrelate_colours' coordinates (luminance, chroma 1, chroma 2): how smooth a run's colour is against the
truth's, what --tv_weight and --chroma_tv pull on. --snapshots FILE ... adds a row per recons.py snapshot (its images with
its labels, SSIM after matching as metrics.py), so the truth and a run's end are read in one table.

    python benchmarks/objective.py --train_dir benchmarks/runs/D/ckpts/model_ckpt/<run>
    python benchmarks/objective.py --train_dir <run> --sigmas 0 0.1 1 --bn_prior --snapshots <recons>/3_374.pth
    python benchmarks/objective.py --train_dir <run> --sigmas 0 --colour --snapshots <recons>/2_175.pth
    python benchmarks/objective.py --train_dir <run> --sigmas 0 --bn_prior --pool 10 --data_root <the dataset>
    python benchmarks/objective.py --train_dir <run> --sim_epochs 8 12 20 --clips 5 8 --snapshots <recons>/3_324.pth
    python benchmarks/objective.py --train_dir <run> --sim_epochs 8 20 --swap_part 0.2 --draws 5 --snapshots ...
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from simudy.errors import UserError  # noqa: E402
from simudy.exposure import class_pools, image_shares  # noqa: E402
from simudy.method import BatchNormPrior, match_loss, total_variation  # noqa: E402
from simudy.reparam import COLOUR_FROM_RGB, mix_colours  # noqa: E402
from simudy.runs import load_checkpoint  # noqa: E402
from simudy.scoring import paper_avg_ssim  # noqa: E402
from simudy.search import simulated_change  # noqa: E402
from simudy.simulate import flat, graph_free_steps, sgd_config_from_training  # noqa: E402
from simudy.target import load_training_run, loss_per_image  # noqa: E402
from utils import run_main  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train_dir", required=True)
    p.add_argument("--sigmas", type=float, nargs="+", default=[0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draws", type=int, default=1,
                   help="noise draws per sigma; > 1 prints the match loss's mean, min and max over them")
    p.add_argument("--bn_prior", action="store_true",
                   help="add a column with each row's BatchNorm prior at theta0 (recons.py's --bn_prior, unweighted)")
    p.add_argument("--pool", type=int, default=0, metavar="K",
                   help="with --bn_prior: also print the prior of K sets of never-trained images (--data_root) in the"
                        " training images' classes and order: a level for recons.py's --bn_prior_floor that an"
                        " attacker can measure without the training images")
    p.add_argument("--colour", action="store_true",
                   help="add columns with each row's std / TV per decorrelated colour coordinate to the sigma table"
                        " (3-channel images)")
    p.add_argument("--sim_epochs", type=int, nargs="+", default=[], metavar="E",
                   help="the match loss with E simulated epochs, for the truth and each snapshot (see above)")
    p.add_argument("--clips", type=float, nargs="+", default=[], metavar="C",
                   help="with --sim_epochs: also with the simulated gradients clipped at norm C")
    p.add_argument("--swap_part", type=float, default=None, metavar="P",
                   help="with --sim_epochs: add rows with the images whose part of the change is < P (then >= P) "
                        "swapped for never-trained images of their class, --draws draws")
    p.add_argument("--data_root", default="./data", help="the dataset's folder, for --swap_part's pool")
    p.add_argument("--snapshots", nargs="+", default=[], metavar="FILE",
                   help="recons.py snapshots (<recons_dir>/<epoch>_<step>.pth) to add as rows, with their labels")
    return p.parse_args(argv)


def layer_groups(names):
    """name -> group for the table: the stem, the first and last residual stages, the classifier."""
    def group(n):
        if n.startswith(("conv1", "bn1")):
            return "stem"
        if n.startswith("layer1"):
            return "layer1"
        if n.startswith("layer4"):
            return "layer4"
        if n.startswith(("linear", "fc")):
            return "fc"
        return "other"
    return {n: group(n) for n in names}


def per_tensor_distance(sim, true):
    """{name: 1 - cos} per parameter tensor."""
    return {n: 1 - F.cosine_similarity(sim[n].reshape(-1), true[n].reshape(-1), dim=0, eps=1e-20).item()
            for n in true}


def training(run):
    """(lr, bs, epochs) of the training run: the simulation replays it exactly."""
    train = run.config["args"]
    return train["lr"], train["bs"], train["epochs"]


def bn_prior_value(run, x):
    """recons.py's BatchNorm prior of x at theta0, in batches of the training's batch size, unweighted."""
    lr, bs, _ = training(run)
    prior = BatchNormPrior(run.model, run.buffers)
    with torch.no_grad():
        sgd = sgd_config_from_training(run.config["args"], lr)
        return float(prior.at_theta0(run.theta0, run.buffers, x.split(bs), sgd))


COLOUR_COORDINATES = ("luminance", "chroma 1", "chroma 2")


def colour_statistics(x):
    """{coordinate: (std, TV)} of the RGB images x in --decorrelate_colours' coordinates (TV as the
    paper's, recons.py's --tv_weight and --chroma_tv), over all images."""
    y = mix_colours(x, COLOUR_FROM_RGB)
    return {name: (y[:, c].std().item(), total_variation(y[:, c]).item())
            for c, name in enumerate(COLOUR_COORDINATES)}


def training_summary(run):
    """The training instance in one line: how its fine-tuning's loss went (first epoch, highest, last) and how
    far it moved theta0. One set of train.py flags gives instances that differ in both (the seed, the CPU's
    float order) and reconstruct differently (benchmarks/README.md, "ResNets, session 31")."""
    losses = [epoch["loss"] for epoch in run.config.get("history", [])]  # a folder of an older train.py has none
    summary = {"first_loss": losses[0] if losses else None, "max_loss": max(losses, default=None),
               "final_loss": losses[-1] if losses else None, "change_norm": float(run.weight_change.norm()),
               "pretrain_acc": run.config.get("pretrain_train_acc")}
    pretrain = ("" if summary["pretrain_acc"] is None
                else f"theta0's pretraining train acc {summary['pretrain_acc']:.3f}, ")
    fit = (f"loss {summary['first_loss']:.3f} (first epoch), {summary['max_loss']:.3f} (highest),"
           f" {summary['final_loss']:.3f} (last), " if losses else "no loss history in its config.json, ")
    print(f"training: {pretrain}{fit}||theta0 - theta_final|| {summary['change_norm']:.3f}")
    return summary


def rows_to_score(x_true, y_true, sigmas, noise, snapshots):
    """(name, images, labels): the truth plus sigma * noise for each sigma, then each snapshot's images."""
    rows = [(sigma, x_true + sigma * noise, y_true) for sigma in sigmas]
    for path in snapshots:
        snap = load_checkpoint(path, "snapshot")
        if snap["x"].shape != x_true.shape:
            raise SystemExit(f"{path} has images of shape {tuple(snap['x'].shape)}, the training run"
                             f" {tuple(x_true.shape)}; pass snapshots of a reconstruction of this --train_dir")
        rows.append((path, snap["x"].detach(), snap["labels"]))
    return rows


def match_over_draws(run, x_true, y_true, sigmas, seed, draws):
    """Per sigma: the SSIM of the first draw and the global match loss over `draws` noise draws."""
    print("| sigma | SSIM | match: mean | min | max | max / min |\n|---|---|---|---|---|---|")
    rows = []
    for sigma in sigmas:
        losses, ssim = [], None
        for k in range(draws):
            noise = torch.randn(x_true.shape, generator=torch.Generator().manual_seed(seed + k))
            x = x_true + sigma * noise
            ssim = paper_avg_ssim(x_true, x) if ssim is None else ssim
            change = simulated_change(run, x, y_true, *training(run))
            losses.append(match_loss(flat(change.values()), run.weight_change, "cos").item())
        row = {"sigma": sigma, "ssim": ssim, "losses": losses, "mean": sum(losses) / draws}
        rows.append(row)
        ratio = max(losses) / min(losses) if min(losses) > 0 else float("inf")
        print(f"| {sigma} | {ssim:.3f} | {row['mean']:.4f} | {min(losses):.4f} | {max(losses):.4f} | {ratio:.1f} |",
              flush=True)
    return rows


def true_gradient_norms(run, x, y):
    """Each step's lr * update of the true training (replayed on the true images by the simulation's own
    graph-free steps), divided by lr: the gradient norm that a clip sees, in plain SGD (no momentum or weight
    decay, as every training measured here)."""
    lr, bs, epochs = training(run)
    batches = list(zip(x.split(bs), y.split(bs)))
    buffers = {k: v.clone() for k, v in run.buffers.items()}  # train-mode BN updates them in place
    steps = graph_free_steps(run.model, run.theta0, buffers, batches, epochs,
                             sgd_config_from_training(run.config["args"], lr))
    return [float(torch.sqrt(sum(u.pow(2).sum() for u in update))) / lr for *_, update in steps]


def images_per_class(y_true):
    return max(int((y_true == c).sum()) for c in y_true.unique())


def with_pool_images(x_true, y_true, mask, spares, k):
    """x_true with the images in `mask` replaced by draw k of their class's spares (the k-th chunk of
    images_per_class of them)."""
    per_class, x = images_per_class(y_true), x_true.clone()
    for c, images in spares.items():
        slots = ((y_true == c) & mask).nonzero().flatten()
        x[slots] = images[k * per_class:][:len(slots)].to(x)
    return x


def pool_bn_priors(run, x_true, y_true, sets, data_root):
    """The BN prior (bn_prior_value) of `sets` image sets like the training's: set k puts in each training image's
    place the k-th never-trained image of its class not yet used (metrics.py --null_pool's pool, in its order)."""
    plain, _, _ = class_pools(run, y_true, images_per_class(y_true) * sets, data_root, f"pass --pool below {sets}")
    every = torch.ones_like(y_true, dtype=torch.bool)
    return [bn_prior_value(run, with_pool_images(x_true, y_true, every, plain, k)) for k in range(sets)]


def swapped_rows(run, x_true, y_true, part, draws, data_root):
    """(name, images, labels) with the images whose part of the change is < part, then >= part, replaced by
    never-trained images of their class, and then the < part ones by the pool images of their class that
    theta0 fits best (lowest loss at theta0 of FITTED_POOL per class): the images an attacker cannot tell from
    the truth if the objective only sees that theta0 already fitted them. Draw k takes the k-th disjoint
    chunk of each class's pool (in the pool's order, or by loss for the fitted kind)."""
    shares, _ = image_shares(run, x_true, y_true)
    small = shares < part
    per_class = images_per_class(y_true)
    plain, by_loss, pool_loss = class_pools(run, y_true, per_class * draws, data_root,
                                          f"pass --draws below {draws}")
    fitted_loss = torch.cat([losses[:per_class * draws] for losses in pool_loss.values()])
    print(f"parts: {int(small.sum())} images < {part:g} (part {', '.join(f'{v:.3f}' for v in shares[small])}; loss"
          f" at theta0 {', '.join(f'{v:.3f}' for v in loss_per_image(run, x_true, y_true)[small])}),"
          f" {int((~small).sum())} >= {part:g}; fitted pool images' loss at theta0"
          f" {fitted_loss.min():.4f}-{fitted_loss.max():.4f}")
    rows = []
    for which, mask, spares in [(f"part < {part:g} swapped", small, plain), (f"part >= {part:g} swapped", ~small, plain),
                                (f"part < {part:g} swapped for fitted", small, by_loss)]:
        for k in range(draws):
            rows.append((f"{which}, draw {k}", with_pool_images(x_true, y_true, mask, spares, k), y_true))
    return rows


def epochs_table(run, rows, sim_epochs, clips):
    """Per row (name, images, labels): the match loss with each number of simulated epochs, unclipped and
    with each clip."""
    lr, bs, _ = training(run)
    columns = [(e, c) for e in sim_epochs for c in [math.inf, *clips]]
    print("| images | SSIM | " + " | ".join(f"{e} epochs" + ("" if c == math.inf else f", clip {c:g}")
                                         for e, c in columns) + " |\n|" + "---|" * (len(columns) + 2))
    table = []
    for name, x, labels in rows:
        losses = [match_loss(flat(simulated_change(run, x, labels, lr, bs, e, c).values()), run.weight_change,
                             "cos").item() for e, c in columns]
        table.append({"images": str(name), "ssim": paper_avg_ssim(rows[0][1], x),
                      "losses": {f"{e}/{c:g}": v for (e, c), v in zip(columns, losses)}})
        print(f"| {name} | {table[-1]['ssim']:.3f} | " + " | ".join(f"{v:.4f}" for v in losses) + " |", flush=True)
    return table


def main(args):
    torch.set_num_threads(args.threads)
    run = load_training_run(args.train_dir, "cpu")
    subset = torch.load(os.path.join(args.train_dir, "train_subset.pth"))
    x_true, y_true = subset["images"], subset["labels"]
    if args.pool and not args.bn_prior:
        raise UserError("--pool prints BN priors; add --bn_prior")
    if args.colour and x_true.shape[1] != 3:
        raise UserError(f"--colour needs 3-channel images; {args.train_dir} has {x_true.shape[1]}: drop --colour")
    training_summary(run)
    if args.pool:
        values = torch.tensor(pool_bn_priors(run, x_true, y_true, args.pool, args.data_root))
        print(f"BN prior of {args.pool} never-trained image sets like the training's: mean {values.mean():.2f}, std"
              f" {values.std():.2f}, {values.min():.2f}-{values.max():.2f} (the training images: "
              f"{bn_prior_value(run, x_true):.2f})")
    if args.sim_epochs:
        norms = true_gradient_norms(run, x_true, y_true)
        print(f"true training: {len(norms)} steps, gradient norm {min(norms):.2f}-{max(norms):.2f}")
        noise = torch.randn(x_true.shape, generator=torch.Generator().manual_seed(args.seed))
        perturbed = [s for s in args.sigmas if s > 0][:1]
        rows = rows_to_score(x_true, y_true, [0] + perturbed, noise, args.snapshots)
        if args.swap_part is not None:
            rows[1 + len(perturbed):1 + len(perturbed)] = swapped_rows(run, x_true, y_true, args.swap_part, args.draws,
                                                                       args.data_root)
        return epochs_table(run, rows, args.sim_epochs, args.clips)
    if args.draws > 1:
        return match_over_draws(run, x_true, y_true, [s for s in args.sigmas if s > 0], args.seed, args.draws)
    true_change = {n: run.theta0[n] - run.theta_final[n] for n in run.theta0}
    groups = layer_groups(list(true_change))
    share = {g: sum(true_change[n].pow(2).sum().item() for n in groups if groups[n] == g) for g in set(groups.values())}
    norm2 = sum(share.values())
    print("share of ||theta0 - theta_final||^2 by group: "
          + ", ".join(f"{g} {v / norm2:.3f}" for g, v in sorted(share.items())))
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(x_true.shape, generator=gen)
    header = (["sigma", "SSIM", "match (global)", "mean per-tensor"] + sorted(share)
              + (["BN prior"] if args.bn_prior else [])
              + ([f"{c} std / TV" for c in COLOUR_COORDINATES] if args.colour else []))
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    rows = []
    for name, x, labels in rows_to_score(x_true, y_true, args.sigmas, noise, args.snapshots):
        displacement = simulated_change(run, x, labels, *training(run))
        glob = match_loss(flat(displacement.values()), run.weight_change, "cos").item()
        per = per_tensor_distance(displacement, true_change)
        by_group = {g: sum(v for n, v in per.items() if groups[n] == g) / sum(1 for n in per if groups[n] == g)
                    for g in share}
        row = {"sigma": name, "ssim": paper_avg_ssim(x_true, x), "global": glob,
               "per_tensor": sum(per.values()) / len(per), **by_group}
        if args.bn_prior:
            row["bn_prior"] = bn_prior_value(run, x)
        if args.colour:
            row["colour"] = colour_statistics(x)
        rows.append(row)
        print(f"| {name} | {row['ssim']:.3f} | {glob:.4f} | {row['per_tensor']:.4f} | "
              + " | ".join(f"{by_group[g]:.4f}" for g in sorted(share))
              + (f" | {row['bn_prior']:.2f}" if args.bn_prior else "")
              + "".join(f" | {std:.2f} / {tv:.2f}" for std, tv in row.get("colour", {}).values()) + " |", flush=True)
    return rows


if __name__ == "__main__":
    run_main(main, parse_args)
