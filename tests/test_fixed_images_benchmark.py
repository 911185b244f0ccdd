"""benchmarks/fixed_images.py (issue 12, session 27): SimuDy with the images the change hardly holds held
fixed. On a tiny Fashion-MNIST MLP training: the held dummies are exactly their images at every snapshot
(through a resume too) while the free ones move; two paths to the printed average SSIM (its table and
quality.ssim_curve); --fix fitted holds pool images of the right class, the ones theta0 fits best."""
import json
import os

import pytest
import torch

import train
from simudy.data import images_never_trained_on
from simudy.exposure import image_shares
from simudy.target import load_training_run, loss_per_image
from tests.helpers import load_benchmark, run

FLAGS = ["--dataset", "fashion_mnist", "--model_name", "mlp", "--width", 16, "--num_imgs_per_class", 1,
         "--bs", 5]


@pytest.fixture(scope="module")
def fixed_images():
    return load_benchmark("fixed_images")


@pytest.fixture
def training(fashion_root, in_tmp_cwd):
    train_dir = run(train, FLAGS + ["--data_root", fashion_root, "--lr", 0.05, "--epochs", 3])
    shares, _ = image_shares(load_training_run(train_dir, "cpu"), *subset(train_dir))
    return train_dir, fashion_root, float(shares.median())  # about half the images held


def subset(train_dir):
    saved = torch.load(os.path.join(train_dir, "train_subset.pth"))
    return saved["images"], saved["labels"]


def benchmark(module, fix, part, train_dir, root, recons_dir, *extra):
    flags = FLAGS + ["--data_root", root, "--tlr", 0.05, "--preset", "fast", "--rec_epochs", 1,
                     "--rec_steps_per_epoch", 4, "--save_every", 2, "--train_dir", train_dir,
                     "--recons_dir", recons_dir, *extra]
    return module.main(module.parse_args(["--fix", fix, "--part", str(part), "--"] + [str(f) for f in flags]))


def test_held_images_stay_exactly_and_the_table_repeats_ssim_curve(fixed_images, training):
    train_dir, root, part = training
    x_true, y_true = subset(train_dir)
    first = benchmark(fixed_images, "truth", part, train_dir, root, "rec", "--max_iterations", 2)
    held = first["held"]
    assert 0 < int(held.sum()) < len(held)
    out = benchmark(fixed_images, "truth", part, train_dir, root, "rec", "--resume")
    assert torch.equal(out["held"], held)
    for stem in ("0_1", "0_3"):  # the stop's snapshot and the end's, after the resume
        x = torch.load(os.path.join("rec", stem + ".pth"))["x"]
        assert torch.equal(x[held], x_true[held])
        assert (x[~held] - x_true[~held]).abs().max() > 0.1  # the free ones are dummies, moving
    with open(os.path.join("rec", fixed_images.HELD_RECORD)) as f:
        assert json.load(f)["held"] == held.nonzero().flatten().tolist()
    quality = load_benchmark("quality")
    curve = out["curves"]["rec"]
    assert [(i, round(avg, 4)) for i, avg, *_ in curve] == [(i, s) for i, _, s in quality.ssim_curve("rec")]
    assert all(0 <= count <= int((~held).sum()) for *_, count in curve)


def test_fitted_holds_the_pool_images_theta0_fits_best(fixed_images, training):
    train_dir, root, part = training
    x_true, y_true = subset(train_dir)
    out = benchmark(fixed_images, "fitted", part, train_dir, root, "rec_fitted", "--max_iterations", 1)
    held, fixed = out["held"], out["fixed"]
    assert torch.equal(fixed[~held], x_true[~held])
    training_run = load_training_run(train_dir, "cpu")
    pool, pool_labels, _ = images_never_trained_on(training_run.config, root, 100)
    pool_loss = loss_per_image(training_run, pool, pool_labels)
    for i in held.nonzero().flatten().tolist():
        same = (pool - fixed[i]).flatten(1).abs().amax(1) == 0
        assert same.any() and pool_labels[same][0] == y_true[i]  # a pool image of its class
        # the lowest loss at theta0 of its class (one image held per class here)
        assert pool_loss[same][0] == pool_loss[pool_labels == y_true[i]].min()
    x = torch.load(os.path.join("rec_fitted", "0_0.pth"))["x"]
    assert torch.equal(x[held], fixed[held])
