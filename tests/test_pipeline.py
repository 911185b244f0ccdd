"""End to end on tiny fake data: train -> recons -> metrics -> draw_pics, the seed README's command lines,
resume equivalence, and the one-line errors for bad input."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import draw_pics
import metrics
import recons
import train
from utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RESNET = ["--width", "4", "--pretrain_imgs", "5", "--pretrain_epochs", "1"]
FAST_RECONS = ["--rec_epochs", "2", "--rec_steps_per_epoch", "3", "--save_every", "2"]


def run(module, args):
    return module.main(module.parse_args([str(a) for a in args]))


def one_line_error(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.fixture
def cifar_cwd(cifar10_root, in_tmp_cwd):
    """A working directory whose ./data is the fake CIFAR-10 (the paper's default --data_root)."""
    os.symlink(cifar10_root, "data")
    return in_tmp_cwd


def test_end_to_end_resnet_on_cifar_layout(cifar_cwd):
    flags = ["--num_imgs_per_class", 2, "--bs", 20] + TINY_RESNET[:2]
    train_dir = run(train, flags + ["--lr", 1e-2] + TINY_RESNET[2:])
    config = json.load(open(os.path.join(train_dir, "config.json")))
    assert config["data"]["image_shape"] == [3, 32, 32] and config["data"]["num_images"] == 20
    assert config["theta0"].startswith("./ckpts/pretrained/")  # ResNets start pretrained, not random
    subset = torch.load(os.path.join(train_dir, "train_subset.pth"))
    assert subset["labels"].bincount().tolist() == [2] * 10
    theta0 = torch.load(os.path.join(train_dir, "theta0.pth"))
    theta_final = torch.load(os.path.join(train_dir, "theta_final.pth"))
    assert not torch.equal(theta0["linear.weight"], theta_final["linear.weight"])
    # eval-mode BN (paper): running statistics untouched by the fine-tuning
    assert torch.equal(theta0["bn1.running_mean"], theta_final["bn1.running_mean"])

    recons_dir = run(recons, flags + ["--tlr", 1e-2] + FAST_RECONS)
    files = set(os.listdir(recons_dir))
    assert {"0_0.pth", "0_2.pth", "1_0.pth", "1_2.pth", "labels.pth", "log.csv", "config.json"} <= files
    snap = torch.load(os.path.join(recons_dir, "1_2.pth"))
    assert snap["x"].shape == (20, 3, 32, 32) and snap["labels"].bincount().tolist() == [2] * 10
    log = open(os.path.join(recons_dir, "log.csv")).read().splitlines()
    assert len(log) == 1 + 6 and log[0] == ",".join(recons.LOG_FIELDS)

    result = run(metrics, flags + ["--tlr", 1e-2, "--snapshot", "last"])
    assert result["n_train"] == 20 and -1 <= result["avg_ssim"] <= 1
    out_dir = os.path.join(recons_dir, "metrics", "1_2")
    assert os.path.isfile(os.path.join(out_dir, "per_image.csv"))
    paths = run(draw_pics, flags + ["--tlr", 1e-2, "--snapshot", "last", "--sort", "ssim"])
    grid = Image.open(paths[0])
    assert grid.size == (10 * 34 + 2, 4 * 34 + 2)  # 2 pairs of rows of 10 tiles of 32 px + 2 px padding
    assert os.path.isfile(os.path.join(out_dir, "loss_curve.png"))


def test_seed_readme_commands_start(cifar_cwd):
    """The seed README's command lines, verbatim plus a tiny width (and short runs so the test is fast)."""
    seed = [
        "train.py --num_imgs_per_class 2 --lr 1e-2 --bs 20",
        "recons.py --num_imgs_per_class 2 --tlr 1e-2 --bs 20 --rec_lr 1e-2",
        "metrics.py --num_imgs_per_class 2 --tlr 1e-2 --rlr 1e-2 --bs 20 --rbs 20 --linear 0 --rec_lr 1e-2"
        " --eval_epoch 10 --eval_step 10",
        "draw_pics.py --num_imgs_per_class 2 --tlr 1e-2 --rlr 1e-2 --bs 20 --rbs 20 --linear 0 --rec_lr 1e-2"
        " --eval_epoch 10 --eval_step 10",
    ]
    modules = {"train.py": train, "recons.py": recons, "metrics.py": metrics, "draw_pics.py": draw_pics}
    extra = {"train.py": TINY_RESNET, "recons.py": ["--width", 4, "--max_iterations", 2]}
    recons_dir = None
    for line in seed:
        script, *args = line.split()
        if script == "metrics.py":  # the seed asks for epoch 10 step 1000; stand in the first snapshot
            shutil.copy(os.path.join(recons_dir, "0_0.pth"), os.path.join(recons_dir, "10_1000.pth"))
        out = run(modules[script], args + extra.get(script, ["--width", 4]))
        if script == "recons.py":
            recons_dir = out
            config = json.load(open(os.path.join(out, "config.json")))
            assert config["rlr"] == 0.01 and config["rbs"] == 20 and config["args"]["steps"] == 8
            assert config["args"]["rec_epochs"] == 20 and config["args"]["rec_steps_per_epoch"] == 1500
    assert os.path.isfile(os.path.join(recons_dir, "metrics", "10_1000", "reconstruction.png"))

    # bash grid_search.sh (two candidates), then the recons line with the suggested values
    env = dict(os.environ, PYTHON=sys.executable, LR_LIST="0.02 0.03", BS_LIST="20",
               ARGS="--num_imgs_per_class 2 --tlr 1e-2 --bs 20 --steps 1 --rec_lr 1e-2 --width 4")
    proc = subprocess.run(["bash", os.path.join(ROOT, "grid_search.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    best = json.load(open("ckpts/grid_search/grid_search.json"))["best"]
    losses = [c["final_loss"] for c in json.load(open("ckpts/grid_search/grid_search.json"))["candidates"]]
    assert best["final_loss"] == min(losses) and "suggested: --rlr" in proc.stdout
    out = run(recons, ["--num_imgs_per_class", 2, "--tlr", 1e-2, "--bs", 20, "--rec_lr", 1e-2,
                       "--rlr", best["rlr"], "--rbs", best["rbs"], "--width", 4, "--max_iterations", 1])
    assert json.load(open(os.path.join(out, "config.json")))["rlr"] == best["rlr"]


def test_resume_ends_identical(fashion_root, in_tmp_cwd):
    flags = ["--dataset", "fashion_mnist", "--data_root", fashion_root, "--model_name", "mlp", "--width", 32,
             "--num_imgs_per_class", 1, "--bs", 4]
    run(train, flags + ["--lr", 0.05, "--epochs", 3])
    common = flags + ["--tlr", 0.05, "--steps", 2, "--rec_epochs", 2, "--rec_steps_per_epoch", 4,
                      "--save_every", 2, "--clip_epochs", 1]
    full = run(recons, common + ["--recons_dir", "full"])
    run(recons, common + ["--recons_dir", "split", "--max_iterations", 3])
    assert not os.path.isfile("split/1_3.pth")
    with pytest.raises(UserError) as excinfo:  # a second start must not overwrite silently
        run(recons, common + ["--recons_dir", "split"])
    one_line_error(excinfo, "--overwrite", "--resume")
    split = run(recons, common + ["--recons_dir", "split", "--resume"])
    a, b = torch.load(os.path.join(full, "1_3.pth")), torch.load(os.path.join(split, "1_3.pth"))
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["labels"], b["labels"])
    log_full = [r.split(",")[:-1] for r in open(os.path.join(full, "log.csv")).read().splitlines()]  # not seconds
    log_split = [r.split(",")[:-1] for r in open(os.path.join(split, "log.csv")).read().splitlines()]
    assert log_full == log_split and len(log_full) == 9  # same losses, no duplicated rows


@pytest.fixture
def mlp_run(fashion_root, in_tmp_cwd):
    flags = ["--dataset", "fashion_mnist", "--data_root", fashion_root, "--model_name", "mlp", "--width", 16,
             "--num_imgs_per_class", 1, "--bs", 5]
    train_dir = run(train, flags + ["--lr", 0.05, "--epochs", 1])
    return flags, train_dir


def test_bad_inputs_give_one_line_errors(mlp_run, empty_dir, offline, monkeypatch):
    flags, train_dir = mlp_run
    recons_flags = flags + ["--tlr", 0.05, "--rec_epochs", 1, "--rec_steps_per_epoch", 2]
    with pytest.raises(UserError) as e:  # missing dataset, offline
        run(train, ["--data_root", empty_dir, "--model_name", "mlp"])
    one_line_error(e, "cifar10", "--data_root")
    with pytest.raises(UserError) as e:
        run(train, flags + ["--lr", 0.05, "--model_name", "transformer"])
    one_line_error(e, "transformer", "resnet18", "mlp")
    with pytest.raises(UserError) as e:  # training run of other flags does not exist
        run(recons, recons_flags + ["--bs", 7])
    one_line_error(e, "config.json", "run the training")

    os.rename(os.path.join(train_dir, "theta_final.pth"), "moved.pth")
    with pytest.raises(UserError) as e:
        run(recons, recons_flags)
    one_line_error(e, "theta_final", "not found")
    os.rename("moved.pth", os.path.join(train_dir, "theta_final.pth"))

    other = train.build_model("mlp", 10, (1, 28, 28), 8).state_dict()  # another width
    torch.save(other, os.path.join(train_dir, "theta0.pth"))
    with pytest.raises(UserError) as e:
        run(recons, recons_flags)
    one_line_error(e, "another architecture")


def test_nan_loss_stops_and_keeps_last_snapshot(mlp_run, monkeypatch):
    flags, _ = mlp_run
    real = recons.reconstruction_loss_and_grad
    calls = {"n": 0}

    def nan_after_three(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        return (out[0] * float("nan"),) + out[1:] if calls["n"] > 3 else out
    monkeypatch.setattr(recons, "reconstruction_loss_and_grad", nan_after_three)
    with pytest.raises(UserError) as e:
        run(recons, flags + ["--tlr", 0.05, "--rec_epochs", 1, "--rec_steps_per_epoch", 10, "--save_every", 2])
    message = one_line_error(e, "nan", "epoch 0 step 3", "0_2.pth")
    assert "lower --rec_lr" in message
    recons_dir = message.split("snapshot is ")[1].split(";")[0].rsplit("/", 1)[0]
    assert sorted(f for f in os.listdir(recons_dir) if f.endswith(".pth") and f[0].isdigit()) == \
        ["0_0.pth", "0_2.pth"]


def test_missing_snapshot_lists_available(mlp_run):
    flags, _ = mlp_run
    run(recons, flags + ["--tlr", 0.05, "--rec_epochs", 1, "--rec_steps_per_epoch", 2, "--save_every", 1])
    with pytest.raises(UserError) as e:
        run(metrics, flags + ["--tlr", 0.05, "--eval_epoch", 10, "--eval_step", 10])
    one_line_error(e, "10_1000.pth not found", "0_0, 0_1", "--eval_epoch")


def test_scripts_exit_with_one_line_message(mlp_run):
    """From the shell: exit code 2 and a single 'error:' line, no traceback."""
    flags, _ = mlp_run
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "recons.py")] + [str(f) for f in flags] +
                          ["--tlr", "0.05", "--bs", "9"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("parallel", [{"JOBS": "2"}, {"GPUS": "0,1"}])
def test_grid_search_in_parallel(cifar_cwd, parallel):
    """JOBS=2 splits the cores between two workers; GPUS=0,1 gives each worker one device through
    CUDA_VISIBLE_DEVICES (recorded in each run's config.json). Same table as a sequential sweep."""
    run(train, ["--num_imgs_per_class", 1, "--bs", 10, "--lr", 1e-2] + TINY_RESNET)
    env = dict(os.environ, PYTHON=sys.executable, LR_LIST="0.02 0.03 0.01", BS_LIST="10", **parallel,
               ARGS="--num_imgs_per_class 1 --tlr 1e-2 --bs 10 --steps 1 --rec_lr 1e-2 --width 4 --device cpu")
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run(["bash", os.path.join(ROOT, "grid_search.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "3 short runs, 2 at a time" in proc.stdout
    configs = {lr: json.load(open(f"ckpts/grid_search/rlr{lr}_rbs10/config.json")) for lr in ("0.02", "0.03", "0.01")}
    assert all(os.path.isfile(f"ckpts/grid_search/rlr{lr}_rbs10.log") for lr in configs)
    if "GPUS" in parallel:  # worker 0 takes candidates 0 and 2, worker 1 candidate 1
        assert [configs[lr]["cuda_visible_devices"] for lr in ("0.02", "0.03", "0.01")] == ["0", "1", "0"]
    else:
        assert all(c["cpu_threads"] == max(1, len(os.sched_getaffinity(0)) // 2) for c in configs.values())
    table = json.load(open("ckpts/grid_search/grid_search.json"))["candidates"]
    assert len(table) == 3 and table[0]["final_loss"] == min(c["final_loss"] for c in table)


def test_grid_search_through_submitit_local(cifar_cwd):
    """LAUNCHER=submitit in submitit's local mode (the SLURM path's stand-in): one job per candidate, the
    same table; a failing candidate is reported and makes the sweep exit 1."""
    pytest.importorskip("submitit")
    run(train, ["--num_imgs_per_class", 1, "--bs", 10, "--lr", 1e-2] + TINY_RESNET)
    env = dict(os.environ, PYTHON=sys.executable, LR_LIST="0.02 0.01", BS_LIST="10", LAUNCHER="submitit",
               SUBMITIT_CLUSTER="local",
               ARGS="--num_imgs_per_class 1 --tlr 1e-2 --bs 10 --steps 1 --rec_lr 1e-2 --width 4 --device cpu")
    proc = subprocess.run(["bash", os.path.join(ROOT, "grid_search.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "submitted 2 local jobs" in proc.stdout
    table = json.load(open("ckpts/grid_search/grid_search.json"))["candidates"]
    assert sorted(c["rlr"] for c in table) == [0.01, 0.02]
    assert os.path.isdir("ckpts/grid_search/submitit")
    # flags naming no training run (another width): every job fails, the sweep says so and exits 1
    env["ARGS"] = env["ARGS"].replace("--width 4", "--width 8")
    proc = subprocess.run(["bash", os.path.join(ROOT, "grid_search.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and "failed" in proc.stderr
