"""Command-line flags, defined once: the argparse groups the stages share, recons.py's reconstruction
flags (which the Python API reads its defaults from), the named presets, and what --device / --seed mean.
"""
import argparse
import random
import sys

import numpy as np
import torch

from models import MODELS

from .baselines import BASELINE_STEPS
from .data import DATASETS
from .errors import UserError
from .loop import SAVE_EVERY
from .runs import AUTO
from .search import NORM_MATCH_ITERATIONS

METHODS = ("simudy", "one_step", "two_step")


def add_data_args(parser):
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", choices=sorted(DATASETS),
                   help="training set the model was fine-tuned on")
    g.add_argument("--data_root", default="./data", help="where the dataset files are (as the paper)")
    g.add_argument("--num_imgs_per_class", default=2, type=int,
                   help="the first k images of each class form the training subset")
    g.add_argument("--offset", default=0, type=int, help="dataset index where the subset search starts")
    return g


def add_model_args(parser):
    g = parser.add_argument_group("model")
    g.add_argument("--model_name", default="resnet", choices=list(MODELS),
                   help="resnet (= resnet18, the paper's), resnet18, resnet34, resnet50 or mlp")
    g.add_argument("--width", default=None, type=int,
                   help="ResNet base channels (64 = paper) or MLP hidden units (1000 = paper)")
    return g


def add_training_hparam_args(parser, lr_flag):
    """The training run's batch size and lr; train.py names the lr --lr, the later stages --tlr."""
    g = parser.add_argument_group("training hyper-parameters")
    g.add_argument(lr_flag, default=1e-2, type=float, dest="tlr" if lr_flag == "--tlr" else "lr",
                   help="learning rate of the real training (train.py)")
    g.add_argument("--bs", default=20, type=int, help="batch size of the real training")
    add_defence_args(parser)
    return g


def number_or_auto(kind):
    """argparse type: 'auto' or a number of `kind` (float, int)."""
    def parse(value):
        return AUTO if value == AUTO else kind(value)
    parse.__name__ = f"{kind.__name__} or auto"  # what argparse names in 'invalid ... value'
    return parse


# Named reconstruction recipes: defaults of recons.py's (and metrics.py's) flags. "paper" is the paper
# code's recipe, every flag's own default. "fast" is what benchmarks/quality.py measured to reach a good
# reconstruction in far fewer CPU-minutes (benchmarks/README.md has each idea and its effect). A preset
# changes the outer optimisation of the dummies and how many epochs are simulated (fast: the training's
# own, as the paper's text), never how a simulated step is computed. Explicit flags win.
PRESETS = {
    "paper": {},
    # --rlr/--rbs auto by the norm criterion and --num_dummy's class-balanced ranking (benchmarks/unknowns.py:
    # the paper's short-run loss picks the grid's end on images no one tuned on, the norm the true lr within a
    # grid step; ranking within each class keeps more of the matched dummies).
    "fast": {"schedule": "cosine", "rec_epochs": 4, "rec_steps_per_epoch": 200, "clip_epochs": 1,
             "tv_weight": 2e-3, "steps": 0, "snapshot": "last", "auto_criterion": "norm",
             "ranking": "class_balanced"},
    # ResNets (benchmarks/README.md, "ResNets"): the fast recipe with Adam lr 0.1 (the dummies must travel
    # far from noise, and Adam moves a pixel about lr per step), pixels kept in the valid range, TV 10x
    # the fast preset's (the objective barely sees pixel noise on a ResNet), no clip; the dummies as a
    # 3-level pyramid with the BN prior for the first 30% of the run (session 15: 1.5x the SSIM on D and
    # 2.5x on E at equal iterations). On colour images the pyramid moves decorrelated colour coordinates
    # under a chroma TV prior (sessions 20-22: 1.8x the SSIM on two B instances at equal iterations; the
    # chroma noise was the objective's, not the start's). Grey images: see COLOUR_ONLY.
    "resnet": {"schedule": "cosine", "rec_epochs": 4, "rec_steps_per_epoch": 375, "clip_epochs": 0,
               "tv_weight": 2e-2, "steps": 0, "rec_lr": 0.1, "box": True, "pyramid": 3, "bn_prior": 1e-3,
               "bn_prior_until": 0.3, "snapshot": "last", "auto_criterion": "norm", "ranking": "class_balanced",
               "decorrelate_colours": True, "chroma_tv": 0.02},
}
# Flags that need 3-channel images, and those SimuDy's alone, with their off values: where they do not
# apply, a preset's values of them are turned off (preset_flags_off), so one preset serves colour and grey
# data and the baselines; an explicit other value still meets its flag's own error.
COLOUR_ONLY = {"decorrelate_colours": False, "chroma_tv": 0.0}
SIMUDY_ONLY = {"decorrelate_colours": False, "chroma_tv": 0.0}


# A preset's default that an explicit choice of another flag overrides: the fast preset scores the last
# snapshot, unless the user names one with the paper's --eval_epoch/--eval_step (argparse dests); the
# resnet preset's decorrelated colours give way to --coarse (which moves R x R images in RGB).
PRESET_YIELDS_TO = {"snapshot": ("eval_epoch", "eval_step"), "decorrelate_colours": ("coarse",)}
_NOT_GIVEN = object()


def is_explicit_off(value, default):
    """A flag given its default where that default is off (--coarse 0): no choice a preset must yield to.
    A default that is a choice (--eval_epoch 5) still counts when given."""
    return not default and value == default


def preset_values(preset, given):
    """The preset's flag values, less those that yield to a flag in `given` (dests the user chose)."""
    return {k: v for k, v in PRESETS[preset].items() if not set(given) & set(PRESET_YIELDS_TO.get(k, ()))}


def preset_flags_off(args, channels=None):
    """Turn off the flags whose values in `args` are its preset's where they do not apply: COLOUR_ONLY on
    images with other than 3 channels (channels None: not known yet), SIMUDY_ONLY for a baseline. Returns
    their names (the caller says so)."""
    off_values = {**(SIMUDY_ONLY if args.method != "simudy" else {}),
                  **(COLOUR_ONLY if channels not in (None, 3) else {})}
    preset = preset_values(args.preset, ())
    off = [k for k, v in off_values.items() if k in preset and getattr(args, k) == preset[k] != v]
    for k in off:
        setattr(args, k, off_values[k])
    return off


def parse_with_preset(parser, argv=None):
    """parser.parse_args with the chosen --preset's values as the defaults of the flags this parser has."""
    argv = sys.argv[1:] if argv is None else list(argv)
    known = vars(parser.parse_known_args(argv)[0])  # every dest of this parser, with its default
    # which flags were given, however spelt (--eval_step=3, or an abbreviation such as --eval_ep): parse
    # once more with a marker as their default
    watched = {d for dests in PRESET_YIELDS_TO.values() for d in dests if d in known}
    defaults = {d: parser.get_default(d) for d in watched}
    parser.set_defaults(**dict.fromkeys(watched, _NOT_GIVEN))
    marked = vars(parser.parse_known_args(argv)[0])
    parser.set_defaults(**defaults)
    given = {d for d in watched if marked[d] is not _NOT_GIVEN and not is_explicit_off(marked[d], defaults[d])}
    parser.set_defaults(**{k: v for k, v in preset_values(known["preset"], given).items() if k in known})
    return parser.parse_args(argv)


def add_defence_args(parser):
    """train.py's defences (issue 14), all off by default (the paper's undefended training)."""
    g = parser.add_argument_group("defences of the real training (off by default; they name its run folder,"
                                  " and recons.py reads them from its config.json)")
    g.add_argument("--dp_noise_multiplier", default=None, type=float, metavar="SIGMA",
                   help="DP-SGD through Opacus: Gaussian noise of std SIGMA*C on each batch's clipped sum"
                        " (0: clipping only); needs --dp_max_grad_norm")
    g.add_argument("--dp_max_grad_norm", default=None, type=float, metavar="C",
                   help="DP-SGD's per-image gradient clip (Opacus), on its own: clipping without noise")
    g.add_argument("--dp_delta", default=1e-5, type=float, help="delta of the reported (epsilon, delta)")
    g.add_argument("--augment", default="none", choices=["none", "flip", "crop_flip"],
                   help="seeded per-image augmentation of every training batch (torchvision)")
    g.add_argument("--label_smoothing", default=0.0, type=float, help="cross-entropy label smoothing")


def add_recons_id_args(parser):
    """Flags that name a reconstruction run (recons.py writes it, metrics/draw_pics read it)."""
    g = parser.add_argument_group("reconstruction run")
    g.add_argument("--preset", default="paper", choices=list(PRESETS),
                   help="recipe for the dummies' optimisation: paper (the paper code's), fast (fewer"
                        " iterations, one cosine decay, the training's epochs simulated) or resnet (fast with"
                        " Adam lr 0.1, --box and TV 2e-2, 1,500 iterations, the pyramid and BN warm start; on colour"
                        " images decorrelated colours and a chroma TV); see README; a non-paper preset adds"
                        " _<preset> to the folder name")
    g.add_argument("--steps", default=8, type=int,
                   help="simulated epochs (paper code default 8); 0 = the training's epochs, as the paper's"
                        " text (the fast preset's choice)")
    g.add_argument("--steps_epochs", default=0, type=int,
                   help="simulate --steps epochs in the first N outer epochs only, then all of the training's"
                        " epochs: cheap early, and at the end a loss whose optimum is the true images (with"
                        " fewer epochs it is not); 0 = --steps throughout")
    g.add_argument("--rbs", default=0, type=number_or_auto(int),
                   help="simulation batch size; 0 = the training's --bs; auto (recons.py) = chosen by short runs")
    g.add_argument("--rlr", default=0, type=number_or_auto(float),
                   help="simulation lr; 0 = the training's --tlr; auto (recons.py) = chosen by short runs")
    g.add_argument("--rec_lr", default=None, type=float,
                   help="Adam lr on the dummy images; default the paper's: 1e-2 SimuDy, 3e-4 the baselines")
    g.add_argument("--rec_lambda_lr", default=1e-6, type=float,
                   help="SGD lr on the baselines' dual variables (paper code)")
    g.add_argument("--num_dummy", default=None, type=int,
                   help="dummies to reconstruct when the dataset size is unknown; default the training's N"
                        " (SimuDy) or 2N (baselines); a given value adds _ndummy<M> to the folder name")
    g.add_argument("--ranking", default="norm", choices=["norm", "class_balanced"],
                   help="--num_dummy's ranking: norm (paper), descending total-gradient norm; class_balanced (fast,"
                        " resnet presets), the same norm within each label, one dummy per class per round, for a"
                        " class-balanced training subset (README, 'Unknown lr, batch size and N')")
    g.add_argument("--train_dir", default=None,
                   help="training run folder; default derived from the flags above")
    g.add_argument("--recons_dir", default=None,
                   help="reconstruction run folder; default derived from the flags above")
    return g


def add_eval_args(parser):
    g = parser.add_argument_group("evaluation")
    g.add_argument("--eval_epoch", default=5, type=int, help="snapshot epoch (paper code default 5)")
    g.add_argument("--eval_step", default=12, type=int,
                   help="snapshot step in hundreds: reads <eval_epoch>_<eval_step*100>.pth")
    g.add_argument("--linear", default=0, type=int, choices=[0, 1, 2],
                   help="0 SimuDy; 1 Buzaglo et al.; 2 Loo et al. (the paper's flag)")
    g.add_argument("--snapshot", default=None,
                   help="explicit snapshot file, or with --recons_dir a snapshot's name there (3_324); overrides"
                        " the two above")
    return g


def add_metrics_args(parser):
    """metrics.py's and draw_pics.py's flags: which reconstruction run, snapshot and matching."""
    add_data_args(parser)
    add_model_args(parser)
    add_training_hparam_args(parser, "--tlr")
    add_recons_id_args(parser)
    add_eval_args(parser)
    add_runtime_args(parser)
    g = parser.add_argument_group("metrics")
    g.add_argument("--matching", default="greedy", choices=["greedy", "hungarian"],
                   help="greedy = paper code; hungarian = best total SSIM")
    g.add_argument("--top", default=None, type=int,
                   help="score only the N first-ranked reconstructions (snapshot's 'ranking')")
    # Accepted so the paper's command lines work.
    g.add_argument("--resolution", default=None, type=int, help="ignored: shape comes from the data")
    return parser


def add_runtime_args(parser):
    g = parser.add_argument_group("runtime")
    g.add_argument("--seed", default=0, type=int)
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    return g


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA but none is available; use --device cpu")
    return torch.device(name)


def set_seed(seed):
    """Seed python, numpy and torch (never the clock)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def add_reconstruction_args(p):
    """recons.py's own flags (beyond the shared groups): the method, the recipe, the reverse pass, stops."""
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
    g.add_argument("--schedule", default="paper", choices=["paper", "cosine", "step"],
                   help="Adam lr schedule: paper = CosineAnnealingLR(T_max=100) stepped every iteration"
                        " (periodic); cosine = one decay to 0 over all iterations; step = x0.1 at 3/8, 5/8"
                        " and 7/8 of the run (Geiping et al.'s)")
    g.add_argument("--warmup", default=0, type=int,
                   help="iterations of linear lr warm-up before the schedule (0 = none, the paper's)")
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
    g.add_argument("--auto_criterion", default="loss", choices=["loss", "norm"],
                   help="loss (paper preset): the paper's, the lowest loss after a 50-step run per candidate; norm"
                        " (fast, resnet presets): a --norm_iterations reconstruction, then the lr whose simulated change"
                        " has the true change's norm (README, 'Unknown lr, batch size and N'; needs the true N)")
    g.add_argument("--norm_iterations", default=NORM_MATCH_ITERATIONS, type=int,
                   help="--auto_criterion norm: iterations of the reconstruction before the norm match (the"
                        " dummies' gradients approach the images' as they converge)")
    g.add_argument("--rlr_candidates", default=None, type=float, nargs="+",
                   help="simulation lrs to try; default the paper's 0.020 down to 0.001 in steps of 0.001")
    g.add_argument("--rbs_candidates", default=None, type=int, nargs="+",
                   help="simulation batch sizes to try; default the training's --bs, its half and its double")
    g = p.add_argument_group("baselines (--method one_step / two_step)")
    g.add_argument("--baseline_steps", default=BASELINE_STEPS, type=int,
                   help="optimisation steps (paper code: 100,000)")
    g = p.add_argument_group("image priors and outer-optimiser options (all off in the paper's recipe)")
    g.add_argument("--bn_prior", default=0.0, type=float,
                   help="weight of the BatchNorm-statistics prior (DeepInversion's): sum over BN layers of"
                        " ||batch mean - running mean|| + ||batch var - running var|| of the dummies at theta0,"
                        " theta0's running statistics being real-image statistics")
    g.add_argument("--bn_prior_until", default=1.0, type=float,
                   help="share of the iterations with the BN prior on (then off, so the true images are the"
                        " optimum again)")
    g.add_argument("--bn_prior_floor", default=0.0, type=float, metavar="L",
                   help="the BN prior pulls only while above L (summed over the batches of --rbs): the level a"
                        " batch of real images has, so the dummies are not pulled past it (benchmarks/objective.py"
                        " --bn_prior --pool prints it for images never trained on; 0: always pulls)")
    g.add_argument("--box", action="store_true",
                   help="keep every pixel inside the range that [0, 1] images take after normalisation")
    g.add_argument("--signed_grad", action="store_true",
                   help="Adam on the sign of the dummies' gradient (Geiping et al.)")
    g.add_argument("--smooth_sigma", default=0.0, type=float, metavar="S",
                   help="Gaussian smoothing of the objective: each iteration's loss and gradient are taken at the"
                        " dummies plus fresh noise of std S (normalised pixel units), S falling linearly to 0 over"
                        " the first --smooth_until of the run, so a rugged objective's narrow minima are blurred"
                        " early and the true one is exact late; SimuDy's main run only (0: off)")
    g.add_argument("--smooth_until", default=0.5, type=float,
                   help="share of the iterations over which --smooth_sigma falls to 0")
    g.add_argument("--restarts", default=1, type=int,
                   help="K > 1: the main run (its recipe, schedule and priors) from K starts (seeds seed..seed+K-1)"
                        " for --restart_iterations each; it goes on from the one with the lowest loss then"
                        " (costs (K - 1) x those iterations; --max_minutes counts them)")
    g.add_argument("--restart_iterations", default=50, type=int,
                   help="iterations of the main run each start gets before the lowest loss is kept")
    g.add_argument("--init_snapshot", default=None, metavar="FILE",
                   help="start the dummies and their labels from a snapshot <epoch>_<step>.pth of an earlier run"
                        " on the same training (a second cycle of a recipe: fresh Adam, schedule and warm start)")
    g.add_argument("--coarse", default=0, type=int, metavar="R",
                   help="coarse to fine: for the first --coarse_iters iterations Adam moves R x R images and the"
                        " dummies are them upsampled (bilinear), then the full-size dummies (0: off)")
    g.add_argument("--coarse_iters", default=300, type=int, help="iterations of the coarse stage (--coarse)")
    g.add_argument("--pyramid", default=0, type=int, metavar="L",
                   help="L >= 2: the dummies are a sum of L images at full, half, quarter ... size, upsampled, and"
                        " Adam moves every level throughout (a Laplacian pyramid; 0: off); SimuDy's main run only (the"
                        " baselines and the short runs of --grid_search, --rlr auto and --restarts move the images)")
    g.add_argument("--decorrelate_colours", action=argparse.BooleanOptionalAction, default=False,
                   help="Adam moves the dummies' decorrelated colour coordinates (luminance and two chroma"
                        " directions, feature visualisation's) instead of RGB, so chroma moves 3-13x less far per"
                        " step; 3-channel images, with or without --pyramid, SimuDy's main run only (on in"
                        " --preset resnet for colour images: --no-decorrelate_colours turns it off)")
    g.add_argument("--chroma_tv", default=0.0, type=float, metavar="W",
                   help="W x the TV of the dummies' two chroma coordinates (--decorrelate_colours' directions)"
                        " added to the loss, a prior against colour noise (0: off; --preset resnet: 0.02 on colour"
                        " images); 3-channel images, SimuDy")
    return p


def loss_type_name(value):
    """The paper's --loss_type 0/1 and names cos/l2."""
    names = {"0": "cos", "1": "l2", "cos": "cos", "l2": "l2"}
    if value not in names:
        raise argparse.ArgumentTypeError("choose cos (0) or l2 (1)")
    return names[value]
