"""What Adam moves instead of the dummies x (SimuDy's main run only): --coarse's low-resolution stage,
--pyramid's levels, and --decorrelate_colours' colour coordinates. Each has active(iteration),
named_tensors() (what Adam moves and --resume restores), composed(size) (the dummies they make) and
clamp_into(box, size) (--box)."""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class CoarseStage:
    """--coarse R: for the first `iterations` iterations Adam moves z, R×R images, and the dummies x are z
    upsampled (bilinear) to full size; after it Adam moves x itself, which starts at the upsampled z with
    fresh Adam moments (benchmarks/README.md: on B, 16×16 for 300 iterations led by 20-45% through the
    switch and by 5-10% at 800 iterations; on Fashion-MNIST's D it lost its lead after the switch)."""
    z: torch.Tensor
    iterations: int

    def active(self, iteration):
        return iteration < self.iterations

    def named_tensors(self):
        return {"z": self.z}

    def composed(self, size):
        return F.interpolate(self.z, size=size, mode="bilinear", align_corners=False)

    def clamp_into(self, box, size):
        """Upsampling is a convex combination, so pixels of an in-box z stay in the box."""
        self.z.copy_(torch.maximum(torch.minimum(self.z, box[1]), box[0]))


def coarse_stage(x, resolution, iterations):
    """The CoarseStage of the dummies x: z is x averaged down to resolution², and x becomes z upsampled."""
    z = F.interpolate(x.detach(), size=(resolution, resolution), mode="area").requires_grad_(True)
    stage = CoarseStage(z, iterations)
    with torch.no_grad():
        x.copy_(stage.composed(x.shape[-2:]))
    return stage


# --decorrelate_colours: the square root of natural images' colour covariance (Lucid's constant, from
# ImageNet; Olah et al., "Feature Visualization", Distill 2017), one column per decorrelated direction:
# luminance, then two chroma directions. Scaled so the luminance column is ~1 in every channel: a step on
# it moves each channel as far as one of Adam's steps on x did, the chroma ones 3-13x less far (Adam's
# per-element steps on x spend as much on chroma as on luminance, and B's reconstructions are chroma noise).
_COLOUR_CORRELATION_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
COLOUR_MIX = _COLOUR_CORRELATION_SQRT / _COLOUR_CORRELATION_SQRT[:, 0].mean()
COLOUR_FROM_RGB = torch.linalg.inv(COLOUR_MIX)
CHROMA_FROM_RGB = COLOUR_FROM_RGB[1:]  # --chroma_tv's two coordinates


def mix_colours(y, mix):
    """x[:, c] = sum_k mix[c, k] y[:, k]: images from their decorrelated colour coordinates (or, with a
    K x 3 matrix, K coordinates of RGB images)."""
    return torch.einsum("ck,nkhw->nchw", mix.to(y), y)


@dataclass
class PyramidDummies:
    """--pyramid L: the dummies are the sum of L images at H, H/2, ..., H/2^(L-1) pixels, each upsampled
    (bilinear) to full size, and Adam moves every level throughout (a Laplacian-pyramid parameterisation,
    as in feature visualisation). Adam's steps are about lr per element, so a coarse level moves a smooth
    component as far per step as the full-size level moves one pixel: low frequencies are found first,
    without coarse-to-fine's switch. The full-size level starts at the dummies, the others at 0. With
    `decorrelated` (--decorrelate_colours) the levels hold decorrelated colour coordinates and the dummies
    are mix_colours(sum, COLOUR_MIX); one level is then just the colour change of coordinates."""
    levels: list
    decorrelated: bool = False

    def active(self, iteration):
        return True

    def named_tensors(self):
        # named apart from RGB levels, so that --resume with the other colour setting is an error, not a
        # silent reading of one coordinate system as the other
        prefix = "colour_level" if self.decorrelated else "level"
        return {f"{prefix}{k}": z for k, z in enumerate(self.levels)}

    def composed(self, size):
        y = sum(z if tuple(z.shape[-2:]) == tuple(size) else
                F.interpolate(z, size=size, mode="bilinear", align_corners=False) for z in self.levels)
        return mix_colours(y, COLOUR_MIX) if self.decorrelated else y

    def clamp_into(self, box, size):
        """Into the box by moving the full-size level by what the clamp takes off the sum."""
        x = self.composed(size)
        change = torch.maximum(torch.minimum(x, box[1]), box[0]) - x
        self.levels[0].add_(mix_colours(change, COLOUR_FROM_RGB) if self.decorrelated else change)


def pyramid_dummies(x, levels, decorrelated=False):
    """The PyramidDummies of the dummies x with `levels` levels (in decorrelated colour coordinates or RGB);
    x is unchanged (the coarse levels are 0, the full-size one x in the levels' coordinates)."""
    h, w = x.shape[-2:]
    full = mix_colours(x.detach(), COLOUR_FROM_RGB) if decorrelated else x.detach().clone()
    return PyramidDummies([full.requires_grad_(True)] +
                          [torch.zeros(*x.shape[:-2], math.ceil(h / 2 ** k), math.ceil(w / 2 ** k), device=x.device,
                                       requires_grad=True) for k in range(1, levels)], decorrelated)
