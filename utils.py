"""Shared pieces of the four stages: argparse groups, datasets, run folders, seeding, errors.

Every stage writes a run folder with a config.json; the next stage finds it from the paper's flags
(model, dataset, number of images, batch size, lr), so a user types the hyper-parameters once.
"""
import argparse
import csv
import gzip
import json
import os
import pickle
import platform
import random
import sys

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------
# Errors: bad input ends a script with one line that names the fix, never a traceback.


class UserError(Exception):
    """A problem with the user's input; its message is one line that names the fix."""


def run_main(main, parse_args):
    """`parse_args() -> main(args)`, turning a UserError into a one-line message and exit code 2."""
    try:
        return main(parse_args())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------
# Argparse groups shared by the stages (defined once; the paper repo's six copies drifted).

PAPER_NUM_CLASSES = 10


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
    g.add_argument("--model_name", default="resnet",
                   help="resnet (= resnet18), resnet18, resnet34, resnet50 or mlp")
    g.add_argument("--width", default=None, type=int,
                   help="ResNet base channels (64 = paper) or MLP hidden units (1000 = paper)")
    return g


def add_training_hparam_args(parser, lr_flag):
    """The training run's batch size and lr; train.py names the lr --lr, the later stages --tlr."""
    g = parser.add_argument_group("training hyper-parameters")
    g.add_argument(lr_flag, default=1e-2, type=float, dest="tlr" if lr_flag == "--tlr" else "lr",
                   help="learning rate of the real training (train.py)")
    g.add_argument("--bs", default=20, type=int, help="batch size of the real training")
    return g


# The paper's Adam lr on the dummies: recons.py's 1e-2; recons_1step.py and recons_2step.py's 3e-4.
DEFAULT_REC_LR = {"simudy": 1e-2, "one_step": 3e-4, "two_step": 3e-4}
AUTO = "auto"  # --rlr/--rbs auto: recons.py picks the value by short runs


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
    "fast": {"schedule": "cosine", "rec_epochs": 4, "rec_steps_per_epoch": 200, "clip_epochs": 1,
             "tv_weight": 2e-3, "steps": 0, "snapshot": "last"},
}


# A preset's default that an explicit choice of another flag overrides: the fast preset scores the last
# snapshot, unless the user names one with the paper's --eval_epoch/--eval_step (argparse dests).
PRESET_YIELDS_TO = {"snapshot": ("eval_epoch", "eval_step")}
_NOT_GIVEN = object()


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
    given = {d for d in watched if marked[d] is not _NOT_GIVEN}
    parser.set_defaults(**{k: v for k, v in PRESETS[known["preset"]].items()
                           if k in known and not given & set(PRESET_YIELDS_TO.get(k, ()))})
    return parser.parse_args(argv)


def add_recons_id_args(parser):
    """Flags that name a reconstruction run (recons.py writes it, metrics/draw_pics read it)."""
    g = parser.add_argument_group("reconstruction run")
    g.add_argument("--preset", default="paper", choices=list(PRESETS),
                   help="recipe for the dummies' optimisation: paper (the paper code's) or fast (fewer"
                        " iterations, one cosine decay, the training's epochs simulated; see README); a"
                        " non-paper preset adds _<preset> to the folder name")
    g.add_argument("--steps", default=8, type=int,
                   help="simulated epochs (paper code default 8); 0 = the training's epochs, as the paper's"
                        " text (the fast preset's choice)")
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
    g.add_argument("--snapshot", default=None, help="explicit snapshot file; overrides the two above")
    return g


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


# ----------------------------------------------------------------------------------------------
# Run folders and their names. Floats print as Python prints them (1e-2 -> 0.01), as the paper's.

CKPT_ROOT = "./ckpts"


def model_tag(model_name, width):
    from models import default_width
    return model_name if width in (None, default_width(model_name)) else f"{model_name}_w{width}"


def train_run_name(model_name, width, dataset, num_imgs, bs, lr):
    return f"{model_tag(model_name, width)}_{dataset}_num_img{num_imgs}_bsz{bs}_lr{lr}"


def train_dir_from_args(args, lr):
    if getattr(args, "train_dir", None):
        return args.train_dir
    num_imgs = args.num_imgs_per_class * num_classes_of(args.dataset, getattr(args, "data_root", None))
    name = train_run_name(args.model_name, args.width, args.dataset, num_imgs, args.bs, lr)
    return os.path.join(CKPT_ROOT, "model_ckpt", name)


def resolve_simulation_hparams(args):
    """rlr/rbs of 0 mean 'the training's' (paper code); 'auto' is recons.py's to resolve."""
    for flag in ("rlr", "rbs"):
        if getattr(args, flag) == AUTO:
            raise UserError(f"--{flag} auto names no run folder; pass the value recons.py chose"
                            f" (printed, and in the run's auto_search.csv)")
    return (args.rlr or args.tlr), (args.rbs or args.bs)


def resolve_steps(args):
    """--steps, where 0 means the training run's epochs: the paper's text simulates the true number of
    epochs, its code 8 of 20, and with 8 the true images are not the loss's optimum (see benchmarks/README)."""
    if args.steps:
        return args.steps
    path = os.path.join(train_dir_from_args(args, args.tlr), "config.json")
    if not os.path.isfile(path):
        raise UserError(f"--steps 0 (the fast preset's) reads the training's epochs from {path}, which is"
                        f" missing; run train.py with these flags first or pass --steps N")
    return read_json(path)["args"]["epochs"]


def resolve_rec_lr(args, method):
    """--rec_lr, or the paper's default for the method."""
    return DEFAULT_REC_LR[method] if args.rec_lr is None else args.rec_lr


def recons_dir_from_args(args, method="simudy"):
    """The reconstruction run folder named by the paper's flags (or --recons_dir)."""
    if getattr(args, "recons_dir", None):
        return args.recons_dir
    train_name = os.path.basename(os.path.normpath(train_dir_from_args(args, args.tlr)))
    rec_lr = resolve_rec_lr(args, method)
    if method == "simudy":
        rlr, rbs = resolve_simulation_hparams(args)
        name = f"{train_name}_nsteps{resolve_steps(args)}_rbs{rbs}_rlr{rlr}_reclr{rec_lr}"
    else:
        name = f"{train_name}_{method}_reclr{rec_lr}"
    if getattr(args, "preset", "paper") != "paper" and method == "simudy":
        name += f"_{args.preset}"
    if getattr(args, "num_dummy", None):
        name += f"_ndummy{args.num_dummy}"
    if getattr(args, "grid_search", 0):
        name += "_grid"
    return os.path.join(CKPT_ROOT, "recover_x", name)


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


# ----------------------------------------------------------------------------------------------
# Datasets. Each loader returns (images, targets, classes): images is a uint8 array N×H×W×C or a
# callable index -> PIL/uint8 image (for large folders), targets a list of ints.

# Per-dataset normalisation (CIFAR-10's is the paper code's).
NORMALISATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    # `folder` defaults to CIFAR-10's statistics (the shared cifar10-jpg folder); see --folder_norm.
    "folder": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "tiny": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
}
# The paper's 10 Tiny-ImageNet classes (indices into the sorted wnids of tiny-imagenet-200/train).
TINY_CLASS_IDS = [23, 45, 65, 34, 25, 12, 67, 187, 135, 5]
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
OFFLINE_DATASETS = "cifar10 (cifar-10-batches-py), fashion_mnist (Debian package dataset-fashion-mnist), folder"


def num_classes_of(dataset, data_root=None):
    """Number of classes; for `folder`, the class folders under <data_root>/train."""
    if dataset == "folder" and data_root and os.path.isdir(os.path.join(data_root, "train")):
        return sum(e.is_dir() for e in os.scandir(os.path.join(data_root, "train")))
    return {"cifar100": 100}.get(dataset, 10)


def _offline_error(dataset, data_root, where, err):
    return UserError(
        f"dataset {dataset} not found under {data_root} ({where}) and it could not be downloaded"
        f" ({type(err).__name__}); put the files there or use --data_root; offline you can use:"
        f" {OFFLINE_DATASETS}")


def _load_cifar10(data_root):
    # Read the standard python pickles directly: torchvision's md5 check would reject test fixtures.
    folder = os.path.join(data_root, "cifar-10-batches-py")
    if not os.path.isdir(folder):
        try:
            import torchvision
            torchvision.datasets.CIFAR10(data_root, train=True, download=True)
        except Exception as err:  # offline: a one-line error, not a urllib traceback
            raise _offline_error("cifar10", data_root, "cifar-10-batches-py/", err) from None
    images, targets = [], []
    for i in range(1, 6):
        path = os.path.join(folder, f"data_batch_{i}")
        if not os.path.isfile(path):
            raise UserError(f"{path} missing; the cifar-10-batches-py folder is incomplete")
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        targets.extend(int(t) for t in batch["labels"])
    classes = [str(i) for i in range(10)]
    meta = os.path.join(folder, "batches.meta")
    if os.path.isfile(meta):
        with open(meta, "rb") as f:
            classes = pickle.load(f, encoding="latin1")["label_names"]
    return np.concatenate(images).transpose(0, 2, 3, 1), targets, classes


def _read_idx_gz(path):
    """An MNIST-style idx file (gzipped or not) as a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(folder, stem):
    for name in (stem + ".gz", stem):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def _load_fashion_mnist(data_root):
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    candidates = [data_root, os.path.join(data_root, "fashion-mnist"),
                  os.path.join(data_root, "FashionMNIST", "raw"), FASHION_MNIST_SYSTEM_DIR]
    for folder in candidates:
        paths = [_find_idx(folder, s) for s in stems]
        if all(paths):
            break
    else:
        try:
            import torchvision
            torchvision.datasets.FashionMNIST(data_root, train=True, download=True)
        except Exception as err:
            raise UserError(
                f"Fashion-MNIST not found under {data_root} nor {FASHION_MNIST_SYSTEM_DIR} and it could"
                f" not be downloaded ({type(err).__name__}); install it with"
                f" 'apt-get install dataset-fashion-mnist'") from None
        folder = os.path.join(data_root, "FashionMNIST", "raw")
        paths = [_find_idx(folder, s) for s in stems]
    images, labels = _read_idx_gz(paths[0]), _read_idx_gz(paths[1])
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    return images[..., None], [int(t) for t in labels], classes


def _load_image_folder(root, what, class_ids=None):
    import torchvision
    if not os.path.isdir(root):
        raise UserError(f"{what}: folder {root} not found; give --data_root the folder that holds"
                        f" train/<class>/<images>")
    try:
        ds = torchvision.datasets.ImageFolder(root)
    except (FileNotFoundError, OSError) as err:
        raise UserError(f"{what}: {root} holds no class folders with images ({err}); give --data_root"
                        f" the folder that holds train/<class>/<images>") from None
    targets, samples = ds.targets, ds.samples
    classes = ds.classes
    if class_ids is not None:  # keep only the chosen classes, relabelled 0..len-1 (paper's tiny setup)
        if max(class_ids) >= len(ds.classes):
            raise UserError(f"{what}: {root} has {len(ds.classes)} classes but the paper's Tiny-ImageNet"
                            f" classes need 200; point --data_root at the full tiny-imagenet-200")
        keep = {c: i for i, c in enumerate(class_ids)}
        samples = [(p, keep[t]) for p, t in samples if t in keep]
        targets = [t for _, t in samples]
        classes = [ds.classes[c] for c in class_ids]

    def image_at(i):
        return np.asarray(ds.loader(samples[i][0]))  # torchvision's loader: RGB
    return image_at, targets, classes


def _load_torchvision(dataset, data_root):
    import torchvision
    cls = {"mnist": torchvision.datasets.MNIST, "cifar100": torchvision.datasets.CIFAR100,
           "svhn": torchvision.datasets.SVHN}[dataset]
    try:
        ds = cls(data_root, split="train", download=True) if dataset == "svhn" else \
            cls(data_root, train=True, download=True)
    except Exception as err:
        raise _offline_error(dataset, data_root, "torchvision layout", err) from None
    targets = [int(t) for t in (ds.labels if dataset == "svhn" else ds.targets)]
    classes = getattr(ds, "classes", [str(i) for i in range(10)])

    def image_at(i):
        return np.asarray(ds[i][0])
    return image_at, targets, classes


def _load_tiny(data_root):
    root = os.path.join(data_root, "tiny-imagenet-200", "train")
    if not os.path.isdir(root):
        root = os.path.join(data_root, "train")
    return _load_image_folder(root, "tiny", TINY_CLASS_IDS)


DATASETS = {
    "cifar10": _load_cifar10,
    "fashion_mnist": _load_fashion_mnist,
    "folder": lambda root: _load_image_folder(os.path.join(root, "train"), "folder"),
    "tiny": _load_tiny,
    "mnist": lambda root: _load_torchvision("mnist", root),
    "cifar100": lambda root: _load_torchvision("cifar100", root),
    "svhn": lambda root: _load_torchvision("svhn", root),
}


def load_dataset(dataset, data_root):
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(sorted(DATASETS))}")
    return DATASETS[dataset](data_root)


def first_k_per_class(targets, k, num_classes, offset=0, exclude=(), strict=True):
    """Indices of the first k images of each class in dataset order from `offset` (paper code).
    strict=False takes what there is when a class has fewer (pretraining)."""
    count = np.zeros(num_classes, dtype=int)
    excluded = set(int(i) for i in exclude)
    chosen = []
    for idx in range(offset, len(targets)):
        t = targets[idx]
        if idx not in excluded and 0 <= t < num_classes and count[t] < k:
            chosen.append(idx)
            count[t] += 1
            if len(chosen) == k * num_classes:
                break
    if len(chosen) < k * num_classes and strict:
        raise UserError(f"the dataset has fewer than {k} images for some class after offset {offset};"
                        f" lower --num_imgs_per_class or --offset")
    return chosen


def to_normalised_tensor(images, indices, mean, std):
    """uint8 H×W×C images (array or index->image callable) -> normalised float N×C×H×W."""
    arrays = [images(i) if callable(images) else images[i] for i in indices]
    if len({a.shape for a in arrays}) > 1:
        raise UserError(f"the selected images have different sizes {sorted({a.shape for a in arrays})};"
                        f" resize the dataset to one size first")
    arr = np.stack(arrays)
    if arr.ndim == 3:
        arr = arr[..., None]
    x = torch.from_numpy(arr.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def load_subset(dataset, data_root, num_imgs_per_class, offset=0, exclude=(), strict=True):
    """The paper's training subset: first k images per class. Returns a dict saved by train.py."""
    images, targets, classes = load_dataset(dataset, data_root)
    num_classes = len(classes) if dataset in ("folder", "tiny") else num_classes_of(dataset)
    indices = first_k_per_class(targets, num_imgs_per_class, num_classes, offset, exclude, strict)
    mean, std = NORMALISATION[dataset]
    x = to_normalised_tensor(images, indices, mean, std)
    if x.shape[1] != len(mean):
        raise UserError(f"{dataset} images have {x.shape[1]} channels but its normalisation has"
                        f" {len(mean)}; convert the images or pick the right --dataset")
    return {"images": x, "labels": torch.tensor([targets[i] for i in indices], dtype=torch.long),
            "indices": torch.tensor(indices, dtype=torch.long), "mean": torch.tensor(mean),
            "std": torch.tensor(std), "classes": list(classes), "dataset": dataset,
            "num_classes": num_classes}


def denormalise(x, mean, std):
    """Normalised N×C×H×W -> pixel space [0, 1] (clamped)."""
    mean = torch.as_tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x * std + mean).clamp(0, 1)


# ----------------------------------------------------------------------------------------------
# grid_search.sh's summary: reads each short run's grid_result.json (never log text).


def print_candidates(rows):
    """Sort the short runs' rows (rlr, rbs, final_loss[, avg_ssim]) by final loss, diverged last; print them
    as a table and return the sorted rows (the first is the paper's choice)."""
    rows = sorted(rows, key=lambda r: (not np.isfinite(r["final_loss"]), r["final_loss"]))
    with_ssim = any(r.get("avg_ssim") is not None for r in rows)
    print(f"\n{'rlr':>8} {'rbs':>5} {'final loss':>12}" + (f" {'avg SSIM':>9}" if with_ssim else ""))
    for r in rows:
        print(f"{r['rlr']:>8g} {r['rbs']:>5d} {r['final_loss']:>12.6f}"
              + (f" {r['avg_ssim']:>9.4f}" if with_ssim else ""))
    return rows


def summarise_grid_search(grid_dir, run_dirs):
    """Print the candidates sorted by final loss, write grid_search.csv/json, return the best row."""
    rows = []
    for d in run_dirs:
        result = read_json(os.path.join(d, "grid_result.json"), what="grid-search (recons.py --grid_search 1)")
        rows.append({"rlr": result["rlr"], "rbs": result["rbs"], "final_loss": result["final_loss"], "dir": d})
    rows = print_candidates(rows)
    best = rows[0]
    print(f"\nsuggested: --rlr {best['rlr']:g} --rbs {best['rbs']}  (lowest loss after the short runs)")
    os.makedirs(grid_dir, exist_ok=True)
    write_csv(os.path.join(grid_dir, "grid_search.csv"), rows, ["rlr", "rbs", "final_loss", "dir"])
    write_json(os.path.join(grid_dir, "grid_search.json"), {"best": best, "candidates": rows})
    return best


def run_recons(argv):
    """One recons.py run in this process (a submitit job's function). Returns its run folder."""
    import recons  # the job's own import: utils must not import the stages at module level
    return recons.main(recons.parse_args(argv))


def submit_grid_search(argvs, folder, cluster=None, timeout_min=60, partition=None, gpus_per_job=0):
    """grid_search.sh's cluster path (LAUNCHER=submitit): one recons.py run per argv as a submitit job
    array (SLURM when available, cluster="local" runs them as local processes), then wait for all.
    Returns the argvs whose jobs failed; each failure is printed."""
    try:
        import submitit
    except ImportError:
        raise UserError("LAUNCHER=submitit needs submitit; pip install submitit, or drop LAUNCHER") from None
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster or None)
    params = {"timeout_min": timeout_min}
    if executor.cluster == "slurm":
        params.update({"slurm_partition": partition} if partition else {})
        params.update({"gpus_per_node": gpus_per_job} if gpus_per_job else {})
    executor.update_parameters(**params)
    jobs = executor.map_array(run_recons, argvs)
    print(f"submitted {len(jobs)} {executor.cluster} jobs; logs in {folder}")
    failed = []
    for job, argv in zip(jobs, argvs):
        try:
            job.result()
        except Exception as err:  # a job's failure is reported, the others still count
            failed.append(argv)
            last = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            print(f"grid_search.sh: job {job.job_id} ({' '.join(argv[-8:])}) failed: {last}", file=sys.stderr)
    return failed
