"""Seconds per reconstruction iteration and peak memory of the two reverse passes.

Each (model, images, backprop) cell runs in its own process, so its peak is its own: process RSS on CPU
(getrusage ru_maxrss, includes the ~0.3 GB of an imported torch), torch.cuda.max_memory_allocated on CUDA.
theta0 is the model's initialisation with BN statistics from one train-mode pass and the target change
is random: neither changes the cost. Clipping is off (the paper clips only in the first 5 outer epochs).

    python benchmarks/memory.py                       # the README's table (CPU: ~17 min)
    python benchmarks/memory.py --images 20 120 --models resnet18
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]  # the project, and synthetic.py beside this script
from simudy.flags import pick_device  # noqa: E402
from simudy.method import reconstruction_loss_and_grad  # noqa: E402
from simudy.simulate import SGDConfig  # noqa: E402
from synthetic import synthetic_problem  # noqa: E402

MODELS = {  # name -> (build_model name, width, image shape)
    "mlp": ("mlp", 1000, (3, 32, 32)),
    "resnet18": ("resnet18", 16, (3, 32, 32)),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--images", nargs="+", type=int, default=[20, 60, 120, 500, 1000])
    p.add_argument("--backprops", nargs="+", default=["unrolled", "recompute"])
    p.add_argument("--bs", type=int, default=20, help="simulation batch size (same for all cells)")
    p.add_argument("--steps", type=int, default=8, help="simulated epochs")
    p.add_argument("--iterations", type=int, default=2, help="timed iterations after the warm-up")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed iterations before the timed ones")
    p.add_argument("--device", default="auto")
    p.add_argument("--max_rss_gb", type=float, default=20.0,
                   help="skip an unrolled cell whose peak, extrapolated linearly, would exceed this")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "memory.json"))
    p.add_argument("--one", nargs=3, metavar=("MODEL", "IMAGES", "BACKPROP"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_cell(model_key, num_images, backprop, args):
    """One measurement, in this process."""
    device = pick_device(args.device)
    name, width, shape = MODELS[model_key]
    model, theta0, buffers, weight_change, x, labels = synthetic_problem(name, width, shape, num_images, device)
    x.requires_grad_(True)
    sgd = SGDConfig(lr=0.01)

    def iteration():
        out = reconstruction_loss_and_grad(model, theta0, buffers, x, labels, weight_change, args.bs, args.steps,
                                           sgd, 1e-3, "cos", backprop)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    for _ in range(args.warmup):
        iteration()
    start = time.perf_counter()
    for _ in range(args.iterations):
        iteration()
    seconds = (time.perf_counter() - start) / args.iterations
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
        kind = "cuda max_memory_allocated"
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB
        kind = "process peak RSS"
    return {"model": model_key, "images": num_images, "backprop": backprop, "seconds_per_iteration": seconds,
            "peak_mb": peak_mb, "memory": kind, "device": str(device), "threads": torch.get_num_threads(),
            "simulated_steps": args.steps * -(-num_images // args.bs)}


def main(args):
    if args.one:
        print(json.dumps(run_cell(args.one[0], int(args.one[1]), args.one[2], args)))
        return None
    rows = []
    for model_key in args.models:
        for backprop in args.backprops:
            measured = []
            for n in args.images:
                if measured and backprop == "unrolled":  # extrapolate the growing graph before running
                    (n0, m0), (n1, m1) = (measured[0], measured[-1]) if len(measured) > 1 else ((0, 0), measured[0])
                    estimate = m1 + (m1 - m0) / max(n1 - n0, 1) * (n - n1)
                    if estimate / 1024 > args.max_rss_gb:
                        rows.append({"model": model_key, "images": n, "backprop": backprop,
                                     "skipped": f"est. {estimate / 1024:.0f} GB > {args.max_rss_gb:.0f} GB"})
                        print(f"{model_key:9s} {backprop:9s} {n:5d} skipped: {rows[-1]['skipped']}", flush=True)
                        continue
                cmd = [sys.executable, os.path.abspath(__file__), "--one", model_key, str(n), backprop,
                       "--bs", str(args.bs), "--steps", str(args.steps), "--iterations", str(args.iterations),
                       "--warmup", str(args.warmup),
                       "--device", args.device]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    rows.append({"model": model_key, "images": n, "backprop": backprop,
                                 "skipped": f"failed: {proc.stderr.strip().splitlines()[-1][:60]}"})
                    continue
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(row)
                measured.append((n, row["peak_mb"]))
                print(f"{model_key:9s} {backprop:9s} {n:5d} {row['seconds_per_iteration']:8.2f} s/it"
                      f" {row['peak_mb']:8.0f} MB", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print_table(rows)
    return rows


def print_table(rows):
    cells = {(r["model"], r["images"], r["backprop"]): r for r in rows}
    models = list(dict.fromkeys(r["model"] for r in rows))
    images = sorted({r["images"] for r in rows})
    print("\n| model | images | simulated steps | unrolled s/it | unrolled peak MB | recompute s/it"
          " | recompute peak MB | time ratio | memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in models:
        for n in images:
            u, r = cells.get((m, n, "unrolled"), {}), cells.get((m, n, "recompute"), {})
            steps = u.get("simulated_steps") or r.get("simulated_steps") or ""

            def fmt(c, key, spec):
                return c["skipped"] if "skipped" in c else (format(c[key], spec) if key in c else "")
            def ratio(key):
                return f"{r[key] / u[key]:.2f}" if key in u and key in r else ""
            secs = "seconds_per_iteration"
            print(f"| {m} | {n} | {steps} | {fmt(u, secs, '.2f')} | {fmt(u, 'peak_mb', '.0f')}"
                  f" | {fmt(r, secs, '.2f')} | {fmt(r, 'peak_mb', '.0f')} | {ratio(secs)} | {ratio('peak_mb')} |")


if __name__ == "__main__":
    main(parse_args())
