"""What the attacker knows: the model, theta0 and theta_final, and the training's hyper-parameters.

`TrainingRun` is the same whether it comes from a train.py run folder (`load_training_run`) or from a
model trained anywhere (`training_run_from_states`, the Python API's and `recons.py --theta0 FILE`'s way).
"""
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from models import build_model

from .errors import UserError
from .runs import CONFIG, THETA0, THETA_FINAL, load_checkpoint, read_json
from .simulate import flat, parameter_names, split_state


@dataclass
class TrainingRun:
    """A trained model to attack: theta0 and theta_final (parameters and buffers apart), the true change
    theta0 - theta_final over the parameters (flat, in the model's parameter order) and a config with
    the training's "args" (lr, bs, epochs, momentum, weight_decay, bn_mode) and "data" (num_images,
    num_classes, image_shape, mean, std)."""
    model: torch.nn.Module
    theta0: dict
    buffers: dict
    theta_final: dict
    final_buffers: dict
    weight_change: torch.Tensor
    config: dict


def training_config(lr, batch_size, epochs, num_images, num_classes, image_shape, momentum=0.0, weight_decay=0.0,
                    bn_mode="eval", mean=None, std=None, **model):
    """The config a TrainingRun needs when no train.py folder describes the training: the training's
    "args" (train.py's names: lr, bs, epochs, momentum, weight_decay, bn_mode, plus `model` fields) and
    its "data" (mean and std, the normalisation, only when known)."""
    data = {"num_images": num_images, "num_classes": num_classes, "image_shape": list(image_shape)}
    if mean is not None and std is not None:
        data.update(mean=list(mean), std=list(std))
    return {"args": {"lr": lr, "bs": batch_size, "epochs": epochs, "momentum": momentum,
                     "weight_decay": weight_decay, "bn_mode": bn_mode, **model}, "data": data}


def training_run_from_states(model, theta0_state, theta_final_state, config, device,
                             where=("theta0", "theta_final"), fix="pass the model they were saved from"):
    """A TrainingRun from a model and two state_dicts; a state_dict that does not fit the model is a
    one-line UserError naming where it came from and the fix. The states are copied first: a state_dict
    taken from `model` itself holds its live tensors, which loading theta0 would overwrite."""
    theta0_state, theta_final_state = ({k: v.detach().clone() for k, v in s.items()}
                                       for s in (theta0_state, theta_final_state))
    for name, state in zip(where, (theta0_state, theta_final_state)):
        try:
            model.load_state_dict(state)
        except RuntimeError:
            raise UserError(f"{name} was saved from another architecture than this model ({type(model).__name__},"
                            f" {sum(p.numel() for p in model.parameters())} parameters); {fix}") from None
    model.to(device)
    theta0, buffers = split_state(model, {k: v.to(device) for k, v in theta0_state.items()})
    theta_final, final_buffers = split_state(model, {k: v.to(device) for k, v in theta_final_state.items()})
    weight_change = flat(theta0[n] - theta_final[n] for n in parameter_names(model))
    return TrainingRun(model, theta0, buffers, theta_final, final_buffers, weight_change, config)


def load_training_run(train_dir, device, config=None):
    """The TrainingRun of a train.py run folder (its config.json, when already read, as `config`)."""
    config = config or read_json(os.path.join(train_dir, CONFIG), what="training (train.py)")
    targs = config["args"]
    model = build_model(targs["model_name"], config["data"]["num_classes"], config["data"]["image_shape"],
                        targs["width"])
    paths = [os.path.join(train_dir, file) for file in (THETA0, THETA_FINAL)]
    theta0, theta_final = (load_checkpoint(path, name) for path, name in zip(paths, ("theta0", "theta_final")))
    return training_run_from_states(model, theta0, theta_final, config, device, where=paths,
                                    fix=f"its config.json says {targs['model_name']} width {targs['width']};"
                                        f" retrain with train.py or fix the run folder")


def loss_per_image(run, images, labels, at="theta0"):
    """Each image's cross-entropy under the model at theta0 (or "theta_final"), BatchNorm in eval mode:
    how much the training still had to teach it. SimuDy recovers the images theta0 got wrong and hardly
    those it already fitted, whose gradients leave little in theta0 - theta_final (README, "Which images
    come back")."""
    params, buffers = (run.theta0, run.buffers) if at == "theta0" else (run.theta_final, run.final_buffers)
    was_training = run.model.training
    run.model.eval()
    try:
        with torch.no_grad():
            out = functional_call(run.model, {**params, **buffers}, (images,))
    finally:
        run.model.train(was_training)
    return F.cross_entropy(out, labels, reduction="none")
