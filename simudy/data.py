"""Datasets: one loader per dataset name (DATASETS), the paper's training subset (the first k images of
each class) and the per-dataset normalisation. Each loader returns (images, targets, classes): images is a
uint8 array N×H×W×C or a callable index -> PIL/uint8 image (for large folders), targets a list of ints.
"""
import gzip
import os
import pickle

import numpy as np
import torch

from .errors import UserError


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


def pretraining_indices(targets, num_classes, record):
    """The dataset indices train.py's pretraining of theta0 used, from its record (config.json's
    "theta0_data"): the first `images_per_class` of each class outside the subset it excluded."""
    return first_k_per_class(targets, record["images_per_class"], num_classes, 0, exclude=record["excluded"],
                             strict=False)


def images_never_trained_on(train_config, data_root, per_class):
    """(images, labels, note): `per_class` images of each class of the training's dataset that neither its
    fine-tuning nor theta0's pretraining by train.py used, normalised as the training's. The pretraining's
    images come from its record (config.json's "theta0_data"); a run folder from before that record reads
    them off the cache's name (the first --pretrain_imgs per class outside this subset). note says when
    theta0 came from a file whose data no one recorded (--pretrained, the paper's file)."""
    args, data = train_config["args"], train_config["data"]
    images, targets, _ = load_dataset(args["dataset"], data_root)
    num_classes = data["num_classes"]
    used = first_k_per_class(targets, args["num_imgs_per_class"], num_classes, args.get("offset", 0))
    theta0 = str(train_config.get("theta0", ""))
    record = train_config.get("theta0_data")
    if record:  # train.py pretrained theta0 and wrote down on which images
        used += pretraining_indices(targets, num_classes, record)
    elif not theta0.startswith("random"):  # skip what train.py's pretraining would take, to be safe
        used += first_k_per_class(targets, args.get("pretrain_imgs", 0), num_classes, 0, exclude=used, strict=False)
    # a run folder from before the record: train.py's cache name says it pretrained theta0 itself
    legacy_cache = ("theta0_data" not in train_config
                    and f"_pimgs{args.get('pretrain_imgs')}_" in os.path.basename(theta0))
    pool = first_k_per_class(targets, per_class, num_classes, 0, exclude=used, strict=False)
    if not pool:
        raise UserError(f"{args['dataset']} has no image outside the training and pretraining; lower --null_pool")
    note = (None if theta0.startswith("random") or record or legacy_cache else
            f"theta0 came from {theta0}, whose data is not recorded: the pool may hold images it saw")
    mean, std = data["mean"], data["std"]
    return to_normalised_tensor(images, pool, mean, std), torch.tensor([targets[i] for i in pool]), note


def denormalise(x, mean, std):
    """Normalised N×C×H×W -> pixel space [0, 1] (clamped)."""
    mean = torch.as_tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x * std + mean).clamp(0, 1)
