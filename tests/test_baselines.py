"""simudy/baselines.py, the paper's baselines (recons.py --method one_step / two_step): the weighted gradient
against a per-sample loop, the loss schedule, and train -> recons -> metrics --linear 1/2 end to end. Their
resume equivalence is in test_loop.py."""
import csv
import json
import os

import pytest
import torch
import torch.nn.functional as F

import metrics
import recons
import train
from simudy.baselines import BASELINE_LOSS_SCHEDULE, baseline_loss, baseline_loss_weights, weighted_gradient
from simudy.method import total_variation
from simudy.simulate import split_state
from tests.helpers import tiny_model, run


def _model(name, shape):
    model = tiny_model(name, shape, width=4 if name.startswith("resnet") else 16)
    model.eval()  # the baselines' BatchNorm mode (paper code)
    return (model, *split_state(model, model.state_dict()))


@pytest.mark.parametrize("name,shape", [("mlp", (1, 8, 8)), ("resnet18", (3, 16, 16))])
def test_weighted_gradient_equals_per_sample_loop(name, shape):
    model, params, buffers = _model(name, shape)
    gen = torch.Generator().manual_seed(1)
    x, labels = torch.randn(6, *shape, generator=gen), torch.tensor([0, 3, 3, 9, 1, 0])
    duals = torch.rand(6, generator=gen) - 0.5
    got = weighted_gradient(model, params, buffers, x, labels, duals)
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    expected = torch.zeros_like(got)
    for i in range(len(x)):  # brute force: sum_i lambda_i * grad of sample i's own loss
        out = torch.func.functional_call(model, {**leaves, **buffers}, (x[i:i + 1],))
        grads = torch.autograd.grad(F.cross_entropy(out, labels[i:i + 1]), list(leaves.values()))
        expected += duals[i] * torch.cat([g.reshape(-1) for g in grads])
    assert (got - expected).abs().max() <= 1e-5
    assert got.requires_grad  # create_graph: the loss can move the candidates and the duals


def test_loss_schedule_branches():
    assert baseline_loss_weights(0) == baseline_loss_weights(599) == (1 / 100, 0, 0)
    assert baseline_loss_weights(600) == (1 / 30, 0, 0)
    assert baseline_loss_weights(12000) == (0, 30, 0.1 * 0.01)
    assert [until for until, *_ in BASELINE_LOSS_SCHEDULE][:-1] == [600, 1600, 4000, 8000, 12000]
    torch.manual_seed(0)
    g, change, x = torch.randn(50), torch.randn(50), torch.randn(4, 1, 5, 5)
    l2 = (g - change).pow(2).sum()
    cos = 1 - F.cosine_similarity(g, change, dim=0)
    total, *parts = baseline_loss(g, change, x, 599)
    assert torch.allclose(total, l2 / 100) and torch.allclose(parts[0], l2) and torch.allclose(parts[1], cos)
    total, *_ = baseline_loss(g, change, x, 7999)
    assert torch.allclose(total, l2)
    total, *_ = baseline_loss(g, change, x, 12000)
    assert torch.allclose(total, 30 * cos + 1e-3 * total_variation(x))


def test_true_images_match_better_than_noise():
    """One full-batch SGD step: theta0 - theta_f = lr * mean_i grad loss_i, so the true images with duals
    lr / N give (at theta_f, close to theta0) a much smaller l2 than random candidates."""
    model, params, buffers = _model("mlp", (1, 8, 8))
    gen = torch.Generator().manual_seed(2)
    images, labels = torch.randn(10, 1, 8, 8, generator=gen), torch.arange(10)
    lr = 1e-3
    theta0 = {n: p.clone() for n, p in params.items()}
    train.sgd_train(model, images, labels, lr=lr, bs=10, epochs=1, progress=False)
    model.eval()
    theta_f = {n: p.detach().clone() for n, p in model.named_parameters()}
    change = torch.cat([(theta0[n] - theta_f[n]).reshape(-1) for n in theta0])
    duals = torch.full((10,), lr / 10)
    l2 = {}
    for name, x in (("true", images), ("noise", torch.randn(10, 1, 8, 8, generator=gen) * 0.5)):
        l2[name] = (weighted_gradient(model, theta_f, buffers, x, labels, duals) - change).pow(2).sum().item()
    assert l2["true"] < 1e-3 * l2["noise"]


@pytest.mark.parametrize("method,linear,points", [("one_step", 1, ["theta_final"]),
                                                  ("two_step", 2, ["theta0", "theta_final"])])
def test_train_recons_metrics_end_to_end(mlp_run, method, linear, points):
    mlp_flags = mlp_run.flags + ["--tlr", 0.05]
    recons_dir = run(recons, mlp_flags + ["--method", method, "--baseline_steps", 3, "--save_every", 1])
    assert recons_dir.endswith(f"_{method}_reclr0.0003")  # the paper's baseline rec_lr by default
    assert {"x_0.pth", "x_1.pth", "x_2.pth", "labels.pth", "log.csv", "config.json"} <= set(os.listdir(recons_dir))
    snap = torch.load(os.path.join(recons_dir, "x_2.pth"))
    assert snap["x"].shape == (20, 1, 28, 28) and snap["labels"].bincount().tolist() == [2] * 10
    assert sorted(snap["duals"]) == points and all(d.shape == (20,) for d in snap["duals"].values())
    assert snap["epoch"] == 0 and snap["step"] == 2
    with open(os.path.join(recons_dir, "log.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(float(r["l2"]) > 0 for r in rows)
    assert float(rows[0]["total"]) == pytest.approx(float(rows[0]["l2"]) / 100, rel=1e-5)
    config = json.load(open(os.path.join(recons_dir, "config.json")))
    assert config["method"] == method and config["rec_lr"] == 3e-4 and config["num_dummy"] == 20

    result = run(metrics, mlp_flags + ["--linear", linear, "--eval_step", 0])  # finds x_0.pth unprompted
    assert result["snapshot"].endswith(os.path.join(os.path.basename(recons_dir), "x_0.pth"))
    assert result["n_train"] == 10 and result["n_recons"] == 2 * result["n_train"]
