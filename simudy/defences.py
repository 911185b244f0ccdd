"""Defended training (issue 14): DP-SGD through Opacus, seeded augmentation, label smoothing; what each
means for the attacker's simulation; the privacy accounting.

What the attacker is assumed to know: every hyper-parameter of the training, including DP-SGD's clip C
and whether augmentation was on, but none of the random draws (DP noise, which flip or crop). So the
simulation replays per-image clipping at C and label smoothing exactly and leaves out the noise and the
augmentation (`unsimulated_defences` says so in one line each).

Privacy accounting. The training keeps the paper's fixed, unshuffled batches (Opacus's
poisson_sampling=False), so each image is in exactly one batch per epoch. Amplification by subsampling
does not apply to fixed batches: the guarantee of this training is that of the Gaussian mechanism at
sampling rate 1 composed once per epoch (`epsilon`, RDP accountant). `epsilon_if_poisson` is what
Opacus would report for the same noise with Poisson sampling at rate bs/N and the same number of steps
(a different training, for comparison). When bs = N (one batch) the two are the same.
"""
import math
import warnings
from dataclasses import dataclass, field

import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms import v2

from models import uses_batchnorm

from .errors import UserError

AUGMENTATIONS = ("none", "flip", "crop_flip")


def dp_epsilon(noise_multiplier, sample_rate, steps, delta):
    """epsilon at delta of `steps` Gaussian-mechanism steps at this noise and sampling rate (RDP
    accountant); None when there is no noise (no guarantee)."""
    if not noise_multiplier:
        return None
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return float(accountant.get_epsilon(delta=delta))


def augmentation(name, image_shape):
    """The torchvision transform of one image (C×H×W) for --augment; None for none."""
    if name == "none":
        return None
    flip = v2.RandomHorizontalFlip()
    if name == "flip":
        return flip
    pad = 4 if image_shape[-1] >= 32 else 2
    return v2.Compose([v2.RandomCrop(list(image_shape[-2:]), padding=pad, padding_mode="reflect"), flip])


@dataclass
class Defence:
    """The defences of one training run (all off: the paper's undefended training)."""
    noise_multiplier: float = None   # DP-SGD sigma (noise std = sigma * C)
    max_grad_norm: float = None      # DP-SGD's per-image clip C
    delta: float = 1e-5
    augment: str = "none"
    label_smoothing: float = 0.0
    report: dict = field(default_factory=dict)
    _transform: object = None

    @classmethod
    def from_args(cls, args):
        """A Defence from train.py's flags; bad combinations are one-line errors, before any work."""
        sigma, clip = args.dp_noise_multiplier, args.dp_max_grad_norm
        if sigma is not None and clip is None:
            raise UserError("--dp_noise_multiplier needs --dp_max_grad_norm C (DP-SGD clips each image's"
                            " gradient to norm C before adding noise); pass both")
        if sigma is not None and sigma < 0:
            raise UserError(f"--dp_noise_multiplier {sigma} must be >= 0 (0: clipping only)")
        if clip is not None and clip <= 0:
            raise UserError(f"--dp_max_grad_norm {clip} must be > 0")
        if not 0 < args.dp_delta < 1:
            raise UserError(f"--dp_delta {args.dp_delta} must be in (0, 1), e.g. 1e-5")
        if not 0 <= args.label_smoothing < 1:
            raise UserError(f"--label_smoothing {args.label_smoothing} must be in [0, 1)")
        if clip is not None and uses_batchnorm(args.model_name):
            raise UserError(f"DP-SGD (Opacus) has no per-image gradients through BatchNorm; use --model_name mlp"
                            f" or drop --dp_max_grad_norm/--dp_noise_multiplier")
        return cls(noise_multiplier=(sigma or 0.0) if clip is not None else None, max_grad_norm=clip,
                   delta=args.dp_delta, augment=args.augment, label_smoothing=args.label_smoothing)

    @property
    def dp(self):
        return self.max_grad_norm is not None

    def make_private(self, model, optimizer, images, labels, bs, epochs):
        """(model, optimizer) wrapped by Opacus: per-image gradients, clipping at C, noise sigma*C from a
        seeded generator (torch's seed, so a run repeats), the clipped sum divided by the batch size.
        Batches stay the fixed ones (poisson_sampling=False); the loader only sizes the batches."""
        loader = DataLoader(TensorDataset(images, labels), batch_size=bs, shuffle=False)
        noise = torch.Generator(device=images.device).manual_seed(torch.initial_seed())
        model.train()  # Opacus records per-image activations only in train mode (DP models have no BN)
        # Opacus's notes that do not apply here: the noise is seeded on purpose (a run must repeat), and the
        # first layer's hook fires although the images need no gradient
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        model, optimizer, _ = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm, poisson_sampling=False, noise_generator=noise)
        n, batches = len(labels), len(loader)
        self.report = {
            "dp_sgd": "opacus", "noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm,
            "delta": self.delta, "sampling": "fixed batches (shuffle=False), each image once per epoch",
            "expected_batch_size": optimizer.expected_batch_size,
            "epsilon": dp_epsilon(self.noise_multiplier, 1.0, epochs, self.delta),
            "epsilon_if_poisson": dp_epsilon(self.noise_multiplier, 1 / batches, epochs * batches, self.delta),
            "num_images": n}
        return model, optimizer

    def augment_batch(self, x):
        """Each image of the batch augmented by its own draw (torch's global RNG, seeded by train.py)."""
        if self.augment == "none":
            return x
        if self._transform is None:
            self._transform = augmentation(self.augment, tuple(x.shape[1:]))
        return torch.stack([self._transform(image) for image in x])

    def simulated_args(self):
        """What config.json's "args" adds for the attacker's simulation (simulate.sgd_config_from_training)."""
        return {"dp_expected_batch_size": self.report.get("expected_batch_size")} if self.dp else {}

    def privacy_summary(self):
        eps = self.report["epsilon"]
        eps_text = "no noise: no guarantee" if eps is None else f"epsilon {eps:.4g} at delta {self.delta:g}"
        poisson = self.report["epsilon_if_poisson"]
        poisson_text = "" if poisson is None or math.isclose(poisson, eps) else \
            f" (Poisson sampling at the same noise would report {poisson:.4g})"
        return (f"DP-SGD (Opacus): sigma {self.noise_multiplier:g}, C {self.max_grad_norm:g}, fixed batches:"
                f" {eps_text}{poisson_text}")


def unsimulated_defences(train_args):
    """One line per defence of the training that the simulation does not replay, saying what it assumes."""
    notes = []
    sigma = train_args.get("dp_noise_multiplier")
    if sigma:
        notes.append(f"warning: the training added DP-SGD noise (sigma {sigma:g}); the simulation replays its"
                     f" per-image clipping at C {train_args.get('dp_max_grad_norm'):g} but not the noise"
                     f" (its draws are unknown to an attacker)")
    augment = train_args.get("augment", "none")
    if augment != "none":
        notes.append(f"warning: the training augmented its images ({augment}); the simulation assumes no"
                     f" augmentation (the draws are unknown to an attacker)")
    return notes
