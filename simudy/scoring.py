"""Scores of reconstructions against training images: the SSIM matrix, the paper's one-to-one matching
and average SSIM, PSNR and LPIPS (reported "unavailable: <reason>" when AlexNet's weights are absent)."""
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from .errors import UserError

SSIM_WINDOW = 7  # skimage's default win_size
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_GOOD = 0.4  # the paper's "well reconstructed" threshold
ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet file, which LPIPS builds on


def _box_mean(t):
    """7×7 mean over the 'valid' region of N×C×H×W; separable (two 1-D pools) because it is 3×
    faster than a 2-D pool. skimage reflect-pads then crops 3 pixels, which is exactly this region."""
    return F.avg_pool2d(F.avg_pool2d(t, (SSIM_WINDOW, 1), stride=1), (1, SSIM_WINDOW), stride=1)


def ssim_matrix(train_images, recons, max_elements=2 ** 22):
    """SSIM of every training image (N×C×H×W) with every reconstruction (M×C×H×W) -> float64 N×M.

    Equals skimage's structural_similarity defaults with channel_axis and data_range = the training
    image's max - min, as the paper code calls it on normalised images.
    """
    x, y = train_images.double(), recons.double()
    n_train, n_recons = len(x), len(y)
    cov_norm = SSIM_WINDOW ** 2 / (SSIM_WINDOW ** 2 - 1)  # skimage's sample covariance
    ux, uy = _box_mean(x), _box_mean(y)
    vx = cov_norm * (_box_mean(x * x) - ux * ux)
    vy = cov_norm * (_box_mean(y * y) - uy * uy)
    data_range = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(-1, 1, 1, 1, 1)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    out = torch.empty(n_train, n_recons, dtype=torch.float64, device=x.device)
    # Only the cross term needs all pairs; chunk over training images to bound memory.
    chunk = max(1, max_elements // y.numel())
    for s in range(0, n_train, chunk):
        xs, ux_s, vx_s = x[s:s + chunk, None], ux[s:s + chunk, None], vx[s:s + chunk, None]
        uxy = _box_mean((xs * y[None]).flatten(0, 1)).view(len(xs), n_recons, *uy.shape[1:])
        vxy = cov_norm * (uxy - ux_s * uy[None])
        num = (2 * ux_s * uy[None] + c1[s:s + chunk]) * (2 * vxy + c2[s:s + chunk])
        den = (ux_s ** 2 + uy[None] ** 2 + c1[s:s + chunk]) * (vx_s + vy[None] + c2[s:s + chunk])
        out[s:s + chunk] = (num / den).mean(dim=(2, 3, 4))  # channels are the same size: mean of means
    return out


def match_by_ssim(ssim, method="greedy"):
    """Pairs (train_idx, recon_idx), one per reconstruction or training image, whichever is fewer.

    greedy (paper): repeatedly take the largest remaining SSIM and drop its row and column.
    hungarian: the assignment maximising the total SSIM.
    """
    ssim = torch.as_tensor(ssim).cpu().numpy()
    if method == "hungarian":
        rows, cols = linear_sum_assignment(ssim, maximize=True)
        return [(int(r), int(c)) for r, c in zip(rows, cols)]
    if method != "greedy":
        raise UserError(f"unknown matching {method!r}; use greedy or hungarian")
    order = np.argsort(-ssim, axis=None, kind="stable")  # ties: first in row-major order, as the loop
    used_rows, used_cols, pairs = set(), set(), []
    rows, cols = np.unravel_index(order, ssim.shape)
    for r, c in zip(rows.tolist(), cols.tolist()):
        if r not in used_rows and c not in used_cols:
            used_rows.add(r)
            used_cols.add(c)
            pairs.append((r, c))
            if len(pairs) == min(ssim.shape):
                break
    return pairs


def label_agreement(train_labels, recon_labels, pairs):
    """Share of matched pairs (train_idx, recon_idx) whose reconstruction carries the training image's
    label: an attacker who learns an image's class has learned something even from a blurry image.
    None when the reconstructions have no labels."""
    if recon_labels is None or not pairs:
        return None
    train_labels, recon_labels = torch.as_tensor(train_labels).cpu(), torch.as_tensor(recon_labels).cpu()
    return sum(int(train_labels[t] == recon_labels[r]) for t, r in pairs) / len(pairs)


PSNR_MSE_FLOOR = 1e-10  # identical images: PSNR capped at 100 dB (peak 1), so metrics.json stays JSON


def psnr_per_pair(a, b, peak=1.0):
    """Per-image MSE and PSNR of two K×C×H×W tensors (capped at 100 dB for identical images)."""
    mse = F.mse_loss(a.double(), b.double(), reduction="none").flatten(1).mean(1)
    return mse, 10 * torch.log10(peak ** 2 / mse.clamp_min(PSNR_MSE_FLOOR))


def load_lpips(device):
    """(AlexNet LPIPS model, None) or (None, 'unavailable: <reason>'); never downloads."""
    try:
        import lpips
    except ImportError as err:
        return None, f"unavailable: lpips package not importable ({err}); pip install lpips"
    weights = os.path.join(torch.hub.get_dir(), "checkpoints", ALEXNET_WEIGHTS)
    if not os.path.isfile(weights):
        return None, f"unavailable: {weights} missing (torchvision AlexNet weights; copy it there)"
    try:
        with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=`
            warnings.simplefilter("ignore")
            # pnet_rand: build AlexNet without torchvision's download; we load the local file below.
            model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        # lpips keeps AlexNet's features as slices named slice<k>.<original index>.
        model.net.load_state_dict({k: state["features." + k.split(".", 1)[1]]
                                   for k in model.net.state_dict()})
    except Exception as err:  # a corrupt or foreign weights file must not end the evaluation
        return None, f"unavailable: could not load {weights} ({type(err).__name__}: {err})"
    return model.to(device).eval(), None


def lpips_mean(train_px, recons_px, device, batch=64):
    """Average AlexNet LPIPS of matched pairs given in [0, 1] pixel space, or 'unavailable: ...'."""
    height, width = train_px.shape[-2:]
    if min(height, width) < 31:  # AlexNet's pools shrink smaller images to nothing
        return f"unavailable: {height}x{width} images are too small for AlexNet LPIPS (needs >= 31 px)"
    model, reason = load_lpips(device)
    if model is None:
        return reason
    values = []
    with torch.no_grad():
        for s in range(0, len(train_px), batch):
            a, b = (t[s:s + batch].float().to(device) * 2 - 1 for t in (train_px, recons_px))
            if a.shape[1] == 1:
                a, b = a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)
            values.append(model(a, b).flatten().cpu())
    return float(torch.cat(values).mean())


def matched_ssim(ssim, method="greedy"):
    """Per training image (a row of the N x M SSIM matrix): the SSIM of the reconstruction matched to it,
    0 where none is (fewer reconstructions than images)."""
    matched = torch.zeros(ssim.shape[0], dtype=ssim.dtype, device=ssim.device)
    for r, c in match_by_ssim(ssim, method):
        matched[r] = ssim[r, c]
    return matched


def paper_avg_ssim(train_images, recons, method="greedy"):
    """The paper's number: SSIM matching, matched sum over the number of training images (unmatched count 0)."""
    return float(matched_ssim(ssim_matrix(train_images, recons), method).mean())


# ----------------------------------------------------------------------------------------------
# Is an SSIM evidence of memory? Two answers from images the network never trained on (metrics.py --null_pool)


NULL_DRAWS = 20  # disjoint draws from the pool averaged for the null baseline


def null_baseline(ssim_train_pool, train_labels, pool_labels, method="greedy"):
    """The paper's average SSIM of "reconstructions" that know the labels and the data's distribution but
    nothing of the training images: for each draw, as many pool images of each class as the training has,
    disjoint between draws (up to NULL_DRAWS). ssim_train_pool: the N x P SSIM matrix of the training images
    with the pool. Returns (mean, lowest, highest) over the draws, or None when some class has fewer pool
    images than the training has of it."""
    need = {int(c): int((train_labels == c).sum()) for c in train_labels.unique()}
    members = {c: (pool_labels == c).nonzero().flatten() for c in need}
    draws = min([len(members[c]) // k for c, k in need.items()] + [NULL_DRAWS])
    if draws < 1:
        return None
    scores = []
    for d in range(draws):
        chosen = torch.cat([members[c][d * k:(d + 1) * k] for c, k in need.items()])
        scores.append(float(matched_ssim(ssim_train_pool[:, chosen], method).mean()))
    return sum(scores) / len(scores), min(scores), max(scores)


def nearest_in_pool(matched_ssim, ssim_pool_recons):
    """Per matched reconstruction, its highest SSIM to any pool image (ssim_pool_recons: P x K, the pool as
    the reference side, as the training images are in the matching) and whether its own training image
    scores higher: a reconstruction nearer its training image than every image never trained on shows
    that image, not the class."""
    nearest = ssim_pool_recons.max(0).values
    return nearest, matched_ssim > nearest
