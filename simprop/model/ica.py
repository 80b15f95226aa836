"""Input Channel Averaging, ICA (paper §3.6): a training-time input regulariser.

With probability p the *normalised* query image is replaced by its channel mean (a grey
image, broadcast back to 3 channels).  p starts at ``train.ica_initial_p`` (0.25) and decays
exponentially: p(epoch) = ica_initial_p * ica_decay ** epoch.  Never applied at evaluation.
"""

from __future__ import annotations

import torch
from torch import Tensor


def ica_probability(epoch: int, initial_p: float, decay: float) -> float:
    """Switch probability at ``epoch`` (0-based): ``initial_p * decay ** epoch``."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    return float(initial_p) * float(decay) ** epoch


def channel_average(images: Tensor) -> Tensor:
    """[B,3,H,W] -> per-pixel mean over the channels, broadcast to 3 channels."""
    return images.mean(dim=1, keepdim=True).expand_as(images)


def apply_input_channel_averaging(images: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Replace each image of the batch, independently with probability ``p``, by its channel mean.

    The Bernoulli draws use ``generator`` (a CPU ``torch.Generator``) so a seeded training run
    is reproducible.  Returns a new tensor; ``images`` is not modified.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"ICA probability must be in [0, 1], got {p}")
    if p == 0.0:
        return images
    chosen = torch.rand(images.shape[0], generator=generator) < p
    chosen = chosen.to(images.device)[:, None, None, None]
    return torch.where(chosen, channel_average(images), images)
