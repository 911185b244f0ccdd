"""End to end on tiny fake data: train -> recons -> metrics -> draw_pics, and the seed README's command
lines (bash grid_search.sh included). Each stage's own behaviour is in test_<stage>.py."""
import csv
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import rankdata

import draw_pics
import metrics
import recons
import train
from models import build_model
from simudy.loop import LOG_FIELDS
from tests.helpers import reference_avg_ssim, run, run_script

TINY_RESNET = ["--width", "4", "--pretrain_imgs", "5", "--pretrain_epochs", "1"]
FAST_RECONS = ["--rec_epochs", "2", "--rec_steps_per_epoch", "3", "--save_every", "2"]


def grid_size(image, per_row, rows):
    """(tiles of the side these rows of `per_row` tiles of 2 px padding make, the image's size in pixels)."""
    side = (image.size[0] - 2) // per_row - 2
    return side, (per_row * (side + 2) + 2, rows * (side + 2) + 2)


def test_end_to_end_resnet_on_cifar_layout(cifar_cwd):
    flags = ["--num_imgs_per_class", 2, "--bs", 20] + TINY_RESNET[:2]
    train_dir = run(train, flags + ["--lr", 1e-2] + TINY_RESNET[2:])
    config = json.load(open(os.path.join(train_dir, "config.json")))
    assert config["data"]["image_shape"] == [3, 32, 32] and config["data"]["num_images"] == 20
    assert config["theta0"].startswith("./ckpts/pretrained/")  # ResNets start pretrained, not random
    subset = torch.load(os.path.join(train_dir, "train_subset.pth"))
    assert subset["labels"].bincount().tolist() == [2] * 10
    theta0 = torch.load(os.path.join(train_dir, "theta0.pth"))
    theta_final = torch.load(os.path.join(train_dir, "theta_final.pth"))
    assert not torch.equal(theta0["linear.weight"], theta_final["linear.weight"])
    # eval-mode BN (paper): running statistics untouched by the fine-tuning
    assert torch.equal(theta0["bn1.running_mean"], theta_final["bn1.running_mean"])

    recons_dir = run(recons, flags + ["--tlr", 1e-2] + FAST_RECONS)
    files = set(os.listdir(recons_dir))
    assert {"0_0.pth", "0_2.pth", "1_0.pth", "1_2.pth", "labels.pth", "log.csv", "config.json"} <= files
    snap = torch.load(os.path.join(recons_dir, "1_2.pth"))
    assert snap["x"].shape == (20, 3, 32, 32) and snap["labels"].bincount().tolist() == [2] * 10
    log = open(os.path.join(recons_dir, "log.csv")).read().splitlines()
    assert len(log) == 1 + 6 and log[0] == ",".join(LOG_FIELDS)

    result = run(metrics, flags + ["--tlr", 1e-2, "--snapshot", "last", "--image_shares"])
    assert result["n_train"] == 20 and result["snapshot"] == os.path.join(recons_dir, "1_2.pth")
    # the paper's number on the last snapshot, computed independently (skimage, the paper code's loop)
    assert result["avg_ssim"] == pytest.approx(reference_avg_ssim(subset["images"], snap["x"]), abs=1e-6)
    out_dir = os.path.join(recons_dir, "metrics", "1_2")
    assert json.load(open(os.path.join(out_dir, "metrics.json")))["avg_ssim"] == result["avg_ssim"]
    # each training image's loss at theta0, the second way: the model itself with theta0 loaded
    model = build_model("resnet18", 10, [3, 32, 32], 4)
    model.load_state_dict(theta0)
    with torch.no_grad():
        expected = torch.nn.CrossEntropyLoss(reduction="none")(model.eval()(subset["images"]), subset["labels"])
    rows = list(csv.DictReader(open(os.path.join(out_dir, "per_image.csv"))))
    assert [float(r["loss_theta0"]) for r in rows] == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-6)
    by_loss = result["ssim_by_theta0_loss"]
    ssim = np.array([float(r["ssim"] or 0) for r in rows])
    assert by_loss["spearman"] == pytest.approx(np.corrcoef(rankdata(ssim), rankdata(expected))[0, 1], abs=1e-6)
    assert by_loss["ssim_high_loss"] == pytest.approx(ssim[expected.numpy() > np.median(expected.numpy())].mean(),
                                                      abs=1e-5)
    shares = np.array([float(r["share"]) for r in rows])  # each image's part of the change (test_exposure.py)
    assert (shares > 0).all() and all(-1 <= float(r["share_cos"]) <= 1 for r in rows)
    assert result["spearman_ssim_share"] == pytest.approx(np.corrcoef(rankdata(ssim), rankdata(shares))[0, 1],
                                                          abs=1e-5)
    paths = run(draw_pics, flags + ["--tlr", 1e-2, "--snapshot", "last", "--sort", "ssim"])
    side, size = grid_size(Image.open(paths[0]), 10, 4)  # 2 pairs of rows of 10 tiles, 2 px padding
    assert side % 32 == 0 and Image.open(paths[0]).size == size  # tiles of 32 px (or enlarged k times)
    assert os.path.isfile(os.path.join(out_dir, "loss_curve.png"))


def test_seed_readme_commands_start(cifar_cwd):
    """The seed README's command lines, verbatim plus a tiny width (and short runs so the test is fast)."""
    seed = [
        "train.py --num_imgs_per_class 2 --lr 1e-2 --bs 20",
        "recons.py --num_imgs_per_class 2 --tlr 1e-2 --bs 20 --rec_lr 1e-2",
        "metrics.py --num_imgs_per_class 2 --tlr 1e-2 --rlr 1e-2 --bs 20 --rbs 20 --linear 0 --rec_lr 1e-2"
        " --eval_epoch 10 --eval_step 10",
        "draw_pics.py --num_imgs_per_class 2 --tlr 1e-2 --rlr 1e-2 --bs 20 --rbs 20 --linear 0 --rec_lr 1e-2"
        " --eval_epoch 10 --eval_step 10",
    ]
    modules = {"train.py": train, "recons.py": recons, "metrics.py": metrics, "draw_pics.py": draw_pics}
    extra = {"train.py": TINY_RESNET, "recons.py": ["--width", 4, "--max_iterations", 2]}
    recons_dir = None
    for line in seed:
        script, *args = line.split()
        if script == "metrics.py":  # the seed asks for epoch 10 step 1000; stand in the first snapshot
            shutil.copy(os.path.join(recons_dir, "0_0.pth"), os.path.join(recons_dir, "10_1000.pth"))
        out = run(modules[script], args + extra.get(script, ["--width", 4]))
        if script == "recons.py":
            recons_dir = out
            config = json.load(open(os.path.join(out, "config.json")))
            assert config["rlr"] == 0.01 and config["rbs"] == 20 and config["args"]["steps"] == 8
            assert config["args"]["rec_epochs"] == 20 and config["args"]["rec_steps_per_epoch"] == 1500
    assert os.path.isfile(os.path.join(recons_dir, "metrics", "10_1000", "reconstruction.png"))

    # bash grid_search.sh (two candidates), then the recons line with the suggested values
    env = dict(os.environ, PYTHON=sys.executable, LR_LIST="0.02 0.03", BS_LIST="20",
               ARGS="--num_imgs_per_class 2 --tlr 1e-2 --bs 20 --steps 1 --rec_lr 1e-2 --width 4")
    proc = run_script("grid_search.sh", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    best = json.load(open("ckpts/grid_search/grid_search.json"))["best"]
    losses = [c["final_loss"] for c in json.load(open("ckpts/grid_search/grid_search.json"))["candidates"]]
    assert best["final_loss"] == min(losses) and "suggested: --rlr" in proc.stdout
    out = run(recons, ["--num_imgs_per_class", 2, "--tlr", 1e-2, "--bs", 20, "--rec_lr", 1e-2,
                       "--rlr", best["rlr"], "--rbs", best["rbs"], "--width", 4, "--max_iterations", 1])
    assert json.load(open(os.path.join(out, "config.json")))["rlr"] == best["rlr"]
