"""Small generated episodes for the model tests (coloured shapes on textured backgrounds)."""

from __future__ import annotations

import numpy as np
import torch

from simprop.model.encoder import IMAGENET_MEAN, IMAGENET_STD


def shape_image(rng: np.random.Generator, size: tuple[int, int], colour, kind: str) -> tuple[np.ndarray, np.ndarray]:
    h, w = size
    img = np.empty((h, w, 3), np.float32)
    img[:] = rng.uniform(0, 1, 3)  # background colour
    img += rng.normal(0, 0.05, img.shape).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = rng.integers(h // 3, 2 * h // 3), rng.integers(w // 3, 2 * w // 3)
    ry, rx = rng.integers(h // 6, h // 3), rng.integers(w // 6, w // 3)
    if kind == "ellipse":
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    else:
        mask = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
    img[mask] = colour
    return np.clip(img, 0, 1), mask.astype(np.uint8)


def normalise(img: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(img).permute(2, 0, 1).float()
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (t - mean) / std


def make_episodes(n: int, size=(65, 65), shots: int = 1, seed: int = 0):
    """n episodes -> query [n,3,H,W], supports [n,K,3,H,W], support masks [n,K,H,W] float,
    query labels [n,H,W] long, support labels [n,K,H,W] long (with a 255 border)."""
    rng = np.random.default_rng(seed)
    kinds = ("ellipse", "rect")
    q, s, sm, ql = [], [], [], []
    for i in range(n):
        colour = rng.uniform(0, 1, 3)
        kind = kinds[i % 2]
        qi, qm = shape_image(rng, size, colour, kind)
        q.append(normalise(qi))
        ql.append(torch.from_numpy(qm).long())
        sup, sup_m = [], []
        for _ in range(shots):
            si, smk = shape_image(rng, size, colour, kind)
            sup.append(normalise(si))
            sup_m.append(torch.from_numpy(smk).float())
        s.append(torch.stack(sup))
        sm.append(torch.stack(sup_m))
    query, supports, masks, qlab = torch.stack(q), torch.stack(s), torch.stack(sm), torch.stack(ql)
    slab = masks.long().clone()
    slab[..., 0, :] = 255
    qlab[..., 0, :] = 255
    return query, supports, masks, qlab, slab
