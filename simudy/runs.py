"""Run folders: every name and path the stages write and read, in one place, and their files.

train.py writes ckpts/model_ckpt/<training run>/ (theta0.pth, theta_final.pth, train_subset.pth,
config.json); recons.py writes ckpts/recover_x/<reconstruction run>/ (config.json, labels.pth, log.csv,
snapshots <epoch>_<step>.pth or x_<step>.pth, resume.pth); metrics.py writes <reconstruction run>/metrics/
<snapshot>/. Names follow the paper's flags, floats printed as Python prints them (1e-2 -> 0.01).
`resolve_run` works out once, from the flags and the training run's config.json (read once), what a
reconstruction run is: its training folder, simulated epochs, lr and batch size, Adam lr and folder.
"""
import csv
import hashlib
import json
import os
import platform
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from models import default_width

from .data import num_classes_of
from .errors import UserError

CKPT_ROOT = "./ckpts"
AUTO = "auto"  # --rlr/--rbs auto: recons.py picks the value by short runs
# The paper's Adam lr on the dummies: recons.py's 1e-2; recons_1step.py and recons_2step.py's 3e-4.
DEFAULT_REC_LR = {"simudy": 1e-2, "one_step": 3e-4, "two_step": 3e-4}
METHOD_OF_LINEAR = {0: "simudy", 1: "one_step", 2: "two_step"}  # metrics.py --linear
# Files of a run folder.
CONFIG, LABELS, LOG, RESUME, RANKING = "config.json", "labels.pth", "log.csv", "resume.pth", "ranking.csv"
THETA0, THETA_FINAL, TRAIN_SUBSET = "theta0.pth", "theta_final.pth", "train_subset.pth"
SNAPSHOT_PATTERN = {"simudy": r"\d+_\d+\.pth", "baseline": r"x_\d+\.pth", "any": r"(\d+|x)_\d+\.pth"}


# ----------------------------------------------------------------------------------------------
# Names


def model_tag(model_name, width):
    return model_name if width in (None, default_width(model_name)) else f"{model_name}_w{width}"


def train_run_name(model_name, width, dataset, num_imgs, bs, lr, defence=""):
    return f"{model_tag(model_name, width)}_{dataset}_num_img{num_imgs}_bsz{bs}_lr{lr}{defence}"


def defence_tag(args):
    """The run-name suffix of a defended training (empty for the paper's undefended one)."""
    tag = ""
    if getattr(args, "dp_max_grad_norm", None) is not None:
        tag += f"_dp{getattr(args, 'dp_noise_multiplier', None) or 0}_C{args.dp_max_grad_norm}"
    if getattr(args, "augment", "none") != "none":
        tag += f"_aug{args.augment}"
    if getattr(args, "label_smoothing", 0.0):
        tag += f"_ls{args.label_smoothing}"
    return tag


def train_dir_from_args(args, lr):
    if getattr(args, "train_dir", None):
        return args.train_dir
    num_imgs = args.num_imgs_per_class * num_classes_of(args.dataset, getattr(args, "data_root", None))
    name = train_run_name(args.model_name, args.width, args.dataset, num_imgs, args.bs, lr, defence_tag(args))
    return os.path.join(CKPT_ROOT, "model_ckpt", name)


def pretrained_cache_path(args, excluded=None):
    """Where train.py caches the theta0 it pretrains for a ResNet (reused by every run of these flags).
    excluded: the subset's indices, for a cache of that subset's own (their hash in the name), made when
    the shared cache was pretrained on images of the subset."""
    name = f"{args.model_name}_w{args.width or 'paper'}_{args.dataset}_pimgs{args.pretrain_imgs}" \
           f"_pep{args.pretrain_epochs}_seed{args.seed}"
    if excluded is not None:
        name += "_excl" + hashlib.sha1(",".join(map(str, sorted(excluded))).encode()).hexdigest()[:8]
    return os.path.join(CKPT_ROOT, "pretrained", name + ".pth")


def pretraining_record_path(cache):
    """The JSON beside a cached theta0 that says which images its pretraining used ("theta0_data")."""
    return os.path.splitext(cache)[0] + ".json"


def snapshot_path(run_dir, prefix, step):
    """<epoch>_<step>.pth (SimuDy) or x_<step>.pth (baselines): the paper code's names."""
    return os.path.join(run_dir, f"{prefix}_{step}.pth")


def restart_log_path(run_dir, seed):
    """--restarts: the log of the start from `seed`, kept beside the run's log.csv."""
    return os.path.join(run_dir, f"restart_seed{seed}.csv")


def list_snapshots(recons_dir, pattern=SNAPSHOT_PATTERN["any"]):
    """Snapshot stems in the folder, oldest first (numeric order of epoch and step)."""
    if not os.path.isdir(recons_dir):
        raise UserError(f"reconstruction folder {recons_dir} not found; run recons.py with the same"
                        f" flags first, or pass --recons_dir / --snapshot")
    stems = [f[:-4] for f in os.listdir(recons_dir) if re.fullmatch(pattern, f)]
    return sorted(stems, key=lambda stem: [int(n) for n in re.findall(r"\d+", stem)])


def metrics_dir(recons_dir, snapshot):
    return os.path.join(recons_dir, "metrics", os.path.splitext(os.path.basename(snapshot))[0])


# ----------------------------------------------------------------------------------------------
# What a reconstruction run is, resolved once


@dataclass
class ResolvedRun:
    """What the flags name, with 0 / None defaults resolved: the training folder and its config.json
    (None when it is missing and nothing needed it), simulated epochs, simulation lr and batch size,
    the Adam lr and the reconstruction folder."""
    train_dir: str
    train_config: Optional[dict]
    steps: int
    rlr: object
    rbs: object
    rec_lr: float
    recons_dir: str


def resolve_rec_lr(args, method):
    """--rec_lr, or the paper's default for the method."""
    return DEFAULT_REC_LR[method] if args.rec_lr is None else args.rec_lr


def resolve_run(args, method="simudy"):
    """ResolvedRun for these flags. rlr/rbs of 0 mean the training's (paper code); 'auto' stays 'auto'
    (recons.py's to resolve, and then no folder can be named yet). --steps 0 means the training run's
    epochs: the paper's text simulates the true number of epochs, its code 8 of 20, and with 8 the true
    images are not the loss's optimum (see benchmarks/README)."""
    train_dir = train_dir_from_args(args, args.tlr)
    config_path = os.path.join(train_dir, CONFIG)
    train_config = read_json(config_path) if os.path.isfile(config_path) else None
    steps = args.steps
    if not steps:
        if train_config is None:
            raise UserError(f"--steps 0 (the fast preset's) reads the training's epochs from {config_path},"
                            f" which is missing; run train.py with these flags first or pass --steps N")
        steps = train_config["args"]["epochs"]
    rlr = args.rlr if args.rlr == AUTO else (args.rlr or args.tlr)
    rbs = args.rbs if args.rbs == AUTO else (args.rbs or args.bs)
    rec_lr = resolve_rec_lr(args, method)
    recons_dir = args.recons_dir
    if not recons_dir and AUTO not in (rlr, rbs):
        recons_dir = os.path.join(CKPT_ROOT, "recover_x", recons_run_name(
            os.path.basename(os.path.normpath(train_dir)), method, steps, rlr, rbs, rec_lr, args))
    return ResolvedRun(train_dir, train_config, steps, rlr, rbs, rec_lr, recons_dir)


def recons_run_name(train_name, method, steps, rlr, rbs, rec_lr, args):
    if method == "simudy":
        name = f"{train_name}_nsteps{steps}_rbs{rbs}_rlr{rlr}_reclr{rec_lr}"
    else:
        name = f"{train_name}_{method}_reclr{rec_lr}"
    if getattr(args, "preset", "paper") != "paper" and method == "simudy":
        name += f"_{args.preset}"
    if getattr(args, "num_dummy", None):
        name += f"_ndummy{args.num_dummy}"
    if getattr(args, "grid_search", 0):
        name += "_grid"
    return name


def recons_dir_from_args(args, method="simudy"):
    """The reconstruction run folder named by the paper's flags (or --recons_dir)."""
    resolved = resolve_run(args, method)
    if resolved.recons_dir is None:
        flag = "rlr" if resolved.rlr == AUTO else "rbs"
        raise UserError(f"--{flag} auto names no run folder; pass the value recons.py chose"
                        f" (printed, and in the run's auto_search.csv)")
    return resolved.recons_dir


def snapshot_path_from_args(args):
    """(reconstruction folder, snapshot file) named by metrics.py's flags; the file need not exist.

    --snapshot last = the newest snapshot of the run the flags name (what the Makefile's demo uses);
    --snapshot 3_324 with --recons_dir = that folder's snapshot of that name (as the error lists them).
    """
    if args.snapshot and args.snapshot != "last":
        named = os.path.join(args.recons_dir, args.snapshot + ".pth") if args.recons_dir else None
        if named and not os.path.isfile(args.snapshot) and os.path.isfile(named):
            return args.recons_dir, named
        return args.recons_dir or os.path.dirname(os.path.abspath(args.snapshot)), args.snapshot
    recons_dir = recons_dir_from_args(args, method=METHOD_OF_LINEAR[args.linear])
    prefix = str(args.eval_epoch) if args.linear == 0 else "x"  # paper code's file names
    if args.snapshot == "last":
        stems = list_snapshots(recons_dir, SNAPSHOT_PATTERN["simudy" if args.linear == 0 else "baseline"])
        if not stems:
            raise UserError(f"no snapshots in {recons_dir}; run recons.py with the same flags first")
        return recons_dir, os.path.join(recons_dir, stems[-1] + ".pth")
    return recons_dir, snapshot_path(recons_dir, prefix, args.eval_step * 100)


def metrics_dir_from_args(args):
    return metrics_dir(*snapshot_path_from_args(args))


# ----------------------------------------------------------------------------------------------
# Files


def prepare_run_dir(path, overwrite, resume=False):
    """Create a run folder; refuse to replace a previous run unless asked."""
    if os.path.isdir(path) and os.listdir(path) and not (overwrite or resume):
        raise UserError(f"run folder {path} already exists; pass --overwrite to replace it"
                        f" (or --resume where the stage supports it)")
    if overwrite and os.path.isdir(path):
        for name in os.listdir(path):
            full = os.path.join(path, name)
            if os.path.isfile(full):
                os.remove(full)
    os.makedirs(path, exist_ok=True)
    return path


def library_versions():
    from importlib.metadata import version  # importing torchvision itself costs seconds
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": version("torchvision"), "numpy": np.__version__,
            "platform": platform.platform()}


def run_config(args, train_dir, device, **fields):
    """A reconstruction run's config.json: the flags, seed, resolved values, versions and where it ran."""
    return {"stage": "recons", "method": args.method, "args": vars(args), "train_dir": train_dir,
            "cwd": os.getcwd(),  # what a relative train_dir is relative to (recorded_train_dir)
            "seed": args.seed, **fields, "versions": library_versions(), "device": str(device),
            "cpu_threads": torch.get_num_threads(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}  # set per job by grid_search.sh


def recorded_train_dir(recons_dir, config):
    """The training run folder a reconstruction's config.json names, found from any working directory.
    A relative train_dir is relative to the folder recons.py ran in: tried as given (the same folder),
    from the config's recorded cwd, then from the reconstruction folder's parent (a `--recons_dir NAME`
    run in configs older than the cwd field); the first that holds a training subset wins."""
    train_dir = config.get("train_dir")
    if not train_dir:
        raise UserError(f"{os.path.join(recons_dir, CONFIG)} names no train_dir; pass --train_dir")
    bases = ["", config.get("cwd") or "", os.path.dirname(os.path.abspath(recons_dir))]
    for base in bases:  # joining onto an absolute train_dir gives it back unchanged
        candidate = os.path.join(base, train_dir)
        if os.path.isfile(os.path.join(candidate, TRAIN_SUBSET)):
            return candidate
    raise UserError(f"training run {train_dir} (named in {os.path.join(recons_dir, CONFIG)}) not found from"
                    f" here, from {config.get('cwd') or 'its recorded cwd'} or beside the run; pass --train_dir")


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def read_json(path, what="run"):
    if not os.path.isfile(path):
        raise UserError(f"{path} not found; run the {what} stage first or point to its folder")
    with open(path) as f:
        return json.load(f)


def load_checkpoint(path, what):
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} not found; run the stage that writes it (or fix the path)")
    return torch.load(path, map_location="cpu", weights_only=False)


def write_csv(path, rows, fieldnames):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames)
        w.writeheader()
        w.writerows(rows)
