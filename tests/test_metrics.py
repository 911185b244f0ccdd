"""metrics.py, the command line: what it writes (metrics.json, per_image.csv, matched.pth, the images) on
fake runs whose right answer is known, and its one-line errors. The scores themselves: test_scoring.py;
which snapshot the flags name: test_runs.py."""
import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import metrics
import recons
from simudy.data import NORMALISATION
from simudy.errors import UserError
from simudy.scoring import nearest_in_pool, paper_avg_ssim, ssim_matrix
from tests.helpers import make_runs, one_line_error, reference_avg_ssim, run, score
from utils import run_main

pytestmark = pytest.mark.usefixtures("empty_torch_home")


def read_rows(recons_dir, stem="5_1200"):
    with open(os.path.join(recons_dir, "metrics", stem, "per_image.csv")) as f:
        return list(csv.DictReader(f))


def test_identical_snapshot_scores_perfectly(tmp_path, capsys):
    runs = make_runs(tmp_path, n=6)
    recons_dir = runs.recons_dir
    result = score(recons_dir)
    out_dir = Path(recons_dir) / "metrics" / "5_1200"
    assert abs(result["avg_ssim"] - 1.0) < 1e-9
    assert result["share_ssim_ge_0.4"] == 1.0
    assert result["psnr"] == pytest.approx(100.0) and result["mse"] == 0.0  # capped at 100 dB
    assert result["psnr_normalised_paper"] == pytest.approx(100.0)
    assert result["n_train"] == result["n_recons"] == 6
    assert result["lpips"].startswith("unavailable:")
    assert json.loads((out_dir / "metrics.json").read_text())["avg_ssim"] == result["avg_ssim"]
    assert "avg SSIM" in (out_dir / "summary.txt").read_text()
    assert "avg SSIM" in capsys.readouterr().out
    rows = read_rows(recons_dir)
    assert [int(r["train_index"]) for r in rows] == list(range(6))
    assert [int(r["recon_index"]) for r in rows] == list(range(6))
    assert [int(r["dataset_index"]) for r in rows] == [i * 7 + 3 for i in range(6)]
    assert all(r["label"] == r["recon_label"] for r in rows)
    assert result["label_agreement"] == 1.0 and "label: 100.0%" in (out_dir / "summary.txt").read_text()
    # a hand-made training folder without theta0: no loss to sort by, said so
    assert result["ssim_by_theta0_loss"] is None and all(r["loss_theta0"] == "" for r in rows)
    assert "loss at theta0: unknown (no theta0" in (out_dir / "summary.txt").read_text()
    assert sorted(os.listdir(out_dir / "ori")) == sorted(os.listdir(out_dir / "recover")) == \
        sorted(f"{i}.png" for i in range(6))
    matched = torch.load(out_dir / "matched.pth")
    assert torch.equal(matched["train"], runs.images) and torch.equal(matched["recons"], runs.images)
    assert matched["ssim"].shape == (6,)


@pytest.mark.parametrize("matching", ["greedy", "hungarian"])
def test_permuted_copy_is_matched_back(tmp_path, matching):
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    noise = torch.Generator().manual_seed(4)
    runs = make_runs(tmp_path, n=6, snapshot=lambda x: {
        "x": x[perm] + 0.3 * torch.randn(x[perm].shape, generator=noise)})
    recons_dir = runs.recons_dir
    result = score(recons_dir, "--matching", matching)
    rows = read_rows(recons_dir)
    # training image perm[j] sits at reconstruction j
    assert {int(r["train_index"]): int(r["recon_index"]) for r in rows} == \
        {int(t): j for j, t in enumerate(perm)}
    assert 0.4 < result["avg_ssim"] < 1.0 and result["matching"] == matching
    snap = torch.load(Path(recons_dir) / "5_1200.pth")
    assert result["avg_ssim"] == pytest.approx(reference_avg_ssim(runs.images, snap["x"]), abs=1e-6)
    assert 0 < result["mse"] and np.isfinite(result["psnr"])
    assert all(r["recon_label"] == "" for r in rows)  # this snapshot has no labels
    assert result["label_agreement"] is None


def test_label_agreement_counts_matched_pairs_with_the_training_label(tmp_path):
    """A permuted copy whose labels are right for 4 of the 6 matched images: 4/6, the same share as
    per_image.csv's label columns."""
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    runs = make_runs(tmp_path, n=6, snapshot=lambda x: {"x": x[perm], "labels": torch.tensor([3, 0, 9, 9, 4, 2])})
    result = score(runs.recons_dir)
    rows = read_rows(runs.recons_dir)
    assert result["label_agreement"] == pytest.approx(4 / 6)
    assert sum(r["label"] == r["recon_label"] for r in rows) / len(rows) == pytest.approx(4 / 6)


def test_fewer_reconstructions_count_zero_for_unmatched(tmp_path):
    recons_dir = make_runs(tmp_path, n=6, snapshot=lambda x: {"x": x[[4, 1]]}).recons_dir
    result = score(recons_dir)
    assert abs(result["avg_ssim"] - 2 / 6) < 1e-9  # paper divides by the number of training images
    assert abs(result["share_ssim_ge_0.4"] - 2 / 6) < 1e-9
    rows = read_rows(recons_dir)
    assert [r["recon_index"] for r in rows] == ["", "1", "", "", "0", ""]
    assert rows[0]["ssim"] == "" and float(rows[4]["ssim"]) > 0.999


def test_top_scores_first_ranked(tmp_path):
    recons_dir = make_runs(tmp_path, n=4, snapshot=lambda x: {
        "x": torch.cat([torch.zeros_like(x[:2]), x]), "ranking": torch.tensor([3, 5, 0, 1, 2, 4])}).recons_dir
    result = score(recons_dir, "--top", "2")
    assert result["n_recons"] == 2 and abs(result["avg_ssim"] - 0.5) < 1e-9
    rows = read_rows(recons_dir)
    assert {r["train_index"]: r["recon_index"] for r in rows if r["recon_index"]} == {"1": "3",
                                                                                      "3": "5"}


def test_rerun_says_it_replaces(tmp_path, capsys):
    recons_dir = make_runs(tmp_path, n=3).recons_dir
    score(recons_dir)
    assert "replacing" not in capsys.readouterr().out
    score(recons_dir, "--matching", "hungarian")
    assert "replacing previous metrics in" in capsys.readouterr().out


def test_one_channel_images(tmp_path):
    recons_dir = make_runs(tmp_path, n=4, shape=(1, 28, 28)).recons_dir
    result = score(recons_dir)
    assert abs(result["avg_ssim"] - 1.0) < 1e-9
    assert result["lpips"].startswith("unavailable:")  # 28×28 is too small for AlexNet, as-is


def test_missing_snapshot_lists_available(tmp_path):
    recons_dir = make_runs(tmp_path, n=3).recons_dir
    for name in ("0_0.pth", "0_100.pth", "10_100.pth", "2_100.pth"):
        torch.save({"x": torch.zeros(1, 3, 32, 32)}, Path(recons_dir) / name)
    with pytest.raises(UserError, match=r"10_1000\.pth not found; available: 0_0, 0_100, 2_100, "
                                        r"5_1200, 10_100; pick --eval_epoch/--eval_step"):
        metrics.main(metrics.parse_args(["--recons_dir", recons_dir, "--eval_epoch", "10", "--eval_step", "10"]))


def test_missing_snapshot_of_a_recons_run_lists_available(mlp_run):
    flags = mlp_run.flags + ["--tlr", 0.05]
    run(recons, flags + ["--rec_epochs", 1, "--rec_steps_per_epoch", 2, "--save_every", 1])
    with pytest.raises(UserError) as e:
        run(metrics, flags + ["--eval_epoch", 10, "--eval_step", 10])
    one_line_error(e, "10_1000.pth not found", "0_0, 0_1", "--eval_epoch")


def test_shape_mismatch_names_both_shapes(tmp_path):
    recons_dir = make_runs(tmp_path, n=3, snapshot=lambda x: {"x": torch.zeros(2, 1, 28, 28)}).recons_dir
    with pytest.raises(UserError, match=r"\(1, 28, 28\).*\(3, 32, 32\)"):
        score(recons_dir)


def test_user_error_is_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(metrics.main, lambda: metrics.parse_args(["--recons_dir", str(tmp_path / "nope")]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: reconstruction folder")


def test_ssim_by_theta0_loss_splits_at_the_median_and_ranks():
    ssim = torch.tensor([0.9, 0.0, 0.8, 0.1])
    loss = torch.tensor([2.0, 0.01, 1.5, 0.1])
    by_loss = metrics.ssim_by_theta0_loss(ssim, loss)
    assert by_loss["spearman"] == pytest.approx(1.0)
    assert by_loss["ssim_high_loss"] == pytest.approx(0.85) and by_loss["ssim_low_loss"] == pytest.approx(0.05)
    assert metrics.ssim_by_theta0_loss(ssim, -loss)["spearman"] == pytest.approx(-1.0)
    assert metrics.ssim_by_theta0_loss(ssim, None) is None


def test_image_shares_need_the_trainings_theta0(tmp_path):
    runs = make_runs(tmp_path, n=4)
    with pytest.raises(UserError) as excinfo:
        score(runs.recons_dir, "--image_shares")
    one_line_error(excinfo, "--image_shares needs the training's theta0", "drop --image_shares")
    assert not (Path(runs.recons_dir) / "metrics").exists()  # refused before writing anything


def test_null_pool_scores_images_never_trained_on(mlp_run, fashion_fake):
    """--null_pool 3 on a run trained on the first image of each class (random init: no pretraining). Two
    paths: the null baseline equals the mean of paper_avg_ssim over the three draws (the 2nd, 3rd, 4th image
    of each class in file order, normalised here by hand), and each reconstruction's nearest pool SSIM and
    the count of those beaten by their training image equal a direct SSIM over the same 30 pool images."""
    flags = mlp_run.flags + ["--tlr", 0.05]
    recons_dir = run(recons, flags + ["--rec_epochs", 1, "--rec_steps_per_epoch", 2, "--save_every", 1])
    run(metrics, flags + ["--snapshot", "0_1", "--recons_dir", recons_dir, "--null_pool", 3])
    out = os.path.join(recons_dir, "metrics", "0_1")
    memory = json.load(open(os.path.join(out, "metrics.json")))["null_pool"]
    mean, std = NORMALISATION["fashion_mnist"]
    labels = np.asarray(fashion_fake.labels)
    per_class = [np.flatnonzero(labels == c)[1:4] for c in range(10)]  # the first of each class trained
    as_tensor = lambda idx: (torch.from_numpy(fashion_fake.images[idx]).float()[:, None] / 255 - mean[0]) / std[0]  # noqa: E731
    train = torch.load(os.path.join(mlp_run.train_dir, "train_subset.pth"))["images"]
    draws = [as_tensor([int(per_class[c][d]) for c in range(10)]) for d in range(3)]
    assert memory["pool_size"] == 30
    assert memory["null_ssim"] == pytest.approx(sum(paper_avg_ssim(train, x) for x in draws) / 3, abs=1e-6)
    snap = torch.load(os.path.join(recons_dir, "0_1.pth"))["x"]
    pool = as_tensor([int(i) for idx in per_class for i in idx])
    rows = read_rows(recons_dir, "0_1")
    nearest = ssim_matrix(pool, snap).max(0).values
    assert [float(r["nearest_pool_ssim"]) for r in rows] == pytest.approx(
        [float(nearest[int(r["recon_index"])]) for r in rows], abs=1e-5)
    assert memory["nearer_than_pool"] == sum(float(r["ssim"]) > float(r["nearest_pool_ssim"]) for r in rows)
    with pytest.raises(UserError) as e:
        run(metrics, flags + ["--snapshot", "0_1", "--recons_dir", recons_dir, "--null_pool", -1])
    one_line_error(e, "--null_pool -1 must be >= 0")


def test_nearest_in_pool_tells_a_copy_of_the_training_image_from_a_pool_image():
    """A reconstruction that is its training image beats every pool image; one that is a pool image does not."""
    torch.manual_seed(0)
    train, pool = torch.randn(3, 1, 12, 12), torch.randn(5, 1, 12, 12)
    for recons, expected in ((train, [True] * 3), (pool[:3], [False] * 3)):
        matched = ssim_matrix(train, recons).diagonal()
        _, nearer = nearest_in_pool(matched, ssim_matrix(pool, recons))
        assert nearer.tolist() == expected
