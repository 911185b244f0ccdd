"""The Python API: reconstruct the training images of a model trained anywhere, from its two state_dicts.

    import simudy
    result = simudy.reconstruct(model, theta0, theta_final, num_images=20, lr=1e-2, batch_size=20,
                                epochs=20, preset="fast")
    result.images, result.labels          # N×C×H×W (the training's normalisation) and N class labels

recons.py's reconstruction goes through `reconstruct_from_args` below, as `reconstruct` does: the same
options, defaults and outputs. Keyword options are recons.py's flags without the dashes.
"""
import argparse
import functools
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .baselines import BASELINE_CANDIDATE_RATIO, reconstruct_baseline
from .defences import unsimulated_defences
from .errors import UserError
from .flags import (PRESETS, add_reconstruction_args, add_recons_id_args, add_runtime_args, is_explicit_off,
                    pick_device, preset_flags_off, preset_values, set_seed)
from .loop import (RunState, final_loss_text, main_run_iterations, open_run, run_to_end, save_resume_state,
                   save_snapshot, snapshot_interval)
from .method import (SimuDySetup, initial_dummies, main_run_setup, rank_dummies, simudy_iteration, simudy_log_fields,
                     simudy_optimisers, simulated_epochs, total_gradient_norms)
from .runs import (AUTO, CONFIG, LOG, RANKING, load_checkpoint, prepare_run_dir, read_json, resolve_rec_lr, run_config,
                   write_csv, write_json)
from .search import (GRID_SEARCH_STEPS, auto_search, best_start, norm_search, plot_auto_search,
                     search_candidates, short_run)
from .target import training_config, training_run_from_states


@dataclass
class MainRun:
    """SimuDy's main run from one start: its setup, dummies and labels, Adam and its schedule, and the bytes
    its unrolled graph would need (None when --backprop was not auto)."""
    setup: SimuDySetup
    x: torch.Tensor
    labels: torch.Tensor
    opt: torch.optim.Optimizer
    sched: object
    graph_bytes: Optional[int]

    @property
    def log_fields(self):
        return list(simudy_log_fields(self.setup))

    def run_state(self):
        """What --resume restores: the dummies and the reparametrisation's tensors, Adam and the schedule."""
        tensors = {"x": self.x, **({} if self.setup.reparam is None else self.setup.reparam.named_tensors())}
        return RunState(tensors, {"optimizer": self.opt, "scheduler": self.sched}, self.labels, self.log_fields)


@dataclass
class Reconstruction:
    """What a reconstruction returns: the dummies at the end (N×C×H×W, in the training's normalisation),
    their labels, the unknown-N ranking (--num_dummy, else None), the last loss and the run folder."""
    images: torch.Tensor
    labels: torch.Tensor
    ranking: Optional[torch.Tensor]
    loss: float
    run_dir: Optional[str]


def reconstruction_args(**options):
    """recons.py's flags as a Namespace: their defaults, then the preset's, then `options` (flag names
    without dashes). An unknown option is a TypeError that lists the known ones."""
    parser = argparse.ArgumentParser(add_help=False)
    add_recons_id_args(parser)
    add_runtime_args(parser)
    add_reconstruction_args(parser)
    known = vars(parser.parse_args([]))
    unknown = set(options) - set(known)
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; recons.py's flags are {sorted(known)}")
    preset = options.get("preset", known["preset"])
    if preset not in PRESETS:
        raise TypeError(f"unknown preset {preset!r}; choose one of {list(PRESETS)}")
    given = {k for k, v in options.items() if not is_explicit_off(v, known[k])}
    known.update({k: v for k, v in preset_values(preset, given).items() if k in known})
    known.update(options)
    return argparse.Namespace(**known)


def reconstruct(model, theta0, theta_final, num_images, lr, batch_size, epochs, *, image_shape, num_classes,
                momentum=0.0, weight_decay=0.0, bn_mode="eval", mean=None, std=None, run_dir=None, **options):
    """Reconstruct the training images of `model` from theta0 and theta_final (state_dicts of it).

    The training is described by num_images, lr, batch_size, epochs, momentum, weight_decay and bn_mode
    ("eval" or "train": BatchNorm's mode while training), as torch.optim.SGD over the images in a fixed
    order (no shuffling); image_shape is (C, H, W) of one training image; mean and std (per channel) the
    images' normalisation, needed only by box=True. Options are
    recons.py's flags (preset="fast", rec_epochs=..., method="one_step", num_dummy=..., rlr="auto", ...);
    steps=0 simulates `epochs` (the fast preset's choice; the paper's code simulates 8). Without run_dir the
    run folder is a temporary one, removed at the end.
    Returns a Reconstruction."""
    args = reconstruction_args(**options)
    config = training_config(lr, batch_size, epochs, num_images, num_classes, image_shape, momentum, weight_decay,
                             bn_mode, mean, std)
    args.steps = args.steps or epochs
    args.rec_lr = resolve_rec_lr(args, args.method)
    device = pick_device(args.device)
    set_seed(args.seed)
    run = training_run_from_states(model, theta0, theta_final, config, device)
    if run_dir is not None:
        return reconstruct_from_args(run, args, device, run_dir, args.rlr or lr, args.rbs or batch_size)
    with tempfile.TemporaryDirectory(prefix="simudy_") as tmp:
        return reconstruct_from_args(run, args, device, os.path.join(tmp, "run"), args.rlr or lr,
                                     args.rbs or batch_size)


def num_dummies(requested, num_train, method):
    """--num_dummy, else N (SimuDy) or 2N candidates (baselines)."""
    if requested is not None:
        if requested < 1:
            raise UserError(f"--num_dummy {requested} must be at least 1")
        return requested
    return num_train if method == "simudy" else BASELINE_CANDIDATE_RATIO * num_train


def snapshot_start(path, x, labels):
    """(x, labels) of the snapshot file `path` (--init_snapshot), on x's device; the shapes must be x's and
    labels'."""
    saved = load_checkpoint(path, "--init_snapshot")
    if tuple(saved["x"].shape) != tuple(x.shape) or tuple(saved["labels"].shape) != tuple(labels.shape):
        raise UserError(f"--init_snapshot {path} holds {tuple(saved['x'].shape)} dummies, this run needs"
                        f" {tuple(x.shape)}; pass a snapshot of a run on the same training and --num_dummy")
    return saved["x"].to(x.device).requires_grad_(True), saved["labels"].to(labels.device)


def check_init_snapshot(args):
    """--init_snapshot's conflicts and a missing file (recons.py checks them before reading a file, the API here
    too): a snapshot starts SimuDy's main run only."""
    if not args.init_snapshot:
        return
    if args.method != "simudy" or args.restarts > 1 or args.grid_search:
        raise UserError("--init_snapshot starts SimuDy's main run from a snapshot; drop --restarts, --grid_search"
                        " and --method for it")
    if not os.path.isfile(args.init_snapshot):
        raise UserError(f"--init_snapshot {args.init_snapshot}: no such file; pass a snapshot <epoch>_<step>.pth")


def check_restarts(args):
    """--restarts/--restart_iterations values that cannot work (recons.py checks them before reading a file, the
    API here too): each start runs the main run's first iterations, so fewer than the run has."""
    total = main_run_iterations(args)
    if args.restarts < 1 or (args.restarts > 1 and not 1 <= args.restart_iterations < total):
        raise UserError(f"--restarts {args.restarts} --restart_iterations {args.restart_iterations}: pass at least 1"
                        f" start, each run for 1 to {total - 1} of the run's {total} iterations")
    if args.restarts > 1 and args.grid_search:
        raise UserError("--grid_search's short run starts from one seed; drop --restarts for it")


def check_prior_flags(args):
    """--smooth_sigma/--smooth_until's and --bn_prior/--bn_prior_until/--bn_prior_floor's values that cannot work
    (recons.py checks them before reading a file, the API here too)."""
    if args.smooth_sigma < 0 or not 0 < args.smooth_until <= 1:
        raise UserError(f"--smooth_sigma {args.smooth_sigma} --smooth_until {args.smooth_until}: pass a noise std"
                        f" >= 0 and a share of the run in (0, 1]")
    if args.bn_prior < 0 or not 0 <= args.bn_prior_until <= 1 or args.bn_prior_floor < 0:
        raise UserError(f"--bn_prior {args.bn_prior} --bn_prior_until {args.bn_prior_until} --bn_prior_floor"
                        f" {args.bn_prior_floor}: pass a weight >= 0, a share of the run in [0, 1] and a level >= 0")
    if args.bn_prior_floor and not args.bn_prior:
        raise UserError(f"--bn_prior_floor {args.bn_prior_floor} is a level for the BN prior, which is off; pass"
                        f" --bn_prior W (--preset resnet: 1e-3)")


def check_reparam_flags(args, image_shape=None):
    """--coarse's, --pyramid's, --decorrelate_colours' and --chroma_tv's values that cannot work (recons.py
    checks them before reading a file, the API here too; image_shape, once known, for the image checks, where
    the preset's colour flags are turned off on grey images, saying so, as its SimuDy-only ones for a baseline)."""
    off = preset_flags_off(args, None if image_shape is None else image_shape[0])
    if off:
        print(f"--preset {args.preset}: {', '.join('--' + k for k in off)} off here (SimuDy on 3-channel images"
              f" only)")
    if args.pyramid:
        if args.pyramid < 2:
            raise UserError(f"--pyramid {args.pyramid}: pass 2 or more levels, or --pyramid 0 for none")
        if args.coarse:
            raise UserError(f"--coarse and --pyramid {args.pyramid} both re-parameterise the dummies (--preset resnet"
                            f" sets --pyramid 3); pass --pyramid 0 with --coarse")
        if image_shape is not None and 2 ** (args.pyramid - 1) >= min(image_shape[1:]):
            raise UserError(f"--pyramid {args.pyramid}: its coarsest level would have under 2 pixels on the images'"
                            f" {min(image_shape[1:])} px; pass fewer levels")
    if args.decorrelate_colours:
        if args.coarse:
            raise UserError("--coarse moves R x R images in RGB; pass --pyramid 2 or more (or neither) with"
                            " --decorrelate_colours")
        if image_shape is not None and image_shape[0] != 3:
            raise UserError(f"--decorrelate_colours needs 3-channel images, these have {image_shape[0]}; drop it")
    if args.chroma_tv and (args.chroma_tv < 0 or args.method != "simudy"):
        raise UserError(f"--chroma_tv {args.chroma_tv}: pass a weight >= 0, for SimuDy only (or --chroma_tv 0)")
    if args.chroma_tv and image_shape is not None and image_shape[0] != 3:
        raise UserError(f"--chroma_tv needs 3-channel images, these have {image_shape[0]}; drop it")
    if not args.coarse:
        return
    if args.coarse < 1 or args.coarse_iters < 0 or args.method != "simudy":
        raise UserError(f"--coarse {args.coarse} --coarse_iters {args.coarse_iters}: pass a resolution >= 1 and"
                        f" iterations >= 0, for SimuDy only (or --coarse 0)")
    if args.grid_search:
        raise UserError("--grid_search's short run moves full-size dummies; drop --coarse for it")
    if image_shape is not None and args.coarse >= min(image_shape[1:]):
        raise UserError(f"--coarse {args.coarse} is not below the images' {image_shape[1]} px; pass a"
                        f" smaller resolution (e.g. half of it) or --coarse 0")


def reconstruct_from_args(run, args, device, run_dir, rlr, rbs, train_dir=None, train_images=None, constrain=None):
    """The reconstruction run that recons.py's flags `args` describe, on a TrainingRun, into run_dir, with
    the simulation's lr and batch size rlr, rbs (each a value or "auto"): the auto search first (each short
    run also scored when the training images are given; run_dir may then be a function of the resolved
    args), then SimuDy (or the baseline args.method) with its log, snapshots and resume state. Returns a
    Reconstruction. constrain(x), when given, runs on SimuDy's dummies after every main-run iteration
    (benchmarks/fixed_images.py holds some of them at given images)."""
    data = run.config["data"]
    for note in unsimulated_defences(run.config["args"]):  # never a silent mismatch with the training
        print(note)
    num_dummy = num_dummies(args.num_dummy, data["num_images"], args.method)
    check_reparam_flags(args, data["image_shape"])
    check_init_snapshot(args)
    check_restarts(args)
    check_prior_flags(args)
    if args.method != "simudy":
        x, labels, _ = reconstruct_baseline(args, run, train_dir, run_dir, num_dummy, args.rec_lr, device)
        return Reconstruction(x.cpu(), labels.cpu(), None, float("nan"), run_dir)
    search = None
    if AUTO in (rlr, rbs):
        candidates = search_candidates(rlr, rbs, None, run.config["args"]["bs"], args.rlr_candidates,
                                       args.rbs_candidates)
        if args.auto_criterion == "norm":
            search = norm_search(run, args, candidates, num_dummy, device, train_images)
            why = f"the true change's norm after {args.norm_iterations} iterations"
        else:
            search = auto_search(run, args, candidates, num_dummy, args.rec_lr, device, train_images)
            why = f"lowest loss after {GRID_SEARCH_STEPS} steps"
        rlr = args.rlr = search[0]["rlr"]
        rbs = args.rbs = search[0]["rbs"]
        if callable(run_dir):  # the CLI names the folder after the chosen values
            run_dir = run_dir(args)
        print(f"\nauto search chose --rlr {rlr:g} --rbs {rbs} ({why}); run folder {run_dir}")

    total = main_run_iterations(args)

    def start_run(seed):
        x, labels, _ = initial_dummies(num_dummy, data["image_shape"], data["num_classes"], seed, device)
        if args.init_snapshot and not args.resume:  # a resumed run restores its own images and labels
            x, labels = snapshot_start(args.init_snapshot, x, labels)
        setup, graph_bytes = main_run_setup(run, rlr, rbs, argparse.Namespace(**{**vars(args), "seed": seed}), x,
                                            labels, total)
        return MainRun(setup, x, labels, *simudy_optimisers(x, args.rec_lr, args.schedule, total, args.warmup,
                                                             setup.reparam), graph_bytes)

    def iterate(main, iteration):
        row = simudy_iteration(main.setup, main.x, main.labels, main.opt, main.sched, iteration)
        if constrain is not None:
            with torch.no_grad():
                constrain(main.x)
        return row

    began, restarts = time.time(), None
    # a resumed run's own record: the seed its restarts chose, and the search and restarts that chose its start
    # (no record: open_run says there is nothing to resume)
    previous_config = os.path.join(run_dir, CONFIG)
    previous = read_json(previous_config) if args.resume and os.path.isfile(previous_config) else {}
    if args.restarts > 1 and not args.resume:  # a resumed run restores its images and labels
        prepare_run_dir(run_dir, args.overwrite)  # refuse an existing folder before the slow restarts
        with tempfile.TemporaryDirectory(prefix="simudy_restarts_") as logs:
            main, restart_log, restarts = best_start(start_run, iterate, range(args.seed, args.seed + args.restarts),
                                                     args.restart_iterations, logs, began)
            state = main.run_state()
            open_run(run_dir, state, False, args.overwrite, device)
            for name in os.listdir(logs):  # every start's log beside the run's, the winner's also as its start
                shutil.move(os.path.join(logs, name), run_dir)
        with open(os.path.join(run_dir, os.path.basename(restart_log))) as src, \
                open(os.path.join(run_dir, LOG), "a") as dst:
            dst.writelines(src.readlines()[1:])
        start = args.restart_iterations
    else:
        seed = args.seed
        if args.resume and args.restarts > 1:  # the chosen start's seed (its smoothing noise)
            seed = previous.get("restarts", {}).get("chosen_seed", seed)
        main = start_run(seed)
        state = main.run_state()
        start = open_run(run_dir, state, args.resume, args.overwrite, device)
    x, labels, setup, opt, sched = main.x, main.labels, main.setup, main.opt, main.sched
    if main.graph_bytes is not None:
        print(f"backprop: {setup.backprop} (the unrolled graph would need ~{main.graph_bytes / 2**30:.1f} GiB)")
    config = run_config(args, train_dir, device, rlr=rlr, rbs=rbs, num_dummy=num_dummy,
                        simulation=vars(setup.sgd), backprop=setup.backprop)
    if search:
        write_csv(os.path.join(run_dir, "auto_search.csv"), search, list(dict.fromkeys(k for r in search for k in r)))
        if args.auto_criterion == "loss":
            plot_auto_search(search, os.path.join(run_dir, "auto_search.png"))
        config["auto_search"] = {"criterion": args.auto_criterion, "chosen": {"rlr": rlr, "rbs": rbs},
                                 "steps": GRID_SEARCH_STEPS if args.auto_criterion == "loss" else args.norm_iterations,
                                 "candidates": search}
    if restarts:
        config["restarts"] = {"iterations": args.restart_iterations, "starts": restarts, "chosen_seed": setup.seed}
    if args.resume:  # a resumed run keeps the record of the search and the restarts that chose its start
        config.update({k: v for k, v in previous.items() if k in ("auto_search", "restarts") and k not in config})
    write_json(os.path.join(run_dir, CONFIG), config)
    if restarts:  # a stop from here on keeps the restarts; written after config.json, which names the chosen seed
        save_resume_state(run_dir, state, args.restart_iterations - 1)

    if args.grid_search:
        iterations = min(GRID_SEARCH_STEPS, args.max_iterations or GRID_SEARCH_STEPS)
        loss = short_run(setup, x, labels, args.rec_lr, iterations, os.path.join(run_dir, "log.csv"))
        write_json(os.path.join(run_dir, "grid_result.json"),
                   {"rlr": rlr, "rbs": rbs, "final_loss": loss, "iterations": iterations})
        print(final_loss_text(loss, run_dir))
        return Reconstruction(x.detach().cpu(), labels.cpu(), None, loss, run_dir)

    ranked = {}  # the newest snapshot's ranking, for ranking.csv

    def write_snapshot(iteration):
        epoch, step = divmod(iteration, args.rec_steps_per_epoch)
        if args.num_dummy:  # the unknown-N ranking; the simulation's sgd, clip off
            norms = total_gradient_norms(run.model, run.theta0, run.buffers, x, labels, setup.rbs,
                                         simulated_epochs(setup, epoch), setup.sgd)
            ranked.update(ranking=rank_dummies(norms, labels if args.ranking == "class_balanced" else None),
                          grad_norms=norms)
        return save_snapshot(run_dir, epoch, x, labels, epoch, step, **ranked)

    loss = run_to_end(run_dir, state, start, total, args.max_iterations, functools.partial(iterate, main),
                      snapshot_interval(args.save_every, "simudy"), args.rec_steps_per_epoch, write_snapshot,
                      args.max_minutes, None if args.resume else began)
    if ranked:  # every run that ends or stops writes a snapshot at its last iteration
        write_csv(os.path.join(run_dir, RANKING),
                  [{"rank": r, "dummy": int(j), "label": int(labels[j]), "grad_norm": float(ranked["grad_norms"][j])}
                   for r, j in enumerate(ranked["ranking"])], ["rank", "dummy", "label", "grad_norm"])
    print(final_loss_text(loss, run_dir))
    return Reconstruction(x.detach().cpu(), labels.cpu(), ranked.get("ranking"), loss, run_dir)
