"""draw_pics.py: Figure 1 layout (reconstruction rows above training rows) and the loss curve."""
from pathlib import Path

import numpy as np
import pytest
import torch

import draw_pics
from simudy.data import denormalise
from simudy.errors import UserError
from tests.helpers import MEAN, STD, make_runs, score, snapshot_flags

SIZE, PAD = 32, 2  # image side and make_grid's padding

pytestmark = pytest.mark.usefixtures("empty_torch_home")


def noisy_runs(tmp_path, noise_levels, log_rows=None):
    """Fake train/recons runs; reconstruction i = training image i + noise_levels[i] noise (normalised)."""
    gen = torch.Generator().manual_seed(1)
    levels = torch.tensor(noise_levels).view(-1, 1, 1, 1)
    return make_runs(tmp_path, n=len(noise_levels), log_rows=log_rows,
                     snapshot=lambda x: {"x": x + levels * torch.randn(x.shape, generator=gen),
                                         "labels": torch.arange(len(x)) % 10})


def draw(recons_dir, *extra):
    return draw_pics.main(draw_pics.parse_args(snapshot_flags(recons_dir, *extra)))


def tile_side(grid, per_row):
    """The side of one tile of a make_grid picture `per_row` tiles wide: SIZE times a whole factor (images
    may be enlarged by nearest neighbour)."""
    side, rest = divmod(grid.shape[1] - PAD, per_row)
    assert rest == 0 and (side - PAD) % SIZE == 0, f"{grid.shape} is no grid of {per_row} tiles of k x {SIZE} px"
    return side - PAD


def tile(grid, row, col, per_row):
    """The image at (row, col) of a make_grid picture, as C×H×W uint8 at its own SIZE (an enlarged tile is
    read back at every k-th pixel)."""
    side = tile_side(grid, per_row)
    top, left = PAD + row * (side + PAD), PAD + col * (side + PAD)
    k = side // SIZE
    return grid[top:top + side:k, left:left + side:k].transpose(2, 0, 1)


def as_saved(pixels):
    """What save_image writes for [0, 1] pixels."""
    return (pixels * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()


def recon_pixels(recons_dir):
    """The snapshot's reconstructions in [0, 1] pixel space, as draw_pics should show them."""
    x = torch.load(Path(recons_dir) / "5_1200.pth")["x"]
    return denormalise(x, torch.tensor(MEAN), torch.tensor(STD))


def read_png(path):
    from PIL import Image
    return np.asarray(Image.open(path).convert("RGB"))


def test_needs_metrics_first(tmp_path):
    recons_dir = noisy_runs(tmp_path, [0.1] * 3).recons_dir
    with pytest.raises(UserError, match="run metrics.py with the same flags first"):
        draw(recons_dir)


def test_figure_alternates_reconstruction_and_training_rows(tmp_path, capsys):
    n, per_row = 7, 3
    runs = noisy_runs(tmp_path, [0.3] * n, log_rows=[[i, 0, i, 10.0 / (i + 1), 1.0 / (i + 1), 0, 0.01, i]
                                                     for i in range(20)])
    score(runs.recons_dir)
    paths = draw(runs.recons_dir, "--per_row", str(per_row))
    out_dir = Path(runs.recons_dir) / "metrics" / "5_1200"
    assert paths == [str(out_dir / "reconstruction.png"), str(out_dir / "loss_curve.png")]
    assert str(out_dir / "reconstruction.png") in capsys.readouterr().out
    grid = read_png(paths[0])
    rows = 2 * 3  # ceil(7 / 3) pairs of rows
    side = tile_side(grid, per_row)
    assert grid.shape == (PAD + rows * (side + PAD), PAD + per_row * (side + PAD), 3)
    recon_px = recon_pixels(runs.recons_dir)
    for i in range(n):
        pair, col = divmod(i, per_row)
        train_tile, recon_tile = as_saved(runs.pixels[i]), as_saved(recon_px[i])
        assert not np.array_equal(train_tile, recon_tile)  # so a swapped pair of rows would fail
        assert np.array_equal(tile(grid, 2 * pair, col, per_row), recon_tile)      # reconstruction above ...
        assert np.array_equal(tile(grid, 2 * pair + 1, col, per_row), train_tile)  # ... its training image
    assert (tile(grid, 5, 2, per_row) == 255).all()  # the short last row is padded with white
    assert read_png(paths[1]).shape[0] > 100  # a real matplotlib figure


def test_sort_by_ssim_puts_best_pair_first(tmp_path, capsys):
    noise = [0.9, 0.5, 0.05, 0.3]  # pair 2 is the best reconstruction, then 3, 1, 0
    runs = noisy_runs(tmp_path, noise)
    score(runs.recons_dir)
    paths = draw(runs.recons_dir, "--sort", "ssim")
    assert len(paths) == 1 and "no loss curve" in capsys.readouterr().out  # no log.csv here
    grid = read_png(paths[0])
    side = tile_side(grid, 10)  # the default 10 per row
    assert grid.shape[0] == PAD + 2 * (side + PAD)
    recon_px = recon_pixels(runs.recons_dir)
    for col, i in enumerate([2, 3, 1, 0]):
        assert np.array_equal(tile(grid, 0, col, 10), as_saved(recon_px[i]))
        assert np.array_equal(tile(grid, 1, col, 10), as_saved(runs.pixels[i]))


def test_matching_must_agree_with_metrics_run(tmp_path):
    recons_dir = noisy_runs(tmp_path, [0.1] * 3).recons_dir
    score(recons_dir)
    with pytest.raises(UserError, match="--matching hungarian"):
        draw(recons_dir, "--matching", "hungarian")


def test_reconstructions_that_beat_the_pool_are_framed_and_the_rest_drawn_as_before(tmp_path):
    """matched.pth's nearer_than_pool (metrics.py --null_pool): the marked reconstruction's tile has a green
    frame and its inside unchanged; the unmarked one and every training image are the images themselves."""
    runs = noisy_runs(tmp_path, [0.3, 0.3, 0.3])
    score(runs.recons_dir)
    path = Path(runs.recons_dir) / "metrics" / "5_1200" / "matched.pth"
    matched = torch.load(path)
    matched["nearer_than_pool"] = torch.tensor([True, False, False])
    torch.save(matched, path)
    grid = read_png(draw(runs.recons_dir, "--scale", "1")[0])
    recon_px = recon_pixels(runs.recons_dir)
    marked, unmarked = tile(grid, 0, 0, 10), tile(grid, 0, 1, 10)
    green = np.array(draw_pics.FRAME) * 255 + 0.5
    for edge in (marked[:, 0, :], marked[:, -1, :], marked[:, :, 0], marked[:, :, -1]):
        assert (edge.T == green.astype(np.uint8)).all()
    assert np.array_equal(marked[:, 1:-1, 1:-1], as_saved(recon_px[0])[:, 1:-1, 1:-1])
    assert np.array_equal(unmarked, as_saved(recon_px[1]))
    assert np.array_equal(tile(grid, 1, 0, 10), as_saved(runs.pixels[0]))
