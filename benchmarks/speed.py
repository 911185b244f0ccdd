"""Seconds per SimuDy iteration of a ResNet under settings that should not change a number (issue 12,
deliverable 6): thread count, channels_last (NHWC) convolutions, oneDNN on or off. One iteration is
recons.py's unrolled pass: the simulated training, 1 - cos of the change, TV, and d loss / d images.

Each cell runs in its own process (the thread count is fixed before torch starts its pools) and saves
its image gradient, so the table also says how far each setting moves the numbers from the default at
the same thread count (max |difference| / max |gradient|; float order alone gives ~1e-6). A cell whose
process crashes is printed as such (channels_last does, in the backward, on an AVX2-only CPU).
theta0 is the model's initialisation with BN statistics from one train-mode pass and the target change
is random: neither changes the cost. --profile prints the ops that take the time, default setting.

    python benchmarks/speed.py                                  # E's shape: 10 images, bs 10, 20 epochs
    python benchmarks/speed.py --images 20 --bs 20 --width 32   # B32's
    python benchmarks/speed.py --profile
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile as torch_profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]  # the project, and synthetic.py beside this script
from simudy.flags import pick_device  # noqa: E402
from simudy.method import reconstruction_loss_and_grad  # noqa: E402
from simudy.simulate import SGDConfig  # noqa: E402
from synthetic import synthetic_problem  # noqa: E402

# default: as recons.py runs (NCHW, oneDNN on); channels_last: images and 4-d weights in NHWC memory format;
# no_onednn: torch.backends.mkldnn.enabled = False (ATen's own convolutions)
SETTINGS = ("default", "channels_last", "no_onednn")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--images", type=int, default=10)
    p.add_argument("--bs", type=int, default=10)
    p.add_argument("--steps", type=int, default=20, help="simulated epochs")
    p.add_argument("--iterations", type=int, default=3, help="timed iterations after one warm-up")
    p.add_argument("--device", default="auto")
    p.add_argument("--profile", action="store_true", help="profile one iteration (default setting) and exit")
    p.add_argument("--out", default=None, help="also write the table's rows to this JSON file")
    p.add_argument("--one", nargs=3, metavar=("SETTING", "THREADS", "GRAD_FILE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_iteration(setting, args):
    """A function that runs one reconstruction iteration and returns d loss / d images."""
    if setting == "no_onednn":
        torch.backends.mkldnn.enabled = False
    device = pick_device(args.device)
    model, theta0, buffers, weight_change, x, labels = synthetic_problem("resnet18", args.width, (3, 32, 32),
                                                                         args.images, device)
    if setting == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        theta0 = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
                  for k, v in theta0.items()}
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    sgd = SGDConfig(lr=0.01)

    def iteration():
        out = reconstruction_loss_and_grad(model, theta0, buffers, x, labels, weight_change, args.bs, args.steps,
                                           sgd, 2e-2, "cos", "unrolled")
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out[3]

    return iteration


def run_cell(setting, threads, grad_file, args):
    torch.set_num_threads(threads)
    iteration = build_iteration(setting, args)
    grad = iteration()  # warm-up (oneDNN primitive caches, allocator)
    start = time.perf_counter()
    for _ in range(args.iterations):
        grad = iteration()
    seconds = (time.perf_counter() - start) / args.iterations
    torch.save(grad.detach().cpu().contiguous(), grad_file)
    print(json.dumps({"seconds": seconds}))


def profile(args):
    iteration = build_iteration("default", args)
    iteration()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        iteration()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


# signals of a crash inside the cell's own code (a setting's kernels), as opposed to a kill from outside
CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGABRT, signal.SIGFPE}


def measure(setting, threads, grad_file, args):
    """Seconds per iteration of one cell, run in its own process, which saves its image gradient to
    grad_file; None when that process crashes (SIGSEGV, ...), so a crashing setting does not end the table; a
    SIGKILL (out of memory) stops the table with a one-line error."""
    cmd = [sys.executable, os.path.abspath(__file__), "--one", setting, str(threads), grad_file,
           "--width", str(args.width), "--images", str(args.images), "--bs", str(args.bs),
           "--steps", str(args.steps), "--iterations", str(args.iterations), "--device", args.device]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if -out.returncode in CRASH_SIGNALS:  # channels_last's backward crashes on AVX2-only CPUs (torch 2.14.1)
        return None
    if out.returncode < 0:  # SIGKILL is the kernel's out-of-memory killer (or a user), not a crash of the setting
        raise SystemExit(f"cell {setting}/{threads} was killed by {signal.Signals(-out.returncode).name}: out of "
                         f"memory? use a smaller --width or fewer --images")
    if out.returncode:
        raise SystemExit(f"cell {setting}/{threads} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main(args):
    if args.one:
        return run_cell(args.one[0], int(args.one[1]), args.one[2], args)
    if args.profile:
        return profile(args)
    print(f"ResNet-18 w{args.width}, {args.images} images, bs {args.bs}, {args.steps} simulated epochs, "
          f"unrolled pass, {args.iterations} timed iterations per cell (torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()})")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for threads in args.threads:
            reference = None
            for setting in args.settings:
                grad_file = os.path.join(tmp, f"{setting}_{threads}.pt")
                seconds = measure(setting, threads, grad_file, args)
                if seconds is None:
                    rows.append({"setting": setting, "threads": threads, "seconds": None})
                    continue
                grad = torch.load(grad_file)
                if reference is None:
                    reference = (seconds, grad)
                rel = float((grad - reference[1]).abs().max() / reference[1].abs().max())
                rows.append({"setting": setting, "threads": threads, "seconds": seconds,
                             "speedup": reference[0] / seconds, "grad_rel_diff": rel})
    print("\n| setting | threads | s / iteration | vs first setting | gradient rel. difference |")
    print("|---|---|---|---|---|")
    for r in rows:
        if r["seconds"] is None:
            print(f"| {r['setting']} | {r['threads']} | crashed (SEGV, ABRT or another crash signal: a torch crash on this CPU) | | |")
            continue
        print(f"| {r['setting']} | {r['threads']} | {r['seconds']:.3f} | {r['speedup']:.2f}x | "
              f"{r['grad_rel_diff']:.1e} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(parse_args())
