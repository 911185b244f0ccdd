"""The synthetic reconstruction problem that the cost benchmarks (memory.py, speed.py) time.

theta0 is the model's seeded initialisation with BatchNorm statistics from one train-mode pass over noise,
the target change is random and the dummies are noise with cyclic labels: none of these changes what an
iteration costs, and none needs a training run.
"""
import torch

from models import build_model
from simudy.simulate import split_state


def synthetic_problem(model_name, width, shape, num_images, device, seed=0):
    """(model, theta0, buffers, weight_change, x, labels) on `device`; x does not require grad yet."""
    torch.manual_seed(seed)
    model = build_model(model_name, 10, shape, width).to(device)
    with torch.no_grad():
        model.train()
        model(torch.randn(64, *shape, device=device))
    theta0, buffers = split_state(model, model.state_dict())
    weight_change = torch.randn(sum(p.numel() for p in theta0.values()), device=device)
    x = (torch.randn(num_images, *shape) * 0.5).to(device)
    labels = (torch.arange(num_images) % 10).to(device)
    return model, theta0, buffers, weight_change, x, labels
