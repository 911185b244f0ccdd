"""Stage 2: reconstruct the training images from theta0 and theta_final alone (SimuDy, or a baseline).

SimuDy (--method simudy, the default). Dummy images start as noise (randn * 0.5) with balanced random
labels. Each iteration simulates the training on them (same lr, batch size, `--steps` epochs, unrolled
SGD) and moves the dummies so that the simulated change theta0 - theta_hat_f points the way of
theta0 - theta_f:
    loss = 1 - cos(theta0 - theta_hat_f, theta0 - theta_f) + tv_weight * sum_batches TV(x_batch)
--num_dummy M reconstructs M dummies when the dataset size is unknown and ranks them by the norm of their
total gradient over the simulated training (the paper's appendix); --rlr auto / --rbs auto pick the
simulation's lr and batch size by the paper's short runs before the full one. --preset picks the recipe
for the dummies' optimisation (paper, fast, or resnet: the README lists each one's flags).

Baselines, as the paper's recons_1step.py / recons_2step.py re-implemented them: 2N candidates with
dual variables lambda, matching grad_theta sum_i lambda_i loss(x_i, y_i) at theta_f (one_step, Buzaglo
et al.) or at theta0 and theta_f (two_step, Loo et al.) to theta0 - theta_f.

The model to attack comes from train.py's run folder (named by the flags, or --train_dir), or from two
state_dict files saved anywhere: --theta0 FILE --theta_final FILE with --model_name/--width, the data's
--image_shape and --num_classes (--dataset names the normalisation), and the training's --tlr, --bs,
--epochs (--momentum, --weight_decay, --bn_mode).

    python ./recons.py --num_imgs_per_class 2 --tlr 1e-2 --bs 20 --rec_lr 1e-2
    python ./recons.py --num_imgs_per_class 2 --tlr 1e-2 --bs 20 --method one_step
    python ./recons.py --theta0 a.pth --theta_final b.pth --model_name mlp --width 100 \
        --image_shape 1 28 28 --num_classes 10 --num_images 20 --tlr 1e-2 --bs 20 --epochs 20 --preset fast
"""
import argparse
import os

from models import build_model
from simudy.api import check_init_snapshot, check_reparam_flags, check_restarts, check_prior_flags, reconstruct_from_args
from simudy.data import NORMALISATION
from simudy.errors import UserError
from simudy.flags import (add_data_args, add_model_args, add_reconstruction_args, add_recons_id_args,
                          add_runtime_args, add_training_hparam_args, parse_with_preset, pick_device, set_seed)
from simudy.runs import AUTO, TRAIN_SUBSET, load_checkpoint, recons_dir_from_args, resolve_rec_lr, resolve_run
from simudy.search import NORM_NEEDS_TRUE_N
from simudy.target import load_training_run, training_config, training_run_from_states
from utils import run_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_hparam_args(p, "--tlr")
    add_model_args(p)
    add_data_args(p)
    add_recons_id_args(p)
    add_runtime_args(p)
    add_reconstruction_args(p)
    g = p.add_argument_group("a model trained elsewhere (instead of train.py's run folder)")
    g.add_argument("--theta0", default=None, help="state_dict file of the model before training")
    g.add_argument("--theta_final", default=None, help="state_dict file of the model after training")
    g.add_argument("--image_shape", default=None, type=int, nargs=3, metavar=("C", "H", "W"),
                   help="shape of one training image")
    g.add_argument("--num_classes", default=10, type=int)
    g.add_argument("--num_images", default=None, type=int,
                   help="training images (default --num_imgs_per_class x --num_classes)")
    g.add_argument("--epochs", default=20, type=int, help="the training's epochs")
    g.add_argument("--momentum", default=0.0, type=float, help="the training's SGD momentum")
    g.add_argument("--weight_decay", default=0.0, type=float, help="the training's SGD weight decay")
    g.add_argument("--bn_mode", default="eval", choices=["eval", "train"], help="the training's BatchNorm mode")
    return parse_with_preset(p, argv)


def check_args(args):
    """The flag combinations that cannot work, before any file is read."""
    auto = AUTO in (args.rlr, args.rbs)
    if args.method != "simudy" and (auto or args.grid_search):
        raise UserError(f"--rlr/--rbs auto and --grid_search tune SimuDy's simulation; drop them for"
                        f" --method {args.method}")
    if auto and (args.grid_search or args.resume):
        raise UserError("--rlr/--rbs auto runs its own short runs and cannot resume; pass the chosen"
                        " --rlr/--rbs (printed, and in auto_search.csv) with --grid_search or --resume")
    if auto and args.auto_criterion == "norm" and args.num_dummy is not None:
        raise UserError(NORM_NEEDS_TRUE_N)
    if not 0 <= args.steps_epochs < args.rec_epochs:
        raise UserError(f"--steps_epochs {args.steps_epochs}: pass 0 (--steps throughout) or fewer outer epochs"
                        f" than --rec_epochs {args.rec_epochs}")
    check_prior_flags(args)
    if args.norm_iterations < 1:
        raise UserError(f"--norm_iterations {args.norm_iterations} must be at least 1")
    check_reparam_flags(args)
    if args.num_dummy is not None and args.num_dummy < 1:
        raise UserError(f"--num_dummy {args.num_dummy} must be at least 1")
    if (args.theta0 is None) != (args.theta_final is None):
        raise UserError("pass both --theta0 FILE and --theta_final FILE (or neither, for train.py's run folder)")
    if args.theta0 and args.image_shape is None:
        raise UserError("--theta0/--theta_final need the data's --image_shape C H W (and --num_classes)")
    check_init_snapshot(args)
    check_restarts(args)
    if args.init_snapshot and not args.recons_dir:
        raise UserError("--init_snapshot's run would share the folder name of a run from noise; pass --recons_dir")
    if args.theta0 and not args.recons_dir:
        raise UserError("--theta0/--theta_final name no run folder; pass --recons_dir")


def training_run_from_files(args, device):
    """The TrainingRun of --theta0/--theta_final and the flags that describe the model and its training."""
    num_images = args.num_images or args.num_imgs_per_class * args.num_classes
    mean, std = NORMALISATION[args.dataset]
    config = training_config(args.tlr, args.bs, args.epochs, num_images, args.num_classes, args.image_shape,
                             args.momentum, args.weight_decay, args.bn_mode, mean, std,
                             model_name=args.model_name, width=args.width, label_smoothing=args.label_smoothing,
                             dp_max_grad_norm=args.dp_max_grad_norm, dp_noise_multiplier=args.dp_noise_multiplier,
                             augment=args.augment)
    model = build_model(args.model_name, args.num_classes, args.image_shape, args.width)
    states = [load_checkpoint(path, flag) for path, flag in ((args.theta0, "--theta0"),
                                                             (args.theta_final, "--theta_final"))]
    return training_run_from_states(model, *states, config, device, where=(args.theta0, args.theta_final),
                                    fix="pass the --model_name/--width/--num_classes/--image_shape it was saved with")


def main(args):
    check_args(args)
    device = pick_device(args.device)
    set_seed(args.seed)
    train_images = None  # with --rlr/--rbs auto, each short run's SSIM too (the paper's Fig. 2)
    if args.theta0:
        run, train_dir = training_run_from_files(args, device), None
        args.steps, args.rec_lr = args.steps or args.epochs, resolve_rec_lr(args, args.method)
        run_dir = args.recons_dir
    else:
        resolved = resolve_run(args, args.method)
        train_dir = resolved.train_dir
        run = load_training_run(train_dir, device, resolved.train_config)
        args.steps, args.rec_lr = resolved.steps, resolved.rec_lr  # recorded in config.json as they ran
        subset_path = os.path.join(train_dir, TRAIN_SUBSET)
        if AUTO in (args.rlr, args.rbs) and os.path.isfile(subset_path):
            train_images = load_checkpoint(subset_path, "training subset")["images"]
        # with auto the folder is named after the chosen values
        run_dir = resolved.recons_dir or (lambda chosen: recons_dir_from_args(chosen, args.method))
    rlr = args.rlr if args.rlr == AUTO else (args.rlr or args.tlr)
    rbs = args.rbs if args.rbs == AUTO else (args.rbs or args.bs)
    return reconstruct_from_args(run, args, device, run_dir, rlr, rbs, train_dir, train_images).run_dir


def run_argv(argv):
    """One recons.py run in this process (grid_search.sh's submitit jobs). Returns its run folder."""
    return main(parse_args(argv))


if __name__ == "__main__":
    run_main(main, parse_args)
