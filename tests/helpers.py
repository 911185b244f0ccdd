"""Plain helpers the test files share (fixtures are in conftest.py): running a stage in-process, the
one-line error check, fake train/recons run folders for metrics.py and draw_pics.py, and an independent
computation of the paper's average SSIM (skimage and the paper code's greedy loop) to check metrics by.

    from tests.helpers import run, one_line_error, make_runs
"""
import csv
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import torch

from tests.conftest import REPO_ROOT

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # the paper's CIFAR-10 normalisation
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)


def run(module, args):
    """One stage (train, recons, metrics or draw_pics) in this process, as from the command line."""
    return module.main(module.parse_args([str(a) for a in args]))


def run_script(script, *args, env=None, timeout=300):
    """A script of the repository (grid_search.sh through bash, a .py through this Python) as a subprocess,
    with string arguments; its CompletedProcess (text stdout and stderr)."""
    cmd = ["bash"] if script.endswith(".sh") else [sys.executable]
    return subprocess.run(cmd + [str(REPO_ROOT / script)] + [str(a) for a in args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(excinfo, *needles):
    """The raised error's message: not empty, one line, and containing every needle. Returns it."""
    message = str(excinfo.value)
    assert message, "empty error message"
    assert "\n" not in message and "\r" not in message, f"multi-line error: {message!r}"
    for needle in needles:
        assert needle in message, f"{needle!r} not in error {message!r}"
    return message


def log_rows(run_dir):
    """A run's log.csv as dicts."""
    with open(os.path.join(run_dir, "log.csv")) as f:
        return list(csv.DictReader(f))


def log_without_seconds(run_dir):
    """log.csv's lines split at commas, without the last (wall-time) column: what must replay exactly."""
    with open(os.path.join(run_dir, "log.csv")) as f:
        return [line.split(",")[:-1] for line in f.read().splitlines()]


def normalise(pixels, mean=MEAN, std=STD):
    return (pixels - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


@dataclass
class FakeRuns:
    pixels: torch.Tensor   # the training images in [0, 1]
    images: torch.Tensor   # the same, normalised (what train_subset.pth holds)
    labels: torch.Tensor
    recons_dir: str
    train_dir: str


def make_runs(tmp_path, n=6, shape=(3, 32, 32), snapshot=None, name="5_1200.pth", log_rows=None):
    """A fake training run (train_subset.pth) and reconstruction run (config.json + snapshot `name`).

    snapshot: function of the normalised training images -> the snapshot dict (default: an exact copy).
    log_rows: rows of a log.csv (iteration, epoch, step, total, cos, tv, lr, seconds) or None for none.
    """
    gen = torch.Generator().manual_seed(0)
    mean, std = (MEAN, STD) if shape[0] == 3 else (FASHION_MEAN, FASHION_STD)
    pixels = torch.rand(n, *shape, generator=gen)
    images = normalise(pixels, mean, std)
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
    return FakeRuns(pixels, images, labels, str(recons_dir), str(train_dir))


def snapshot_flags(recons_dir, *extra):
    """metrics.py / draw_pics.py flags naming make_runs' snapshot 5_1200.pth."""
    return ["--recons_dir", recons_dir, "--eval_epoch", "5", "--eval_step", "12", "--device", "cpu", *extra]


def score(recons_dir, *extra):
    """metrics.py on make_runs' snapshot, in this process; its result dict."""
    import metrics
    return metrics.main(metrics.parse_args(snapshot_flags(recons_dir, *extra)))


def paper_greedy(ssim):
    """The paper code's literal matching loop: take the global max, blank its row and column, repeat."""
    s = torch.as_tensor(ssim).clone()
    pairs = []
    for _ in range(min(s.shape)):
        r, c = divmod(int(torch.argmax(s)), s.shape[1])
        pairs.append((r, c))
        s[r, :] = -float("inf")
        s[:, c] = -float("inf")
    return pairs


def skimage_ssim(a, b):
    """skimage's SSIM of two C×H×W tensors as the paper code calls it (data_range of the first image)."""
    from skimage.metrics import structural_similarity
    a, b = (t.detach().double().permute(1, 2, 0).numpy() for t in (a, b))
    return structural_similarity(a, b, channel_axis=2, data_range=a.max() - a.min())


def reference_avg_ssim(train_images, recons):
    """The paper's average SSIM computed independently of simudy.scoring: skimage for every pair, the paper
    code's greedy loop, the matched sum over the number of training images."""
    ssim = torch.tensor([[skimage_ssim(t, r) for r in recons] for t in train_images], dtype=torch.float64)
    return sum(ssim[r, c].item() for r, c in paper_greedy(ssim)) / len(train_images)


def tiny_model(name, shape, width, seed=0, warm_batch=32):
    """A seeded model; a ResNet gets non-trivial BatchNorm running statistics (one train-mode forward of
    `warm_batch` random images), as after pretraining."""
    from models import build_model
    torch.manual_seed(seed)
    model = build_model(name, 10, shape, width=width)
    if name.startswith("resnet"):
        with torch.no_grad():
            model.train()
            model(torch.randn(warm_batch, *shape))
    return model


def load_benchmark(name):
    """benchmarks/<name>.py as a module (benchmarks/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
