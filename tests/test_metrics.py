"""metrics.py: SSIM matrix vs skimage, matching vs the paper's loop, and main's outputs."""
import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import metrics
from metrics import match_by_ssim, parse_args, snapshot_path_from_args, ssim_matrix
from utils import UserError, run_main

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


@pytest.fixture(autouse=True)
def empty_torch_home(tmp_path, monkeypatch):
    """Never read the user's torch cache (LPIPS weights) nor download anything."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def normalise(pixels, mean=MEAN, std=STD):
    return (pixels - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def make_runs(tmp_path, n=6, shape=(3, 32, 32), snapshot=None, name="5_1200.pth", log_rows=None):
    """A fake training run (train_subset.pth) and reconstruction run (config.json + snapshot).

    snapshot: function of the normalised training images -> the snapshot dict (default: a copy).
    """
    gen = torch.Generator().manual_seed(0)
    mean, std = (MEAN, STD) if shape[0] == 3 else ((0.2860,), (0.3530,))
    images = normalise(torch.rand(n, *shape, generator=gen), mean, std)
    labels = torch.arange(n) % 10
    train_dir, recons_dir = tmp_path / "train_run", tmp_path / "recons_run"
    train_dir.mkdir()
    recons_dir.mkdir()
    torch.save({"images": images, "labels": labels, "indices": torch.arange(n) * 7 + 3,
                "mean": torch.tensor(mean), "std": torch.tensor(std),
                "classes": [str(i) for i in range(10)]}, train_dir / "train_subset.pth")
    (train_dir / "config.json").write_text(json.dumps({"args": {}}))
    (recons_dir / "config.json").write_text(json.dumps({"args": {}, "train_dir": str(train_dir)}))
    snap = snapshot(images) if snapshot else {"x": images.clone(), "labels": labels.clone()}
    snap.setdefault("epoch", 5)
    snap.setdefault("step", 1200)
    torch.save(snap, recons_dir / name)
    if log_rows is not None:
        with open(recons_dir / "log.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["iteration", "epoch", "step", "total", "cos", "tv", "lr", "seconds"])
            w.writerows(log_rows)
    return images, labels, str(recons_dir)


def run(recons_dir, *extra):
    return metrics.main(parse_args(["--recons_dir", recons_dir, "--eval_epoch", "5",
                                    "--eval_step", "12", "--device", "cpu", *extra]))


def read_rows(recons_dir, stem="5_1200"):
    with open(os.path.join(recons_dir, "metrics", stem, "per_image.csv")) as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------
# SSIM


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 64, 64)])
def test_ssim_matrix_equals_skimage(shape):
    from skimage.metrics import structural_similarity
    gen = torch.Generator().manual_seed(1)
    train = torch.randn(3, *shape, generator=gen) * 2 + 0.3
    recons = 0.6 * train[[2, 0]] + 0.8 * torch.randn(2, *shape, generator=gen)  # correlated pairs
    ssim = ssim_matrix(train, recons)
    assert ssim.shape == (3, 2) and ssim.dtype == torch.float64
    for i in range(3):
        for j in range(2):
            a, b = (t.double().permute(1, 2, 0).numpy() for t in (train[i], recons[j]))
            ref = structural_similarity(a, b, channel_axis=2, data_range=a.max() - a.min())
            assert abs(ssim[i, j].item() - ref) <= 1e-5
    assert ssim[2, 0] > 0.3 and ssim[0, 1] > 0.3 and abs(ssim[1, 0]) < 0.1


def test_ssim_matrix_chunking_does_not_change_values():
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(ssim_matrix(x, x.flip(0), max_elements=1), ssim_matrix(x, x.flip(0)))
    assert torch.allclose(ssim_matrix(x, x).diagonal(), torch.ones(5, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# Matching


def paper_greedy(ssim):
    """The paper code's literal loop: take the global max, blank its row and column, repeat."""
    s = ssim.clone()
    pairs = []
    for _ in range(min(s.shape)):
        r, c = divmod(int(torch.argmax(s)), s.shape[1])
        pairs.append((r, c))
        s[r, :] = -float("inf")
        s[:, c] = -float("inf")
    return pairs


@pytest.mark.parametrize("n,m", [(6, 6), (7, 4), (4, 7), (1, 5)])
def test_greedy_equals_paper_loop(n, m):
    gen = torch.Generator().manual_seed(n * 10 + m)
    for trial in range(20):
        ssim = torch.rand(n, m, generator=gen, dtype=torch.float64)
        if trial % 2:
            ssim = (ssim * 3).round() / 3  # many ties: the order must still follow the loop
        pairs = match_by_ssim(ssim, "greedy")
        assert pairs == paper_greedy(ssim)
        assert len({r for r, _ in pairs}) == len({c for _, c in pairs}) == min(n, m)


def test_hungarian_total_at_least_greedy():
    gen = torch.Generator().manual_seed(3)
    strictly_better = 0
    for n, m in [(5, 5), (6, 4), (4, 6)] * 5:
        ssim = torch.rand(n, m, generator=gen, dtype=torch.float64)
        total = {k: sum(ssim[r, c].item() for r, c in match_by_ssim(ssim, k))
                 for k in ("greedy", "hungarian")}
        assert total["hungarian"] >= total["greedy"] - 1e-12
        strictly_better += total["hungarian"] > total["greedy"] + 1e-9
    assert strictly_better > 0  # the two methods do differ
    # The textbook case where greedy loses: taking 0.9 forces the 0.0 pair.
    ssim = torch.tensor([[0.9, 0.8], [0.8, 0.0]])
    assert match_by_ssim(ssim, "greedy") == [(0, 0), (1, 1)]
    assert sorted(match_by_ssim(ssim, "hungarian")) == [(0, 1), (1, 0)]


# ----------------------------------------------------------------------------------------------
# main


def test_identical_snapshot_scores_perfectly(tmp_path, capsys):
    images, labels, recons_dir = make_runs(tmp_path, n=6)
    result = run(recons_dir)
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
    assert sorted(os.listdir(out_dir / "ori")) == sorted(os.listdir(out_dir / "recover")) == \
        sorted(f"{i}.png" for i in range(6))
    matched = torch.load(out_dir / "matched.pth")
    assert torch.equal(matched["train"], images) and torch.equal(matched["recons"], images)
    assert matched["ssim"].shape == (6,)


@pytest.mark.parametrize("matching", ["greedy", "hungarian"])
def test_permuted_copy_is_matched_back(tmp_path, matching):
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    noise = torch.Generator().manual_seed(4)
    _, _, recons_dir = make_runs(tmp_path, n=6, snapshot=lambda x: {
        "x": x[perm] + 0.3 * torch.randn(x[perm].shape, generator=noise)})
    result = run(recons_dir, "--matching", matching)
    rows = read_rows(recons_dir)
    # training image perm[j] sits at reconstruction j
    assert {int(r["train_index"]): int(r["recon_index"]) for r in rows} == \
        {int(t): j for j, t in enumerate(perm)}
    assert 0.4 < result["avg_ssim"] < 1.0 and result["matching"] == matching
    assert 0 < result["mse"] and np.isfinite(result["psnr"])
    assert all(r["recon_label"] == "" for r in rows)  # this snapshot has no labels


def test_fewer_reconstructions_count_zero_for_unmatched(tmp_path):
    _, _, recons_dir = make_runs(tmp_path, n=6, snapshot=lambda x: {"x": x[[4, 1]]})
    result = run(recons_dir)
    assert abs(result["avg_ssim"] - 2 / 6) < 1e-9  # paper divides by the number of training images
    assert abs(result["share_ssim_ge_0.4"] - 2 / 6) < 1e-9
    rows = read_rows(recons_dir)
    assert [r["recon_index"] for r in rows] == ["", "1", "", "", "0", ""]
    assert rows[0]["ssim"] == "" and float(rows[4]["ssim"]) > 0.999


def test_top_scores_first_ranked(tmp_path):
    _, _, recons_dir = make_runs(tmp_path, n=4, snapshot=lambda x: {
        "x": torch.cat([torch.zeros_like(x[:2]), x]), "ranking": torch.tensor([3, 5, 0, 1, 2, 4])})
    result = run(recons_dir, "--top", "2")
    assert result["n_recons"] == 2 and abs(result["avg_ssim"] - 0.5) < 1e-9
    rows = read_rows(recons_dir)
    assert {r["train_index"]: r["recon_index"] for r in rows if r["recon_index"]} == {"1": "3",
                                                                                      "3": "5"}


def test_rerun_says_it_replaces(tmp_path, capsys):
    _, _, recons_dir = make_runs(tmp_path, n=3)
    run(recons_dir)
    assert "replacing" not in capsys.readouterr().out
    run(recons_dir, "--matching", "hungarian")
    assert "replacing previous metrics in" in capsys.readouterr().out


def test_lpips_unavailable_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    _, _, recons_dir = make_runs(tmp_path, n=3)
    result = run(recons_dir)
    assert result["lpips"].startswith("unavailable:") and "alexnet-owt-7be5be79.pth" in result["lpips"]


def test_lpips_with_local_alexnet_file(tmp_path, monkeypatch):
    pytest.importorskip("lpips")
    import torchvision
    home = tmp_path / "home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet().state_dict(),
               home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth")
    monkeypatch.setenv("TORCH_HOME", str(home))
    noise = torch.Generator().manual_seed(5)
    _, _, recons_dir = make_runs(tmp_path, n=3, snapshot=lambda x: {
        "x": x + 0.5 * torch.randn(x.shape, generator=noise)})
    result = run(recons_dir)
    assert isinstance(result["lpips"], float) and np.isfinite(result["lpips"]) and result["lpips"] > 0
    # a corrupt file is reported, not raised
    (home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth").write_bytes(b"not a checkpoint")
    assert run(recons_dir)["lpips"].startswith("unavailable: could not load")


def test_one_channel_images(tmp_path):
    _, _, recons_dir = make_runs(tmp_path, n=4, shape=(1, 28, 28))
    result = run(recons_dir)
    assert abs(result["avg_ssim"] - 1.0) < 1e-9
    assert result["lpips"].startswith("unavailable:")  # 28×28 is too small for AlexNet, as-is


def test_missing_snapshot_lists_available(tmp_path):
    _, _, recons_dir = make_runs(tmp_path, n=3)
    for name in ("0_0.pth", "0_100.pth", "10_100.pth", "2_100.pth"):
        torch.save({"x": torch.zeros(1, 3, 32, 32)}, Path(recons_dir) / name)
    with pytest.raises(UserError, match=r"10_1000\.pth not found; available: 0_0, 0_100, 2_100, "
                                        r"5_1200, 10_100; pick --eval_epoch/--eval_step"):
        metrics.main(parse_args(["--recons_dir", recons_dir, "--eval_epoch", "10",
                                 "--eval_step", "10"]))


def test_snapshot_last_picks_newest(tmp_path):
    _, _, recons_dir = make_runs(tmp_path, n=3)
    for name in ("0_0.pth", "10_100.pth", "2_1300.pth"):
        torch.save({"x": torch.zeros(1, 3, 32, 32)}, Path(recons_dir) / name)
    args = parse_args(["--recons_dir", recons_dir, "--snapshot", "last"])
    assert snapshot_path_from_args(args) == (recons_dir, os.path.join(recons_dir, "10_100.pth"))
    assert metrics.main(args)["n_recons"] == 1
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(UserError, match="no snapshots in"):
        snapshot_path_from_args(parse_args(["--recons_dir", str(empty), "--snapshot", "last"]))


def test_shape_mismatch_names_both_shapes(tmp_path):
    _, _, recons_dir = make_runs(tmp_path, n=3, snapshot=lambda x: {"x": torch.zeros(2, 1, 28, 28)})
    with pytest.raises(UserError, match=r"\(1, 28, 28\).*\(3, 32, 32\)"):
        run(recons_dir)


def test_user_error_is_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(metrics.main, lambda: parse_args(["--recons_dir", str(tmp_path / "nope")]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: reconstruction folder")


def test_paper_flags_and_snapshot_names(tmp_path):
    args = parse_args(["--model_name", "resnet", "--dataset", "cifar10", "--num_imgs_per_class", "2",
                       "--bs", "20", "--tlr", "0.01", "--rec_lambda_lr", "1e-6", "--resolution", "32",
                       "--eval_epoch", "3", "--eval_step", "7"])
    recons_dir, snapshot = snapshot_path_from_args(args)
    assert snapshot == os.path.join(recons_dir, "3_700.pth") and "nsteps8" in recons_dir
    args.linear = 1
    recons_dir, snapshot = snapshot_path_from_args(args)
    # the baselines' default --rec_lr is their paper code's 3e-4, resolved without the flag
    assert snapshot.endswith(os.path.join("_one_step_reclr0.0003", "x_700.pth"))
    args.linear = 2
    assert "_two_step_" in snapshot_path_from_args(args)[0]
    # --snapshot overrides both; its folder is the reconstruction run
    snap_file = str(tmp_path / "elsewhere" / "mine.pth")
    args = parse_args(["--snapshot", snap_file])
    assert snapshot_path_from_args(args) == (str(tmp_path / "elsewhere"), snap_file)
    assert metrics.metrics_dir_from_args(args) == str(tmp_path / "elsewhere" / "metrics" / "mine")
