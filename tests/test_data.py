"""Dataset loading (simudy/data.py) on fake datasets written in the real on-disk formats (see conftest)."""
import gzip
import pickle
import shutil
import struct

import numpy as np
import pytest
import torch

import simudy.data as data
from simudy.errors import UserError
from tests.conftest import CIFAR10_CLASSES, FASHION_CLASSES, make_idx_root, make_image_folder
from tests.helpers import one_line_error

PAPER_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
PAPER_CIFAR_STD = (0.2023, 0.1994, 0.2010)


def paper_first_k(targets, k, num_classes, offset=0, exclude=()):
    """The paper code's literal loop: walk indices from offset, take one if its class is short."""
    count = [0] * num_classes
    chosen = []
    for idx in range(offset, len(targets)):
        if idx in exclude:
            continue
        label = targets[idx]
        if label < num_classes and count[label] < k:
            chosen.append(idx)
            count[label] += 1
    return chosen


# ----------------------------------------------------------------------------------------------
# The fixtures themselves write the real formats (so a layout bug cannot cancel out)


def test_cifar_fixture_layout_is_channel_major_rows(cifar10_fake):
    with open(cifar10_fake.files["data_batch_2"], "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    rows = batch["data"]
    assert rows.dtype == np.uint8 and rows.shape == (60, 3072)
    img = cifar10_fake.images[60]  # first image of batch 2
    np.testing.assert_array_equal(rows[0, :1024], img[:, :, 0].ravel())     # R plane, row-major
    np.testing.assert_array_equal(rows[0, 1024:2048], img[:, :, 1].ravel())  # G
    np.testing.assert_array_equal(rows[0, 2048:], img[:, :, 2].ravel())      # B
    assert batch["labels"] == cifar10_fake.labels[60:120]
    with open(cifar10_fake.files["batches.meta"], "rb") as f:
        assert pickle.load(f, encoding="latin1")["label_names"] == CIFAR10_CLASSES


def test_cifar_fixture_classes_balanced_and_images_structured(cifar10_fake):
    counts = np.bincount(cifar10_fake.labels, minlength=10)
    assert len(cifar10_fake.labels) == 300 and counts.min() >= 25
    x = cifar10_fake.images.astype(np.float64)
    neighbour_diff = np.abs(np.diff(x, axis=2)).mean()
    assert neighbour_diff < 10, "images should be smooth, not pixel noise"
    assert x.std(axis=(1, 2, 3)).min() > 20, "images should not be flat"
    assert not np.array_equal(cifar10_fake.images[0], cifar10_fake.images[1])


def test_idx_fixture_header(fashion_fake):
    with gzip.open(fashion_fake.files["train-images-idx3-ubyte"], "rb") as f:
        raw = f.read()
    assert raw[:4] == b"\x00\x00\x08\x03"
    assert struct.unpack(">III", raw[4:16]) == (200, 28, 28)
    assert len(raw) == 16 + 200 * 28 * 28
    with gzip.open(fashion_fake.files["train-labels-idx1-ubyte"], "rb") as f:
        raw = f.read()
    assert raw[:4] == b"\x00\x00\x08\x01" and struct.unpack(">I", raw[4:8]) == (200,)
    assert list(raw[8:]) == fashion_fake.labels


# ----------------------------------------------------------------------------------------------
# CIFAR-10 pickles


def test_cifar10_loader_returns_written_images_and_labels(cifar10_fake):
    images, targets, classes = data.load_dataset("cifar10", str(cifar10_fake.root))
    assert isinstance(images, np.ndarray) and images.dtype == np.uint8
    assert images.shape == (300, 32, 32, 3)
    np.testing.assert_array_equal(images, cifar10_fake.images)
    assert targets == cifar10_fake.labels and all(type(t) is int for t in targets)
    assert list(classes) == CIFAR10_CLASSES


def test_cifar10_incomplete_folder_is_a_user_error(cifar10_fake, tmp_path, offline):
    shutil.copytree(cifar10_fake.root / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(UserError) as excinfo:
        data.load_dataset("cifar10", str(tmp_path))
    one_line_error(excinfo, "data_batch_3")
    assert offline == []


# ----------------------------------------------------------------------------------------------
# idx files / Fashion-MNIST


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_read_idx_returns_written_arrays(tmp_path, gz):
    fake = make_idx_root(tmp_path, n=300, gz=gz, seed=5)  # 300 > 255: dims need all four bytes
    images = data._read_idx_gz(str(fake.files["train-images-idx3-ubyte"]))
    labels = data._read_idx_gz(str(fake.files["train-labels-idx1-ubyte"]))
    assert images.dtype == np.uint8 and images.shape == (300, 28, 28)
    np.testing.assert_array_equal(images, fake.images)
    assert labels.shape == (300,) and labels.tolist() == fake.labels
    test_images = data._read_idx_gz(str(fake.files["t10k-images-idx3-ubyte"]))
    np.testing.assert_array_equal(test_images, fake.test_images)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("sub", [".", "fashion-mnist", "FashionMNIST/raw"])
def test_fashion_mnist_found_via_data_root(tmp_path, gz, sub, no_system_fashion, offline):
    fake = make_idx_root(tmp_path / sub, n=120, gz=gz, seed=3)
    images, targets, classes = data.load_dataset("fashion_mnist", str(tmp_path))
    assert images.dtype == np.uint8 and images.shape == (120, 28, 28, 1)
    np.testing.assert_array_equal(images[..., 0], fake.images)
    assert targets == fake.labels and all(type(t) is int for t in targets)
    assert list(classes) == FASHION_CLASSES
    assert offline == [], "nothing should be downloaded when the files are there"


def test_fashion_mnist_found_in_system_dir(tmp_path, fashion_fake, monkeypatch, offline):
    empty = tmp_path / "data"
    empty.mkdir()
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", str(fashion_fake.root))
    images, targets, _ = data.load_dataset("fashion_mnist", str(empty))
    np.testing.assert_array_equal(images[..., 0], fashion_fake.images)
    assert targets == fashion_fake.labels
    assert offline == []


def test_fashion_mnist_data_root_wins_over_system_dir(tmp_path, fashion_fake, monkeypatch, offline):
    local = make_idx_root(tmp_path, n=50, gz=False, seed=9)
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", str(fashion_fake.root))
    images, targets, _ = data.load_dataset("fashion_mnist", str(tmp_path))
    np.testing.assert_array_equal(images[..., 0], local.images)
    assert targets == local.labels


# ----------------------------------------------------------------------------------------------
# first_k_per_class


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("offset", [0, 7, 33])
def test_first_k_per_class_matches_paper_loop(seed, k, offset):
    targets = [int(t) for t in np.random.default_rng(seed).integers(0, 10, size=200)]
    got = data.first_k_per_class(targets, k, 10, offset)
    want = paper_first_k(targets, k, 10, offset)
    assert got == want
    assert len(got) == 10 * k and all(i >= offset for i in got) and got == sorted(got)
    assert np.bincount([targets[i] for i in got], minlength=10).tolist() == [k] * 10


def test_first_k_per_class_hand_example():
    targets = [0, 1, 0, 2, 1, 0, 2, 2, 1, 0]
    assert data.first_k_per_class(targets, 1, 3) == [0, 1, 3]
    assert data.first_k_per_class(targets, 2, 3) == [0, 1, 2, 3, 4, 6]
    assert data.first_k_per_class(targets, 1, 3, offset=2) == [2, 3, 4]
    assert data.first_k_per_class(targets, 1, 3, exclude=[0, 3]) == [1, 2, 6]
    assert data.first_k_per_class(targets, 2, 3, offset=1, exclude=(2, 4)) == [1, 3, 5, 6, 8, 9]


@pytest.mark.parametrize("seed", range(3))
def test_first_k_per_class_exclude_matches_paper_loop(seed):
    rng = np.random.default_rng(100 + seed)
    targets = [int(t) for t in rng.integers(0, 10, size=200)]
    exclude = set(int(i) for i in rng.choice(200, size=40, replace=False))
    got = data.first_k_per_class(targets, 3, 10, offset=5, exclude=np.array(sorted(exclude)))
    assert got == paper_first_k(targets, 3, 10, offset=5, exclude=exclude)
    assert not set(got) & exclude
    # The excluded images are disjoint from, and the next ones after, the first subset.
    first = data.first_k_per_class(targets, 3, 10)
    second = data.first_k_per_class(targets, 3, 10, exclude=first)
    assert not set(first) & set(second)
    assert second == paper_first_k(targets, 3, 10, exclude=set(first))


def test_first_k_per_class_on_fixture_labels(cifar10_fake):
    labels = cifar10_fake.labels
    for k, offset in [(1, 0), (2, 0), (25, 0), (3, 41)]:
        assert data.first_k_per_class(labels, k, 10, offset) == paper_first_k(labels, k, 10, offset)


def test_first_k_per_class_too_large_k_or_offset_is_a_user_error(cifar10_fake):
    labels = cifar10_fake.labels  # 30 images per class
    with pytest.raises(UserError) as excinfo:
        data.first_k_per_class(labels, 31, 10)
    one_line_error(excinfo, "--num_imgs_per_class", "--offset")
    with pytest.raises(UserError):
        data.first_k_per_class(labels, 2, 10, offset=295)
    with pytest.raises(UserError):
        data.first_k_per_class([0, 1, 2], 1, 10)  # classes 3..9 absent


# ----------------------------------------------------------------------------------------------
# load_subset normalisation


def test_cifar10_normalisation_is_the_papers():
    mean, std = data.NORMALISATION["cifar10"]
    assert tuple(mean) == PAPER_CIFAR_MEAN and tuple(std) == PAPER_CIFAR_STD


def test_load_subset_cifar10_denormalises_to_the_uint8_images(cifar10_fake):
    sub = data.load_subset("cifar10", str(cifar10_fake.root), 3, offset=4)
    want_idx = paper_first_k(cifar10_fake.labels, 3, 10, offset=4)
    assert sub["indices"].tolist() == want_idx
    assert sub["labels"].tolist() == [cifar10_fake.labels[i] for i in want_idx]
    assert sub["labels"].dtype == torch.long and sub["num_classes"] == 10
    x = sub["images"]
    assert x.dtype == torch.float32 and x.shape == (30, 3, 32, 32)
    torch.testing.assert_close(sub["mean"], torch.tensor(PAPER_CIFAR_MEAN), rtol=0, atol=0)
    torch.testing.assert_close(sub["std"], torch.tensor(PAPER_CIFAR_STD), rtol=0, atol=0)
    want = torch.from_numpy(cifar10_fake.images[want_idx].astype(np.float64) / 255.0).permute(0, 3, 1, 2)
    mean = torch.tensor(PAPER_CIFAR_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(PAPER_CIFAR_STD, dtype=torch.float64).view(1, 3, 1, 1)
    assert (x.double() * std + mean - want).abs().max().item() <= 1e-6
    assert (data.denormalise(x, sub["mean"], sub["std"]).double() - want).abs().max().item() <= 1e-6
    # normalised, not raw: per-channel values are (v - mean) / std
    assert (x.double() - (want - mean) / std).abs().max().item() <= 1e-5
    assert sub["classes"] == CIFAR10_CLASSES and sub["dataset"] == "cifar10"


def test_load_subset_fashion_mnist_is_one_channel(fashion_fake, no_system_fashion, offline):
    sub = data.load_subset("fashion_mnist", str(fashion_fake.root), 2)
    idx = paper_first_k(fashion_fake.labels, 2, 10)
    assert sub["images"].shape == (20, 1, 28, 28)
    want = torch.from_numpy(fashion_fake.images[idx].astype(np.float64) / 255.0)[:, None]
    got = data.denormalise(sub["images"], sub["mean"], sub["std"]).double()
    assert (got - want).abs().max().item() <= 1e-6
    assert sub["mean"].tolist() == pytest.approx([0.2860]) and sub["std"].tolist() == pytest.approx([0.3530])


# ----------------------------------------------------------------------------------------------
# ImageFolder (`folder`)


def test_folder_dataset_reads_the_tree(folder_fake):
    images, targets, classes = data.load_dataset("folder", str(folder_fake.root))
    assert list(classes) == folder_fake.classes
    assert targets == folder_fake.labels and len(targets) == 50
    for i in (0, 7, 49):
        img = images(i) if callable(images) else images[i]
        img = np.asarray(img)
        assert img.dtype == np.uint8 and img.shape == (32, 32, 3)
        np.testing.assert_array_equal(img, folder_fake.images[i])


def test_load_subset_folder_yields_3x32x32(folder_fake):
    sub = data.load_subset("folder", str(folder_fake.root), 2)
    assert sub["images"].shape == (20, 3, 32, 32)
    idx = paper_first_k(folder_fake.labels, 2, 10)
    assert sub["indices"].tolist() == idx
    want = torch.from_numpy(folder_fake.images[idx].astype(np.float64) / 255.0).permute(0, 3, 1, 2)
    got = data.denormalise(sub["images"], sub["mean"], sub["std"]).double()
    assert (got - want).abs().max().item() <= 1e-6


def test_folder_with_grey_images_is_converted_to_rgb(tmp_path):
    from PIL import Image
    fake = make_image_folder(tmp_path, n_per_class=1, classes=2)
    grey = np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)
    Image.fromarray(grey, mode="L").save(tmp_path / "train" / fake.classes[0] / "0000.png")
    images, _, _ = data.load_dataset("folder", str(tmp_path))
    img = np.asarray(images(0) if callable(images) else images[0])
    assert img.shape == (32, 32, 3)
    np.testing.assert_array_equal(img, np.repeat(grey[..., None], 3, axis=2))


# ----------------------------------------------------------------------------------------------
# Missing data: one-line UserError naming a fix, never a download attempt over the network


def test_cifar10_missing_offline_is_a_one_line_user_error(empty_dir, offline):
    with pytest.raises(UserError) as excinfo:
        data.load_dataset("cifar10", str(empty_dir))
    one_line_error(excinfo, "cifar10", str(empty_dir), "--data_root", "cifar-10-batches-py")
    assert "URLError" in str(excinfo.value)
    # the (blocked) download was the only thing tried
    assert [name for name, _, _ in offline] == ["CIFAR10"]


def test_fashion_mnist_missing_offline_is_a_one_line_user_error(empty_dir, no_system_fashion, offline):
    with pytest.raises(UserError) as excinfo:
        data.load_dataset("fashion_mnist", str(empty_dir))
    one_line_error(excinfo, str(empty_dir), "apt-get install dataset-fashion-mnist")
    assert [name for name, _, _ in offline] == ["FashionMNIST"]


@pytest.mark.parametrize("name", ["mnist", "cifar100", "svhn"])
def test_torchvision_datasets_missing_offline_are_user_errors(empty_dir, offline, name):
    with pytest.raises(UserError) as excinfo:
        data.load_dataset(name, str(empty_dir))
    one_line_error(excinfo, name, "--data_root")


def test_unknown_dataset_is_a_one_line_user_error(offline):
    with pytest.raises(UserError) as excinfo:
        data.load_dataset("imagenet", "./data")
    msg = one_line_error(excinfo, "'imagenet'", "choose one of")
    for name in ("cifar10", "fashion_mnist", "folder"):
        assert name in msg
    assert offline == []


def test_folder_missing_path_is_a_one_line_user_error(tmp_path, offline):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError) as excinfo:
        data.load_dataset("folder", str(missing))
    one_line_error(excinfo, str(missing / "train"), "--data_root", "train/<class>")


def test_folder_with_empty_train_dir_is_a_user_error(tmp_path, offline):
    (tmp_path / "train").mkdir()
    with pytest.raises(UserError) as excinfo:
        data.load_dataset("folder", str(tmp_path))
    one_line_error(excinfo, "--data_root")


@pytest.mark.parametrize("theta0, skipped, noted", [
    ("./ckpts/pretrained/resnet18_w16_fashion_mnist_pimgs2_pep15_seed0.pth", 3, False),
    ("random init (seeded)", 1, False), ("./models/pretrained.pth", 3, True),
    ({"images_per_class": 2, "excluded": []}, 2, False), ({"images_per_class": 3, "excluded": []}, 3, False)])
def test_pool_never_trained_on_skips_the_subset_and_the_pretraining(fashion_fake, theta0, skipped, noted):
    """metrics.py --null_pool's pool: with theta0 pretrained by train.py (the first --pretrain_imgs per class
    outside the subset) the first 1 + 2 images of each class are skipped, with a random init only the subset's
    one; a theta0 from a file of unrecorded data skips the same and says so; the pool's pixels and labels are
    the dataset's own, normalised as the training's. A run folder with train.py's record of theta0's data
    (theta0_data, here a pretraining of the first 2 or 3 per class, the subset's image among them) skips
    exactly the subset and those."""
    mean, std = data.NORMALISATION["fashion_mnist"]
    config = {"args": {"dataset": "fashion_mnist", "num_imgs_per_class": 1, "offset": 0, "pretrain_imgs": 2},
              "data": {"num_classes": 10, "mean": mean, "std": std}, "theta0": theta0}
    if isinstance(theta0, dict):
        config.update(theta0="./ckpts/pretrained/x.pth", theta0_data={"dataset": "fashion_mnist", **theta0})
    pool, labels, note = data.images_never_trained_on(config, str(fashion_fake.root), 2)
    expected = [int(i) for c in range(10) for i in np.flatnonzero(np.asarray(fashion_fake.labels) == c)[skipped:skipped + 2]]
    expected.sort()  # the pool is in dataset order
    assert labels.tolist() == [fashion_fake.labels[i] for i in expected]
    assert (note is not None and "may hold images it saw" in note) == noted
    pixels = (torch.from_numpy(fashion_fake.images[expected]).float()[:, None] / 255 - mean[0]) / std[0]
    assert torch.allclose(pool, pixels, atol=1e-6)
