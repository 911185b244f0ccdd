"""simudy/scoring.py: the SSIM matrix against skimage, matching against the paper's loop, the paper's average
SSIM, PSNR, and LPIPS (reported unavailable without AlexNet's weights, never downloaded)."""
import numpy as np
import pytest
import torch

from simudy.scoring import match_by_ssim, matched_ssim, paper_avg_ssim, psnr_per_pair, ssim_matrix
from tests.helpers import make_runs, paper_greedy, reference_avg_ssim, score, skimage_ssim

pytestmark = pytest.mark.usefixtures("empty_torch_home")


# ----------------------------------------------------------------------------------------------
# SSIM


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 64, 64)])
def test_ssim_matrix_equals_skimage(shape):
    gen = torch.Generator().manual_seed(1)
    train = torch.randn(3, *shape, generator=gen) * 2 + 0.3
    recons = 0.6 * train[[2, 0]] + 0.8 * torch.randn(2, *shape, generator=gen)  # correlated pairs
    ssim = ssim_matrix(train, recons)
    assert ssim.shape == (3, 2) and ssim.dtype == torch.float64
    for i in range(3):
        for j in range(2):
            assert abs(ssim[i, j].item() - skimage_ssim(train[i], recons[j])) <= 1e-5
    assert ssim[2, 0] > 0.3 and ssim[0, 1] > 0.3 and abs(ssim[1, 0]) < 0.1


def test_ssim_matrix_chunking_does_not_change_values():
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(ssim_matrix(x, x.flip(0), max_elements=1), ssim_matrix(x, x.flip(0)))
    assert torch.allclose(ssim_matrix(x, x).diagonal(), torch.ones(5, dtype=torch.float64))


def test_paper_avg_ssim_equals_skimage_and_the_paper_loop():
    """More reconstructions than training images, and fewer: unmatched training images count 0."""
    gen = torch.Generator().manual_seed(6)
    train = torch.randn(4, 3, 32, 32, generator=gen)
    recons = torch.cat([train[[3, 1]] + 0.7 * torch.randn(2, 3, 32, 32, generator=gen),
                        torch.randn(3, 3, 32, 32, generator=gen)])
    for r in (recons, recons[:2]):
        expected = reference_avg_ssim(train, r)
        assert paper_avg_ssim(train, r) == pytest.approx(expected, abs=1e-6)
    assert 0.1 < paper_avg_ssim(train, recons[:2]) < 0.5  # two good pairs of four, the rest count 0


# ----------------------------------------------------------------------------------------------
# Matching


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


@pytest.mark.parametrize("n,m", [(5, 5), (6, 3), (3, 6)])
def test_matched_ssim_equals_the_paper_loops_pairs(n, m):
    """Per image, the matched reconstruction's SSIM: the paper's greedy loop's pairs read off the matrix,
    0 for the images left without a reconstruction (n > m)."""
    ssim = torch.rand(n, m, generator=torch.Generator().manual_seed(n + 7 * m), dtype=torch.float64)
    expected = torch.zeros(n, dtype=torch.float64)
    for r, c in paper_greedy(ssim):
        expected[r] = ssim[r, c]
    assert torch.equal(matched_ssim(ssim), expected)
    assert int((matched_ssim(ssim) == 0).sum()) == max(0, n - m)


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
# PSNR


def test_psnr_per_pair_equals_numpy():
    gen = torch.Generator().manual_seed(7)
    a = torch.rand(3, 3, 8, 8, generator=gen)
    b = (a + 0.1 * torch.randn(a.shape, generator=gen)).clamp(0, 1)
    b[2] = a[2]  # an identical pair: capped at 100 dB
    mse, psnr = psnr_per_pair(a, b)
    diff = a.double().numpy() - b.double().numpy()
    want_mse = (diff ** 2).reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(mse.numpy(), want_mse, rtol=1e-12)
    np.testing.assert_allclose(psnr[:2].numpy(), 10 * np.log10(1 / want_mse[:2]), rtol=1e-12)
    assert psnr[2].item() == pytest.approx(100.0)
    _, psnr_peak2 = psnr_per_pair(2 * a[:2], 2 * b[:2], peak=2.0)  # PSNR is scale-free given the peak
    assert torch.allclose(psnr_peak2, psnr[:2])


# ----------------------------------------------------------------------------------------------
# LPIPS


def test_lpips_unavailable_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    recons_dir = make_runs(tmp_path, n=3).recons_dir
    result = score(recons_dir)
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
    recons_dir = make_runs(tmp_path, n=3, snapshot=lambda x: {
        "x": x + 0.5 * torch.randn(x.shape, generator=noise)}).recons_dir
    result = score(recons_dir)
    assert isinstance(result["lpips"], float) and np.isfinite(result["lpips"]) and result["lpips"] > 0
    # a corrupt file is reported, not raised
    (home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth").write_bytes(b"not a checkpoint")
    assert score(recons_dir)["lpips"].startswith("unavailable: could not load")
