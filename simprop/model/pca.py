"""PCA initialisation of the encoder projection (``train.projection_init: pca``).

The projection conv (1536 -> ``model.channels``, ReLU) starts as a whitened view of the fold's
training features along their leading principal components, each as a +/- pair of units; the
default setup keeps it frozen there (``train.projection_lr_scale: 0``).  Why, and the
validation-only study that chose it: docs/studies/2026-11-27-pca-projection-init.md.
"""

from __future__ import annotations

import torch


def feature_moments(chunks) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [C] and covariance [C, C] (float64) of the feature vectors in ``chunks`` ([M_i, C] each),
    accumulated chunk by chunk, so no more than one chunk is ever held in float64."""
    total = outer = None
    count = 0
    for rows in chunks:
        rows = rows.double()
        total = rows.sum(dim=0) if total is None else total + rows.sum(dim=0)
        outer = rows.T @ rows if outer is None else outer + rows.T @ rows
        count += len(rows)
    if count < 2:
        raise ValueError("feature_moments: need at least two feature vectors")
    mean = total / count
    return mean, (outer - count * torch.outer(mean, mean)) / (count - 1)


def pca_projection_init(projection, mean: torch.Tensor, covariance: torch.Tensor) -> None:
    """Initialise the projection conv from the principal components of the backbone features
    whose ``mean`` [C] and ``covariance`` [C, C] are given (:func:`feature_moments`).

    Output units ``2i`` and ``2i + 1`` read the ``i``-th principal direction ``p_i`` of the
    centred features, whitened (divided by its standard deviation ``s_i``), with opposite signs:
    ``ReLU(±(p_i · (x - mean)) / s_i)``, so the ReLU keeps both halves of each component; an odd
    last unit reads ``+p_k``.  Only the centre tap is set (the other eight start at zero), so
    every unit starts as a 1x1 view of its pixel.  Deterministic: the covariance's exact
    eigenvectors (``torch.linalg.eigh``, float64), each signed so its largest entry is positive.

    Why: a random 16-channel view of the 1536 backbone channels throws away most of what the
    parameter-free prototype matcher reads, and training at the projection's small rate recovers
    little of it; this view keeps most of it (docs/studies/2026-11-27-pca-projection-init.md).
    The principal components come from the fold's training images only, without their labels.
    Neither the paper nor CANet starts the projection from the data (CANet's
    ``one_shot_network.py`` draws every conv weight of its ``layer5`` and heads from N(0, 0.01);
    ours keep ``nn.Conv2d``'s seeded init), so this is an initialisation choice of the default
    setup, made on validation episodes only (docs/architecture.md, "PCA initialisation").
    """
    set_centre_taps(projection, *pca_units(mean, covariance, projection[0].weight.shape[0]))


def pca_units(mean: torch.Tensor, covariance: torch.Tensor, units: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights [units, C] and biases [units] (float64) of :func:`pca_projection_init`'s units."""
    mean, covariance = mean.double(), covariance.double()
    eigvals, eigvecs = torch.linalg.eigh(covariance)
    order = torch.argsort(eigvals, descending=True)[: (units + 1) // 2]
    directions = eigvecs[:, order].T  # [k, C]
    signs = torch.sign(directions.gather(1, directions.abs().argmax(dim=1, keepdim=True)))
    directions = directions * signs / eigvals[order].clamp_min(1e-12).sqrt()[:, None]
    rows = torch.stack([directions, -directions], dim=1).flatten(0, 1)[:units]  # +p0, -p0, +p1, ...
    return rows, -(rows @ mean)


def set_centre_taps(projection, rows: torch.Tensor, bias: torch.Tensor) -> None:
    """The projection conv reads ``rows`` [out, C] on its centre tap only (the other taps zero)."""
    conv = projection[0]
    with torch.no_grad():
        conv.weight.zero_()
        centre = conv.weight.shape[-1] // 2
        conv.weight[:, :, centre, centre] = rows.to(conv.weight)
        conv.bias.copy_(bias.to(conv.bias))
