"""train.py, the command line: the run folder it writes (theta_final is plain SGD from theta0 on the subset
it saved) and its one-line errors."""
import json
import os

import pytest
import torch

import train
from models import MODELS, build_model
from simudy.data import first_k_per_class, load_dataset, pretraining_indices
from simudy.errors import UserError
from tests.conftest import MLP_FLAGS
from tests.helpers import one_line_error, run


def test_run_folder_holds_the_sgd_training_of_its_subset(mlp_run):
    """theta_final.pth against sgd_train replayed from theta0.pth on train_subset.pth with config.json's
    hyper-parameters: the folder holds everything the attack is told."""
    train_dir = mlp_run.train_dir
    assert {"theta0.pth", "theta_final.pth", "train_subset.pth", "config.json"} <= set(os.listdir(train_dir))
    config = json.load(open(os.path.join(train_dir, "config.json")))
    args, data = config["args"], config["data"]
    assert (args["lr"], args["bs"], args["epochs"], args["model_name"], args["width"]) == (0.05, 5, 1, "mlp", 16)
    assert data["image_shape"] == [1, 28, 28] and data["num_images"] == 10 and data["num_classes"] == 10
    subset = torch.load(os.path.join(train_dir, "train_subset.pth"))
    assert subset["images"].shape == (10, 1, 28, 28) and subset["labels"].bincount().tolist() == [1] * 10
    model = build_model("mlp", 10, (1, 28, 28), 16)
    model.load_state_dict(torch.load(os.path.join(train_dir, "theta0.pth")))
    train.sgd_train(model, subset["images"], subset["labels"], lr=args["lr"], bs=args["bs"], epochs=args["epochs"],
                    momentum=args["momentum"], weight_decay=args["weight_decay"], bn_mode=args["bn_mode"],
                    progress=False)
    theta_final = torch.load(os.path.join(train_dir, "theta_final.pth"))
    theta0 = torch.load(os.path.join(train_dir, "theta0.pth"))
    for name, value in model.state_dict().items():
        assert torch.allclose(value, theta_final[name], rtol=0, atol=1e-7), name
        assert not torch.equal(theta0[name], theta_final[name]), name  # the training moved every parameter


def test_bad_inputs_give_one_line_errors(mlp_run, empty_dir, offline, capsys):
    flags, _ = mlp_run
    with pytest.raises(UserError) as e:  # missing dataset, offline
        run(train, ["--data_root", empty_dir, "--model_name", "mlp"])
    one_line_error(e, "cifar10", "--data_root")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # an unknown model: argparse's choices reject it
        run(train, flags + ["--lr", 0.05, "--model_name", "transformer"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--model_name: invalid choice:" in err and "transformer" in err
    valid = err.split("choose from", 1)[1]  # the registry's names, whatever argparse's quoting
    for name in MODELS:
        assert name in valid, name


def test_a_diverged_training_is_an_error_not_a_run(fashion_root, in_tmp_cwd):
    """An lr that makes the parameters nan or inf ends in a one-line error naming --lr, and leaves no run
    folder for recons.py to find (a ResNet-18 w16 at lr 0.02 did this in benchmarks/unknowns.py)."""
    flags = MLP_FLAGS[:2] + ["--data_root", fashion_root] + MLP_FLAGS[2:]
    with pytest.raises(UserError, match="diverged.*lower --lr"):
        run(train, flags + ["--lr", 1e30, "--epochs", 2])
    assert not os.listdir(os.path.join("ckpts", "model_ckpt"))


def test_a_cached_theta0_was_never_pretrained_on_the_subset(fashion_root, in_tmp_cwd):
    """train.py caches a ResNet's pretrained theta0 per flags, and the cache's name does not hold the subset.
    A run on the first image per class pretrains on the next 2 per class; a run on the first 2 must not reuse
    that theta0 (it saw each class's second image) but pretrain one of its own; a third run on the first
    image reuses the shared one. config.json's theta0_data names each pretraining's images: none in its subset."""
    # width 8: at width 4 this pretraining's backward corrupts the heap inside oneDNN on an AVX2 CPU (session 30)
    base = ["--dataset", "fashion_mnist", "--data_root", fashion_root, "--model_name", "resnet18", "--width", 8,
            "--pretrain_imgs", 2, "--pretrain_epochs", 1, "--lr", 0.01, "--epochs", 1, "--bs", 10]
    configs = [json.load(open(os.path.join(run(train, base + ["--num_imgs_per_class", k, "--run_dir", f"run{i}"]),
                                           "config.json"))) for i, k in enumerate((1, 2, 1))]
    _, targets, _ = load_dataset("fashion_mnist", fashion_root)
    for config in configs:
        subset = first_k_per_class(targets, config["args"]["num_imgs_per_class"], 10)
        pretraining = pretraining_indices(targets, 10, config["theta0_data"])
        assert len(pretraining) == 20 and not set(subset) & set(pretraining)
    shared = first_k_per_class(targets, 3, 10)[10:]  # what the first run's pretraining took: 2nd, 3rd per class
    assert sorted(pretraining_indices(targets, 10, configs[0]["theta0_data"])) == sorted(shared)
    assert configs[2]["theta0"] == configs[0]["theta0"] and "pretrain_images" not in configs[2]
    assert "_excl" in configs[1]["theta0"] and configs[1]["pretrain_images"] == 20
    assert not torch.equal(torch.load(os.path.join("run0", "theta0.pth"))["linear.weight"],
                           torch.load(os.path.join("run1", "theta0.pth"))["linear.weight"])
