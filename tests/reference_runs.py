"""Short seeded runs of every stage through the command-line entry points, reduced to digests: the
reference that pins "nothing a user sees changes" (tests/test_reference.py).

The reference file tests/reference/outputs.json was written by running this module on the main
branch before the package redesign (issue 13):

    .venv/bin/python -m tests.reference_runs --write

Each digest is the sha256 of a tensor's bytes (snapshots, labels, rankings) or of a file with its
wall-time column dropped (log.csv), plus the exact float values metrics.py writes. One thread, so the
order of floating-point reductions is fixed.
"""
import argparse
import csv
import hashlib
import io
import json
import os
import pathlib
import sys
import tempfile

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

REFERENCE = ROOT / "tests" / "reference" / "outputs.json"
# the kernels the reference was recorded with: float reductions, so digests hold only on the same ones
RECORDED_ON = ROOT / "tests" / "reference" / "recorded_on.json"
MLP = ["--dataset", "fashion_mnist", "--model_name", "mlp", "--width", "24", "--num_imgs_per_class", "1",
       "--bs", "5"]
RESNET = ["--dataset", "fashion_mnist", "--model_name", "resnet18", "--width", "4", "--num_imgs_per_class", "1",
          "--bs", "5"]
TRAIN = ["--lr", "0.05", "--epochs", "3"]
TINY_PRETRAIN = ["--pretrain_imgs", "4", "--pretrain_epochs", "1"]


def tensor_digest(t):
    t = torch.as_tensor(t).detach().cpu().contiguous()
    return f"{t.dtype}:{list(t.shape)}:" + hashlib.sha256(t.numpy().tobytes()).hexdigest()


def log_digest(path):
    """log.csv without its wall-time column."""
    with open(path) as f:
        rows = [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]
    out = io.StringIO()
    for r in rows:
        out.write(",".join(f"{k}={v}" for k, v in r.items()) + "\n")
    return hashlib.sha256(out.getvalue().encode()).hexdigest()


def snapshot_digests(run_dir):
    out = {}
    for name in sorted(os.listdir(run_dir)):
        if name.endswith(".pth") and name not in ("resume.pth",):
            snap = torch.load(os.path.join(run_dir, name), map_location="cpu", weights_only=False)
            if isinstance(snap, dict):
                out[name] = {k: tensor_digest(v) for k, v in sorted(snap.items()) if torch.is_tensor(v)}
                out[name].update({k: v for k, v in sorted(snap.items()) if isinstance(v, (int, float))})
                if "duals" in snap:
                    out[name].update({f"duals_{k}": tensor_digest(v) for k, v in sorted(snap["duals"].items())})
            else:
                out[name] = tensor_digest(snap)
    return out


def run_stage(module, argv):
    return module.main(module.parse_args([str(a) for a in argv]))


def reference_outputs(work_dir, data_root):
    """Run train -> recons (SimuDy fast with --num_dummy, SimuDy paper with the memory-flat pass on a tiny
    ResNet, the two baselines) -> metrics in work_dir and return every output's digest."""
    import metrics
    import recons
    import train
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    old = os.getcwd()
    os.chdir(work_dir)
    try:
        data = ["--data_root", str(data_root)]
        out = {}
        mlp_dir = run_stage(train, MLP + data + TRAIN)
        out["train_mlp"] = {k: tensor_digest(v) for k, v in
                            sorted(torch.load(os.path.join(mlp_dir, "theta_final.pth")).items())}
        runs = {
            "simudy_fast": MLP + data + ["--tlr", "0.05", "--preset", "fast", "--rec_epochs", "2",
                                         "--rec_steps_per_epoch", "3", "--save_every", "2", "--num_dummy", "12",
                                         # the reference predates the fast preset's class-balanced ranking
                                         "--ranking", "norm"],
            "simudy_paper": MLP + data + ["--tlr", "0.05", "--steps", "2", "--rec_epochs", "2",
                                          "--rec_steps_per_epoch", "3", "--save_every", "2", "--clip_norm", "0.5"],
            "one_step": MLP + data + ["--tlr", "0.05", "--method", "one_step", "--baseline_steps", "4",
                                      "--save_every", "2"],
            "two_step": MLP + data + ["--tlr", "0.05", "--method", "two_step", "--baseline_steps", "4",
                                      "--save_every", "2"],
        }
        res_dir = run_stage(train, RESNET + data + TRAIN + TINY_PRETRAIN)
        out["train_resnet"] = {k: tensor_digest(v) for k, v in
                               sorted(torch.load(os.path.join(res_dir, "theta_final.pth")).items())}
        runs["simudy_resnet_recompute"] = RESNET + data + ["--tlr", "0.05", "--steps", "2", "--rec_epochs", "1",
                                                           "--rec_steps_per_epoch", "3", "--save_every", "2",
                                                           "--backprop", "recompute"]
        for name, argv in runs.items():
            run_dir = run_stage(recons, argv)
            out[name] = {"folder": os.path.relpath(run_dir, work_dir), "log": log_digest(os.path.join(run_dir, "log.csv")),
                         "snapshots": snapshot_digests(run_dir)}
            if os.path.isfile(os.path.join(run_dir, "ranking.csv")):
                out[name]["ranking_csv"] = open(os.path.join(run_dir, "ranking.csv")).read()
        metric_runs = {
            "metrics_fast_top": MLP + data + ["--tlr", "0.05", "--preset", "fast", "--num_dummy", "12", "--top", "10"],
            "metrics_paper": MLP + data + ["--tlr", "0.05", "--steps", "2", "--snapshot", "last"],
            "metrics_one_step": MLP + data + ["--tlr", "0.05", "--linear", "1", "--snapshot", "last"],
        }
        for name, argv in metric_runs.items():
            result = run_stage(metrics, argv)
            out[name] = json.loads(json.dumps(result, default=str))
        return out
    finally:
        os.chdir(old)
        torch.set_num_threads(threads)


def cpu_vendor():
    """/proc/cpuinfo's vendor_id ("unknown" where there is none): oneDNN picks different convolution
    kernels on Intel and AMD CPUs of the same ATen capability (session 9: AVX512 on both, 10/10 digests
    differ)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "unknown")
    except OSError:
        return "unknown"


def kernels():
    """What decides the digests besides the code: torch's version and the CPU kernels it dispatches to."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_vendor": cpu_vendor()}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--write", action="store_true", help=f"write {REFERENCE.relative_to(ROOT)}")
    p.add_argument("--json_out", help="write the digests to this file (the test runs this module in a fresh process)")
    args = p.parse_args()
    from tests.conftest import make_idx_root
    with tempfile.TemporaryDirectory() as tmp:
        data_root = make_idx_root(pathlib.Path(tmp) / "fashion").root
        work = pathlib.Path(tmp) / "work"
        work.mkdir()
        out = reference_outputs(work, data_root)
    text = json.dumps(out, indent=1, sort_keys=True)
    if args.write:
        REFERENCE.parent.mkdir(parents=True, exist_ok=True)
        REFERENCE.write_text(text + "\n")
        RECORDED_ON.write_text(json.dumps(kernels(), indent=1) + "\n")
        print(f"wrote {REFERENCE}")
    elif args.json_out:
        pathlib.Path(args.json_out).write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
