"""simudy/adjoint.py: the memory-flat reverse pass must give the unrolled pass's loss and image gradient;
--backprop auto and the checkpoint interval."""
import math

import pytest
import torch

from tests.helpers import tiny_model
import simudy.adjoint
from simudy.adjoint import auto_keep_every, choose_backprop, unrolled_graph_bytes
from simudy.method import reconstruction_loss_and_grad
from simudy.simulate import SGDConfig, split_state

CASES = [  # (momentum, weight_decay, bn_train, clip_norm, keep_every)
    (0.0, 0.0, False, math.inf, 1),     # the paper's setting, clip off (outer epochs >= 5)
    (0.0, 0.0, False, 1e-3, 1),         # clip triggered at every step (outer epochs < 5)
    (0.9, 0.0, False, math.inf, 2),     # momentum, k > 1
    (0.9, 1e-3, True, 1e-3, 3),         # everything at once, train-mode BN
    (0.0, 5e-4, True, math.inf, None),  # weight decay, train-mode BN, automatic k
]


def _setup(name, shape, device="cpu"):
    model = tiny_model(name, shape, width=8 if name.startswith("resnet") else 32)
    weight_change = torch.randn(sum(p.numel() for p in model.parameters())).to(device)
    model.to(device)
    theta0, buffers = split_state(model, model.state_dict())
    return model, theta0, buffers, weight_change


@pytest.mark.parametrize("name,shape", [("mlp", (1, 8, 8)), ("resnet18", (3, 16, 16))])
@pytest.mark.parametrize("momentum,weight_decay,bn_train,clip_norm,keep_every", CASES)
@pytest.mark.parametrize("loss_type", ["cos", "l2"])
def test_recompute_equals_unrolled(name, shape, momentum, weight_decay, bn_train, clip_norm, keep_every,
                                   loss_type, device):
    if name == "mlp" and bn_train:
        pytest.skip("the MLP has no BatchNorm")
    if loss_type == "l2" and (keep_every != 1 or name == "resnet18"):
        pytest.skip("l2 only needs one case per model")
    model, theta0, buffers, weight_change = _setup(name, shape, device)
    x = torch.randn(13, *shape).to(device)  # 13 images in batches of 5: unequal batches
    labels = (torch.arange(13) % 10).to(device)
    sgd = SGDConfig(lr=0.01, momentum=momentum, weight_decay=weight_decay, bn_train=bn_train,
                    clip_norm=clip_norm, clip_to=5.0)
    outs = {}
    for backprop in ("unrolled", "recompute"):
        outs[backprop] = reconstruction_loss_and_grad(model, theta0, buffers, x.clone().requires_grad_(True),
                                                      labels, weight_change, 5, 2, sgd, 1e-3, loss_type,
                                                      backprop, keep_every)
    (loss_u, match_u, tv_u, grad_u), (loss_r, match_r, tv_r, grad_r) = outs["unrolled"], outs["recompute"]
    assert abs(loss_u.item() - loss_r.item()) <= 1e-5 * max(1.0, abs(loss_u.item()))
    assert abs(tv_u.item() - tv_r.item()) <= 1e-6
    assert grad_u.abs().max() > 0
    assert ((grad_u - grad_r).norm() / grad_u.norm()).item() <= 1e-5


def test_buffers_replayed_once_in_train_mode():
    """Train-mode BN: the recomputation must not touch the caller's running statistics."""
    model, theta0, buffers, weight_change = _setup("resnet18", (3, 16, 16))
    before = {k: v.clone() for k, v in buffers.items()}
    sgd = SGDConfig(lr=0.01, bn_train=True)
    reconstruction_loss_and_grad(model, theta0, buffers, torch.randn(10, 3, 16, 16), torch.arange(10),
                                 weight_change, 5, 2, sgd, 1e-3, "cos", "recompute", 1)
    assert all(torch.equal(before[k], buffers[k]) for k in buffers)


def test_auto_keep_every():
    assert auto_keep_every(8, 1000) == 1               # everything fits: keep every theta_t
    assert auto_keep_every(400, 2**20, budget=2**24) == 20  # 400 steps of 1 MB in 16 MB: every sqrt(T)-th


def test_auto_picks_unrolled_when_it_fits_and_recompute_when_not(monkeypatch):
    model, theta0, buffers, weight_change = _setup("resnet18", (3, 16, 16))
    x, labels, sgd = torch.randn(40, 3, 16, 16), torch.arange(40) % 10, SGDConfig(lr=0.01)
    need = unrolled_graph_bytes(model, theta0, buffers, x, labels, 10, 2, sgd)
    per_step = unrolled_graph_bytes(model, theta0, buffers, x[:10], labels[:10], 10, 1, sgd)
    assert need == 8 * per_step  # 2 epochs x 4 batches, linear in the number of simulated steps
    share = simudy.adjoint.AUTO_MEMORY_SHARE
    monkeypatch.setattr(simudy.adjoint, "device_memory_bytes", lambda device: need / share * 2)
    assert choose_backprop("auto", model, theta0, buffers, x, labels, 10, 2, sgd)[0] == "unrolled"
    monkeypatch.setattr(simudy.adjoint, "device_memory_bytes", lambda device: need / share / 2)
    assert choose_backprop("auto", model, theta0, buffers, x, labels, 10, 2, sgd)[0] == "recompute"
    assert choose_backprop("unrolled", model, theta0, buffers, x, labels, 10, 2, sgd) == ("unrolled", None)
