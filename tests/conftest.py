"""Shared test fixtures: small FAKE datasets written in the real on-disk formats.

Tests never read real data and never touch the network. The `make_*` helpers are plain functions
(import them with `from tests.conftest import make_cifar10_root`) that write a dataset under `root`
and return a `FakeDataset` record holding exactly what was written, so a test can compare a loader's
output with the truth. The pytest fixtures wrap them (session-scoped, written once per run):

    cifar10_fake / cifar10_root    cifar-10-batches-py/ pickles        (root = --data_root)
    fashion_fake / fashion_root    Fashion-MNIST idx files, gzipped    (root = --data_root)
    folder_fake  / folder_root     root/train/<class>/<0000>.png       (root = --data_root, --dataset folder)
    in_tmp_cwd                     chdir to a fresh tmp dir (the stages write ./ckpts)
    cifar_cwd                      in_tmp_cwd with ./data the fake CIFAR-10 (the paper's default --data_root)
    mlp_run                        in_tmp_cwd with a tiny MLP trained by train.py on fake Fashion-MNIST
    offline                        torchvision downloads raise URLError, sockets refuse to connect
    no_system_fashion              the system Fashion-MNIST folder points at an empty dir
    empty_torch_home               TORCH_HOME is an empty dir (no LPIPS weights, nothing downloaded)

Plain helpers shared by the test files (run a stage, the one-line error check, fake run folders) are in
tests/helpers.py.
"""
import gzip
import os
import pathlib
import pickle
import socket
import struct
import sys
import urllib.error
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pytest

# The repo root on sys.path, so `import utils`, `import train`, `import models` work from tests
# whatever the invocation directory (`python -m pytest tests` from /work/main also adds the cwd).
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# One CPU thread per test process and, through the environment, per script a test starts (unless
# OMP_NUM_THREADS is set): the tensors are tiny, so threads gain nothing, and on a shared machine OpenMP
# threads waiting for each other are ruinous (test_pipeline.py: 261 s with 2 threads beside two busy
# processes on 2 cores, 23 s with 1).
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402  (after OMP_NUM_THREADS, which it reads when loaded)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]


@dataclass
class FakeDataset:
    """What a make_* helper wrote. `root` is what to pass as data_root / --data_root."""
    root: pathlib.Path
    images: np.ndarray          # uint8 N×H×W×C (N×H×W for idx files), training images in file order
    labels: list                # ints, same order
    classes: list               # class names, index = label
    test_images: np.ndarray = None
    test_labels: list = None
    files: dict = field(default_factory=dict)  # short name -> path of each file written

    def __fspath__(self):
        return str(self.root)


# ----------------------------------------------------------------------------------------------
# Image and label generators


def smooth_images(rng, n, size, channels, grid=4):
    """n structured uint8 images n×size×size×channels: a random grid×grid pattern upsampled
    bilinearly (smooth blobs and gradients, not pixel noise), each stretched to the full 0..255."""
    g = rng.uniform(0.0, 1.0, size=(n, grid, grid, channels))
    pos = np.linspace(0, grid - 1, size)
    i0 = np.clip(np.floor(pos).astype(int), 0, grid - 2)
    frac = pos - i0
    w = np.zeros((size, grid))
    w[np.arange(size), i0] = 1.0 - frac
    w[np.arange(size), i0 + 1] += frac
    img = np.einsum("hi,nijc,wj->nhwc", w, g, w)
    lo = img.min(axis=(1, 2, 3), keepdims=True)
    hi = img.max(axis=(1, 2, 3), keepdims=True)
    img = (img - lo) / np.maximum(hi - lo, 1e-8)
    return np.round(img * 255.0).astype(np.uint8)


def cycling_labels(rng, n, num_classes):
    """Labels in blocks of num_classes, each block a random permutation of all classes: every class
    has at least n // num_classes images, yet the order is not trivially 0,1,2,..."""
    blocks = [rng.permutation(num_classes) for _ in range(-(-n // num_classes))]
    return [int(t) for t in np.concatenate(blocks)[:n]] if blocks else []


# ----------------------------------------------------------------------------------------------
# CIFAR-10 python pickles


def _cifar_rows(images):
    """N×32×32×3 uint8 -> N×3072 in CIFAR's layout: the R plane, then G, then B, each row-major."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))


def _write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_cifar10_root(root, n_per_batch=60, seed=0):
    """Write root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}.

    Images are smooth random patterns; labels cycle (blocks of 10 in random order across the five
    batches), so with the defaults every class has 30 training images.
    """
    root = pathlib.Path(root)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = 5 * n_per_batch
    images = smooth_images(rng, n, 32, 3)
    labels = cycling_labels(rng, n, 10)
    files = {}
    for b in range(5):
        sl = slice(b * n_per_batch, (b + 1) * n_per_batch)
        path = folder / f"data_batch_{b + 1}"
        _write_pickle(path, {
            "batch_label": f"training batch {b + 1} of 5",
            "labels": labels[sl],
            "data": _cifar_rows(images[sl]),
            "filenames": [f"fake_{i:05d}.png" for i in range(sl.start, sl.stop)],
        })
        files[path.name] = path
    test_images = smooth_images(rng, n_per_batch, 32, 3)
    test_labels = cycling_labels(rng, n_per_batch, 10)
    path = folder / "test_batch"
    _write_pickle(path, {"batch_label": "testing batch 1 of 1", "labels": test_labels,
                         "data": _cifar_rows(test_images),
                         "filenames": [f"fake_test_{i:05d}.png" for i in range(n_per_batch)]})
    files[path.name] = path
    path = folder / "batches.meta"
    _write_pickle(path, {"label_names": list(CIFAR10_CLASSES), "num_cases_per_batch": n_per_batch,
                         "num_vis": 3072})
    files[path.name] = path
    return FakeDataset(root, images, labels, list(CIFAR10_CLASSES), test_images, test_labels, files)


# ----------------------------------------------------------------------------------------------
# MNIST-style idx files (Fashion-MNIST layout)

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def idx_bytes(array):
    """The idx binary format of a uint8 array: magic 0x00 0x00 0x08 <ndim>, big-endian int32 dims."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.tobytes()


def _write_idx(path, array, gz):
    data = idx_bytes(array)
    if gz:
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.write(data)
    else:
        pathlib.Path(path).write_bytes(data)


def make_idx_root(root, n=200, gz=True, seed=1):
    """Write Fashion-MNIST's four idx files directly in root (the Debian package's layout):
    train-images-idx3-ubyte[.gz] (magic 0x00000803, n×28×28), train-labels-idx1-ubyte[.gz]
    (magic 0x00000801, n) and the t10k pair (max(n // 4, 10) images)."""
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = smooth_images(rng, n, 28, 1)[..., 0]
    labels = cycling_labels(rng, n, 10)
    n_test = max(n // 4, 10)
    test_images = smooth_images(rng, n_test, 28, 1)[..., 0]
    test_labels = cycling_labels(rng, n_test, 10)
    suffix = ".gz" if gz else ""
    files = {}
    for stem, arr in (("train-images-idx3-ubyte", images),
                      ("train-labels-idx1-ubyte", np.asarray(labels, dtype=np.uint8)),
                      ("t10k-images-idx3-ubyte", test_images),
                      ("t10k-labels-idx1-ubyte", np.asarray(test_labels, dtype=np.uint8))):
        path = root / (stem + suffix)
        _write_idx(path, arr, gz)
        files[stem] = path
    return FakeDataset(root, images, labels, list(FASHION_CLASSES), test_images, test_labels, files)


# ----------------------------------------------------------------------------------------------
# ImageFolder tree


def make_image_folder(root, n_per_class=5, size=32, classes=10, seed=2):
    """Write root/train/<class_name>/<0000>.png RGB images (lossless, so they read back exactly).

    `classes` is a count or a list of names; with 10 the CIFAR-10 names are used (already sorted,
    so the ImageFolder label of a class is its position). The record's images/labels are in
    torchvision ImageFolder order: classes sorted by name, files sorted within a class."""
    from PIL import Image
    root = pathlib.Path(root)
    if isinstance(classes, int):
        classes = list(CIFAR10_CLASSES) if classes == 10 else [f"class_{i:03d}" for i in range(classes)]
    names = sorted(classes)
    rng = np.random.default_rng(seed)
    images = smooth_images(rng, n_per_class * len(names), size, 3)
    labels, files = [], {}
    for c, name in enumerate(names):
        d = root / "train" / name
        d.mkdir(parents=True, exist_ok=True)
        for j in range(n_per_class):
            path = d / f"{j:04d}.png"
            Image.fromarray(images[c * n_per_class + j], mode="RGB").save(path)
            files[f"{name}/{j:04d}"] = path
            labels.append(c)
    return FakeDataset(root, images, labels, names, files=files)


# ----------------------------------------------------------------------------------------------
# pytest fixtures


def dataset_fixtures(name, make, doc):
    """The session fixtures <name>_fake (the FakeDataset make() writes, once per run) and <name>_root (its
    root, a pathlib.Path to pass as data_root / --data_root; `doc` says what it holds)."""
    @pytest.fixture(scope="session", name=f"{name}_fake")
    def fake(tmp_path_factory):
        return make(tmp_path_factory.mktemp(name))

    @pytest.fixture(scope="session", name=f"{name}_root")
    def root(request):
        return request.getfixturevalue(f"{name}_fake").root
    root.__doc__ = doc
    return fake, root


cifar10_fake, cifar10_root = dataset_fixtures("cifar10", make_cifar10_root,
                                              "A data_root holding a fake cifar-10-batches-py/.")
fashion_fake, fashion_root = dataset_fixtures("fashion", make_idx_root,
                                              "A data_root holding fake gzipped Fashion-MNIST idx files.")
folder_fake, folder_root = dataset_fixtures("folder", make_image_folder,
                                            "A data_root holding train/<class>/<0000>.png, for --dataset folder.")


@pytest.fixture(scope="session")
def device():
    """The device the fidelity and reverse-pass tests run on: $SIMUDY_TEST_DEVICE (e.g. cuda), else the CPU,
    so the same tests run on CPU in CI and on a GPU where one is lent. TF32 is switched off on CUDA: the
    tests compare to 1e-5."""
    name = os.environ.get("SIMUDY_TEST_DEVICE", "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            pytest.fail(f"SIMUDY_TEST_DEVICE={name} but CUDA is not available")
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return torch.device(name)


@pytest.fixture
def in_tmp_cwd(tmp_path, monkeypatch):
    """Run the test inside a fresh tmp dir (the stages write ./ckpts relative to the cwd)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def cifar_cwd(cifar10_root, in_tmp_cwd):
    """A working directory whose ./data is the fake CIFAR-10 (the paper's default --data_root)."""
    (in_tmp_cwd / "data").symlink_to(cifar10_root)
    return in_tmp_cwd


class TrainedMLP(NamedTuple):
    flags: list      # the flags naming the training run (data, model, --num_imgs_per_class, --bs); add --tlr 0.05
    train_dir: str


MLP_FLAGS = ["--dataset", "fashion_mnist", "--model_name", "mlp", "--width", 16, "--num_imgs_per_class", 1,
             "--bs", 5]


@pytest.fixture
def mlp_run(fashion_root, in_tmp_cwd):
    """A tiny MLP (width 16) trained by train.py for 1 epoch (lr 0.05, bs 5) on 10 fake Fashion-MNIST images,
    in a fresh working directory. Yields TrainedMLP(flags, train_dir)."""
    import train
    from tests.helpers import run
    flags = MLP_FLAGS[:2] + ["--data_root", fashion_root] + MLP_FLAGS[2:]
    return TrainedMLP(flags, run(train, flags + ["--lr", 0.05, "--epochs", 1]))


@pytest.fixture
def offline(monkeypatch):
    """Simulate no internet: torchvision's downloadable datasets raise URLError when constructed,
    and any socket connect raises OSError (a guard that the test never reaches the network).
    Returns the list of (dataset class name, args, kwargs) the code tried to construct."""
    import torchvision.datasets

    calls = []

    def refusing(name):
        def construct(*args, **kwargs):
            calls.append((name, args, kwargs))
            raise urllib.error.URLError(f"offline test: {name} download blocked")
        return construct

    for name in ("CIFAR10", "CIFAR100", "MNIST", "FashionMNIST", "SVHN"):
        monkeypatch.setattr(torchvision.datasets, name, refusing(name))

    def no_connect(self, *args, **kwargs):
        raise OSError("offline test: network access blocked")

    monkeypatch.setattr(socket.socket, "connect", no_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", no_connect)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: no_connect(None))
    return calls


@pytest.fixture
def empty_dir(tmp_path):
    """An existing, empty directory (a data_root with nothing in it)."""
    d = tmp_path / "empty"
    d.mkdir()
    return d


@pytest.fixture
def no_system_fashion(monkeypatch, tmp_path):
    """Point the system Fashion-MNIST dir (which exists on some machines) at an empty dir."""
    import simudy.data
    empty = tmp_path / "no-system-fashion"
    empty.mkdir()
    monkeypatch.setattr(simudy.data, "FASHION_MNIST_SYSTEM_DIR", str(empty))
    return empty


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    """Never read the user's torch cache (LPIPS weights) nor download anything."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


__all__ = ["FakeDataset", "REPO_ROOT", "CIFAR10_CLASSES", "FASHION_CLASSES", "smooth_images",
           "cycling_labels", "idx_bytes", "make_cifar10_root", "make_idx_root", "make_image_folder"]
