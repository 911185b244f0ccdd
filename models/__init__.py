"""One place that builds models: `build_model(name, ...)`, backed by a dict."""
from .mlp import mlp
from .resnet import ResNet18, ResNet34, ResNet50

# name -> (constructor taking (num_classes, width, image_shape), paper's default width)
MODELS = {
    "resnet": (lambda nc, w, shape: ResNet18(nc, w, shape[0]), 64),  # the paper's --model_name resnet
    "resnet18": (lambda nc, w, shape: ResNet18(nc, w, shape[0]), 64),
    "resnet34": (lambda nc, w, shape: ResNet34(nc, w, shape[0]), 64),
    "resnet50": (lambda nc, w, shape: ResNet50(nc, w, shape[0]), 64),
    "mlp": (lambda nc, w, shape: mlp(shape[0] * shape[1] * shape[2], nc, w), 1000),
}


def default_width(name):
    return MODELS[name][1] if name in MODELS else None


def build_model(name, num_classes, image_shape, width=None):
    """image_shape is (C, H, W) of the dataset; width None means the paper's width."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    constructor, paper_width = MODELS[name]
    return constructor(num_classes, width or paper_width, tuple(image_shape))


def uses_batchnorm(name):
    return name.startswith("resnet")
