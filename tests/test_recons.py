"""recons.py, the command line: the same reconstruction from a train.py run folder or from two state_dict
files (--theta0/--theta_final), and the one-line errors for flags and run folders that cannot work."""
import json
import os

import pytest
import torch

import recons
import train
from models import build_model
from simudy.errors import UserError
from simudy.runs import AUTO
from simudy.search import change_agreement
from simudy.target import load_training_run
from tests.helpers import log_rows, log_without_seconds, one_line_error, run, run_script

SHORT = ["--tlr", 0.05, "--steps", 1, "--rec_epochs", 1, "--rec_steps_per_epoch", 3, "--save_every", 0]


def test_state_dict_files_reconstruct_as_the_run_folder(mlp_run):
    """--theta0 FILE --theta_final FILE with the flags describing the model and its training: the same
    dummies and losses as from train.py's run folder."""
    from_folder = run(recons, mlp_run.flags + SHORT)
    files = ["--theta0", os.path.join(mlp_run.train_dir, "theta0.pth"),
             "--theta_final", os.path.join(mlp_run.train_dir, "theta_final.pth"),
             "--image_shape", 1, 28, 28, "--num_classes", 10, "--epochs", 1, "--recons_dir", "from_files"]
    from_files = run(recons, ["--model_name", "mlp", "--width", 16, "--bs", 5, "--num_images", 10] + SHORT + files)
    assert from_files == "from_files"
    a, b = (torch.load(os.path.join(d, "0_2.pth")) for d in (from_folder, from_files))
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["labels"], b["labels"])
    assert log_without_seconds(from_folder) == log_without_seconds(from_files)


def test_bad_training_runs_give_one_line_errors(mlp_run):
    flags, train_dir = mlp_run
    recons_flags = flags + ["--tlr", 0.05, "--rec_epochs", 1, "--rec_steps_per_epoch", 2]
    with pytest.raises(UserError) as e:  # training run of other flags does not exist
        run(recons, recons_flags + ["--bs", 7])
    one_line_error(e, "config.json", "run the training")

    os.rename(os.path.join(train_dir, "theta_final.pth"), "moved.pth")
    with pytest.raises(UserError) as e:
        run(recons, recons_flags)
    one_line_error(e, "theta_final", "not found")
    os.rename("moved.pth", os.path.join(train_dir, "theta_final.pth"))

    other = build_model("mlp", 10, (1, 28, 28), 8).state_dict()  # another width
    torch.save(other, os.path.join(train_dir, "theta0.pth"))
    with pytest.raises(UserError) as e:
        run(recons, recons_flags)
    one_line_error(e, "another architecture")


@pytest.mark.parametrize("extra,needle", [(["--method", "one_step", "--rlr", AUTO], "drop them for --method"),
                                          (["--rbs", AUTO, "--resume"], "pass the chosen --rlr/--rbs"),
                                          (["--coarse", -4], "resolution >= 1"),
                                          (["--coarse", 8, "--method", "two_step"], "SimuDy only"),
                                          (["--coarse", 8, "--grid_search", 1], "drop --coarse"),
                                          (["--pyramid", 1], "2 or more levels"),
                                          (["--preset", "resnet", "--coarse", 8], "pass --pyramid 0 with --coarse"),
                                          (["--decorrelate_colours", "--coarse", 8], "with --decorrelate_colours"),
                                          (["--chroma_tv", -1], "pass a weight >= 0"),
                                          (["--chroma_tv", 0.1, "--method", "one_step"], "for SimuDy only"),
                                          (["--smooth_sigma", -0.1], "a noise std >= 0"),
                                          (["--smooth_sigma", 0.3, "--smooth_until", 0], "a share of the run in"),
                                          (["--bn_prior", 1e-3, "--bn_prior_floor", -1], "a level >= 0"),
                                          (["--bn_prior_floor", 20], "pass --bn_prior W")])
def test_auto_conflicts_are_one_line_errors(extra, needle):
    with pytest.raises(UserError, match=needle) as e:  # before any file is read
        run(recons, ["--model_name", "mlp"] + extra)
    one_line_error(e)


def test_coarse_not_below_the_image_size_is_a_one_line_error(mlp_run):
    with pytest.raises(UserError, match="not below the images' 28 px") as e:
        run(recons, mlp_run.flags + ["--tlr", 0.05, "--coarse", 28])
    one_line_error(e, "--coarse 0")


def test_pyramid_with_too_many_levels_is_a_one_line_error(mlp_run):
    with pytest.raises(UserError, match="under 2 pixels on the images' 28 px") as e:
        run(recons, mlp_run.flags + ["--tlr", 0.05, "--pyramid", 6])
    one_line_error(e, "fewer levels")


def test_decorrelated_colours_on_grey_images_is_a_one_line_error(mlp_run):
    with pytest.raises(UserError, match="needs 3-channel images, these have 1") as e:
        run(recons, mlp_run.flags + ["--tlr", 0.05, "--decorrelate_colours"])
    one_line_error(e, "drop it")


def test_chroma_tv_on_grey_images_is_a_one_line_error(mlp_run):
    with pytest.raises(UserError, match="--chroma_tv needs 3-channel images, these have 1") as e:
        run(recons, mlp_run.flags + ["--tlr", 0.05, "--chroma_tv", 0.1])
    one_line_error(e, "drop it")


def test_scripts_exit_with_one_line_message(mlp_run):
    """From the shell: exit code 2 and a single 'error:' line, no traceback."""
    proc = run_script("recons.py", *mlp_run.flags, "--tlr", "0.05", "--bs", "9", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_grid_search_short_run_moves_the_images_with_pyramid_on(mlp_run):
    """--preset resnet sets --pyramid; --grid_search's short run ignores it and moves the images themselves
    (with the pyramid set up there, Adam would hold no tensor that gets a gradient and nothing would move)."""
    recons_dir = run(recons, mlp_run.flags + ["--tlr", 0.05, "--grid_search", 1, "--pyramid", 2, "--steps", 1,
                                              "--max_iterations", 3, "--recons_dir", "short"])
    totals = [float(r["total"]) for r in log_rows(recons_dir)]
    assert len(totals) == 3 and totals[2] != totals[0]


def test_init_snapshot_starts_where_the_snapshot_left(mlp_run):
    """--init_snapshot FILE: two paths to the same loss. A run started from an earlier run's snapshot 0_1
    scores, at its first iteration, what that earlier run scored at its iteration 2 (the loss of the images
    after iteration 1's step); with --rec_lr 0 its images stay the snapshot's, and its labels are the
    snapshot's even under another seed. Files that cannot be a start are one-line errors."""
    common = mlp_run.flags + ["--tlr", 0.05, "--steps", 1, "--rec_epochs", 1, "--save_every", 1]
    source = run(recons, common + ["--rec_steps_per_epoch", 3, "--recons_dir", "source"])
    start = os.path.join(source, "0_1.pth")
    cont = run(recons, common + ["--rec_steps_per_epoch", 2, "--seed", 1, "--rec_lr", 0, "--init_snapshot", start,
                                 "--recons_dir", "cont"])
    assert float(log_rows(cont)[0]["cos"]) == pytest.approx(float(log_rows(source)[2]["cos"]), rel=1e-5)
    snap, ended = torch.load(start), torch.load(os.path.join(cont, "0_1.pth"))
    assert torch.equal(ended["x"], snap["x"]) and torch.equal(ended["labels"], snap["labels"])
    seed1 = run(recons, common + ["--rec_steps_per_epoch", 1, "--seed", 1, "--recons_dir", "seed1"])
    assert not torch.equal(torch.load(os.path.join(seed1, "0_0.pth"))["labels"], snap["labels"])
    for flags, needles in ((["--init_snapshot", "missing.pth", "--recons_dir", "a"], ("no such file",)),
                           (["--init_snapshot", start], ("--recons_dir",)),
                           (["--init_snapshot", start, "--restarts", 2, "--recons_dir", "b"], ("--restarts",)),
                           (["--init_snapshot", start, "--num_dummy", 12, "--recons_dir", "c"], ("(12, 1, 28, 28)",
                                                                                               "--num_dummy"))):
        with pytest.raises(UserError) as excinfo:
            run(recons, common + ["--rec_steps_per_epoch", 1] + flags)
        one_line_error(excinfo, "--init_snapshot", *needles)


def test_resnet_preset_decorrelates_colour_images_and_leaves_grey_ones_in_rgb(mlp_run, cifar_cwd, capsys):
    """--preset resnet on grey images (mlp_run's Fashion-MNIST-like data): the colour flags are off, recons.py
    says so and config.json records them off; on 3-channel images (cifar_cwd) the run moves decorrelated
    colour levels and logs the chroma TV it adds to the loss."""
    short = ["--tlr", 0.05, "--preset", "resnet", "--bn_prior", 0, "--max_iterations", 2]  # an MLP: no BN
    grey = run(recons, mlp_run.flags + short + ["--recons_dir", os.path.abspath("grey")])
    args = json.load(open(os.path.join(grey, "config.json")))["args"]
    assert (args["decorrelate_colours"], args["chroma_tv"], args["pyramid"]) == (False, 0.0, 3)
    assert "--decorrelate_colours, --chroma_tv off here" in capsys.readouterr().out
    assert "chroma_tv" not in log_rows(grey)[0]
    flags = ["--model_name", "mlp", "--width", 8, "--num_imgs_per_class", 1, "--bs", 5]
    run(train, flags + ["--lr", 0.05, "--epochs", 1])
    colour = run(recons, flags + short + ["--recons_dir", "colour"])
    args = json.load(open(os.path.join(colour, "config.json")))["args"]
    assert (args["decorrelate_colours"], args["chroma_tv"]) == (True, 0.02)
    assert "off here" not in capsys.readouterr().out
    assert all(float(r["chroma_tv"]) > 0 for r in log_rows(colour))
    assert sorted(k for k in torch.load(os.path.join(colour, "resume.pth")) if "level" in k) == \
        ["colour_level0", "colour_level1", "colour_level2"]


def test_steps_epochs_simulates_all_epochs_after_the_first_outer_epochs(fashion_root, in_tmp_cwd):
    """--steps 1 --steps_epochs 1 on a 3-epoch training: two paths to each logged 1 - cos. Every iteration's
    logged match equals the change simulated directly (simudy.search.change_agreement) on the previous
    snapshot's images, over 1 epoch in the first outer epoch and over the training's 3 in the second (which
    differ, so the test sees the switch). Values that cannot work are one-line errors."""
    flags = ["--dataset", "fashion_mnist", "--data_root", fashion_root, "--model_name", "mlp", "--width", 16,
             "--num_imgs_per_class", 1, "--bs", 5]
    train_dir = run(train, flags + ["--lr", 0.05, "--epochs", 3])
    common = flags + ["--tlr", 0.05, "--steps", 1, "--rec_epochs", 2, "--rec_steps_per_epoch", 2, "--clip_epochs", 0,
                      "--save_every", 1]
    recons_dir = run(recons, common + ["--steps_epochs", 1, "--recons_dir", "staged"])
    logged = [float(r["cos"]) for r in log_rows(recons_dir)]
    training = load_training_run(train_dir, "cpu")
    for iteration, previous, epochs in ((1, "0_0", 1), (2, "0_1", 3), (3, "1_0", 3)):
        snap = torch.load(os.path.join(recons_dir, previous + ".pth"))
        direct, _ = change_agreement(training, snap["x"], snap["labels"], 0.05, 5, epochs)
        assert logged[iteration] == pytest.approx(direct, rel=1e-4, abs=1e-6)
    snap = torch.load(os.path.join(recons_dir, "0_1.pth"))
    one_epoch, _ = change_agreement(training, snap["x"], snap["labels"], 0.05, 5, 1)
    assert abs(one_epoch - logged[2]) > 1e-3
    for extra, needles in ((["--steps_epochs", 2], ("fewer outer epochs than --rec_epochs 2",)),
                           (["--steps_epochs", 1, "--steps", 3], ("--steps below that", "--steps_epochs 0"))):
        with pytest.raises(UserError) as excinfo:
            run(recons, common + extra + ["--recons_dir", "refused"])
        one_line_error(excinfo, *needles)
