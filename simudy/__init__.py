"""SimuDy: reconstruct a network's training images from its parameters before and after training.

One module per job (README: code map): simulate (the unrolled SGD), adjoint (the memory-flat reverse
pass), method (SimuDy's loss and iteration, the unknown-N ranking), baselines, loop (log, snapshots,
resume, stops), runs (run folders), target (the attacked model), search (unknown lr/bs), scoring (SSIM),
data (datasets), flags (the command-line flags) and api (`reconstruct`, for a model trained anywhere).
"""
from .api import Reconstruction, reconstruct
from .scoring import match_by_ssim, paper_avg_ssim, ssim_matrix

__all__ = ["Reconstruction", "reconstruct", "match_by_ssim", "paper_avg_ssim", "ssim_matrix"]
