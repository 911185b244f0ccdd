"""draw_pics.py: Figure 1 layout (reconstruction rows above training rows) and the loss curve."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import draw_pics
import metrics
from utils import UserError

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
SIZE, PAD = 32, 2  # image side and make_grid's padding


@pytest.fixture(autouse=True)
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def make_runs(tmp_path, n, noise_levels, log_rows=None):
    """Fake train/recons runs; reconstruction i = training image i + noise_levels[i] noise.

    Returns the training images in [0, 1] pixel space and the reconstruction folder.
    """
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(n, 3, SIZE, SIZE, generator=gen)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    images = (pixels - mean) / std
    recons = images + torch.tensor(noise_levels).view(-1, 1, 1, 1) * torch.randn(
        images.shape, generator=gen)
    train_dir, recons_dir = tmp_path / "train_run", tmp_path / "recons_run"
    train_dir.mkdir()
    recons_dir.mkdir()
    torch.save({"images": images, "labels": torch.arange(n) % 10, "indices": torch.arange(n),
                "mean": torch.tensor(MEAN), "std": torch.tensor(STD)}, train_dir / "train_subset.pth")
    (recons_dir / "config.json").write_text(json.dumps({"train_dir": str(train_dir)}))
    torch.save({"x": recons, "labels": torch.arange(n) % 10, "epoch": 5, "step": 1200},
               recons_dir / "5_1200.pth")
    if log_rows is not None:
        with open(recons_dir / "log.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["iteration", "epoch", "step", "total", "cos", "tv", "lr", "seconds"])
            w.writerows(log_rows)
    return pixels, str(recons_dir)


def flags(recons_dir, *extra):
    return ["--recons_dir", recons_dir, "--eval_epoch", "5", "--eval_step", "12",
            "--device", "cpu", *extra]


def tile(grid, row, col):
    """The image at (row, col) of a make_grid picture, as C×H×W uint8."""
    top, left = PAD + row * (SIZE + PAD), PAD + col * (SIZE + PAD)
    return grid[top:top + SIZE, left:left + SIZE].transpose(2, 0, 1)


def as_saved(pixels):
    """What save_image writes for [0, 1] pixels."""
    return (pixels * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()


def read_png(path):
    from PIL import Image
    return np.asarray(Image.open(path).convert("RGB"))


def test_needs_metrics_first(tmp_path):
    _, recons_dir = make_runs(tmp_path, 3, [0.1] * 3)
    with pytest.raises(UserError, match="run metrics.py with the same flags first"):
        draw_pics.main(draw_pics.parse_args(flags(recons_dir)))


def test_figure_alternates_reconstruction_and_training_rows(tmp_path, capsys):
    n, per_row = 7, 3
    pixels, recons_dir = make_runs(tmp_path, n, [0.0] * n, log_rows=[[i, 0, i, 10.0 / (i + 1),
                                                                        1.0 / (i + 1), 0, 0.01, i]
                                                                       for i in range(20)])
    metrics.main(metrics.parse_args(flags(recons_dir)))
    paths = draw_pics.main(draw_pics.parse_args(flags(recons_dir, "--per_row", str(per_row))))
    out_dir = Path(recons_dir) / "metrics" / "5_1200"
    assert paths == [str(out_dir / "reconstruction.png"), str(out_dir / "loss_curve.png")]
    assert str(out_dir / "reconstruction.png") in capsys.readouterr().out
    grid = read_png(paths[0])
    rows = 2 * 3  # ceil(7 / 3) pairs of rows
    assert grid.shape == (PAD + rows * (SIZE + PAD), PAD + per_row * (SIZE + PAD), 3)
    for i in range(n):
        pair, col = divmod(i, per_row)
        # exact copies: the reconstruction tile equals the training tile below it
        assert np.array_equal(tile(grid, 2 * pair + 1, col), as_saved(pixels[i]))
        assert np.array_equal(tile(grid, 2 * pair, col), as_saved(pixels[i]))
    assert (tile(grid, 5, 2) == 255).all()  # the short last row is padded with white
    assert read_png(paths[1]).shape[0] > 100  # a real matplotlib figure


def test_sort_by_ssim_puts_best_pair_first(tmp_path, capsys):
    noise = [0.9, 0.5, 0.05, 0.3]  # pair 2 is the best reconstruction, then 3, 1, 0
    pixels, recons_dir = make_runs(tmp_path, 4, noise)
    metrics.main(metrics.parse_args(flags(recons_dir)))
    paths = draw_pics.main(draw_pics.parse_args(flags(recons_dir, "--sort", "ssim")))
    assert len(paths) == 1 and "no loss curve" in capsys.readouterr().out  # no log.csv here
    grid = read_png(paths[0])
    assert grid.shape[1] == PAD + 10 * (SIZE + PAD)  # the default 10 per row
    for col, i in enumerate([2, 3, 1, 0]):
        assert np.array_equal(tile(grid, 1, col), as_saved(pixels[i]))


def test_matching_must_agree_with_metrics_run(tmp_path):
    _, recons_dir = make_runs(tmp_path, 3, [0.1] * 3)
    metrics.main(metrics.parse_args(flags(recons_dir)))
    with pytest.raises(UserError, match="--matching hungarian"):
        draw_pics.main(draw_pics.parse_args(flags(recons_dir, "--matching", "hungarian")))
