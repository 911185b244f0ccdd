"""simudy.exposure: each training image's part of theta0 - theta_final. Two paths: the parts sum to the
change train.py's own SGD made, and in one full-batch step each part is lr/N times the image's gradient."""
import copy

import pytest
import torch
import torch.nn.functional as F

from simudy.errors import UserError
from simudy.exposure import check_shares_apply, image_parts, image_shares
from simudy.target import training_config, training_run_from_states
from tests.helpers import one_line_error, tiny_model
from train import sgd_train


def trained_run(name, shape, n, bs, epochs, momentum, lr=0.05, width=32):
    model = tiny_model(name, shape, width)
    gen = torch.Generator().manual_seed(1)
    images, labels = torch.randn(n, *shape, generator=gen), torch.arange(n) % 10
    theta0 = copy.deepcopy(model.state_dict())
    sgd_train(model, images, labels, lr=lr, bs=bs, epochs=epochs, momentum=momentum, progress=False)
    config = training_config(lr, bs, epochs, n, 10, shape, momentum=momentum)
    return training_run_from_states(model, theta0, model.state_dict(), config, "cpu"), images, labels


@pytest.mark.parametrize("name,shape,momentum", [("mlp", (1, 6, 6), 0.0), ("mlp", (1, 6, 6), 0.9),
                                                 ("resnet18", (3, 8, 8), 0.5)])
def test_parts_sum_to_the_change_the_training_made(name, shape, momentum):
    # 7 images in batches of 3: an uneven last batch, so each part is divided by its own batch's size
    run, images, labels = trained_run(name, shape, n=7, bs=3, epochs=3, momentum=momentum,
                                      width=32 if name == "mlp" else 4)
    parts = image_parts(run, images, labels)
    assert parts.shape == (7, run.weight_change.numel())
    assert torch.allclose(parts.sum(0), run.weight_change, rtol=1e-4, atol=1e-6)
    share, cos = image_shares(run, images, labels)
    assert torch.allclose(share, parts.norm(dim=1) / run.weight_change.norm())
    assert (cos.abs() <= 1 + 1e-6).all() and share.min() > 0


def test_one_full_batch_step_part_is_the_images_own_gradient():
    run, images, labels = trained_run("mlp", (1, 6, 6), n=5, bs=5, epochs=1, momentum=0.0, lr=0.1)
    model = tiny_model("mlp", (1, 6, 6), 32)  # the same seed: theta0
    for i in range(5):
        model.zero_grad()
        F.cross_entropy(model(images[i:i + 1]), labels[i:i + 1]).backward()
        own = torch.cat([p.grad.flatten() for p in model.parameters()]) * 0.1 / 5
        assert torch.allclose(image_parts(run, images, labels)[i], own, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("setting,needle", [({"bn_mode": "train"}, "train-mode BatchNorm"),
                                            ({"weight_decay": 5e-4}, "weight decay"),
                                            ({"dp_max_grad_norm": 1.0}, "DP-SGD"),
                                            ({"augment": "flip"}, "augmentation")])
def test_trainings_whose_change_does_not_split_by_image_are_refused(setting, needle):
    with pytest.raises(UserError) as excinfo:
        check_shares_apply({"bn_mode": "eval", **setting})
    one_line_error(excinfo, needle, "drop --image_shares")
    check_shares_apply({"bn_mode": "eval", "augment": "none", "weight_decay": 0.0})
