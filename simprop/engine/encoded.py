"""The outputs of a frozen encoder projection, computed once for every image of the feature cache.
"""

from __future__ import annotations

import torch

from simprop.engine.features import FeatureCache, cache_rows


class EncodedFeatures:
    """The frozen encoder conv and ReLU of every image of the feature cache, computed once.

    With ``train.projection_lr_scale = 0`` the projection is a fixed function of the image, so a
    training need not run its 1536-channel convolution, forward and backward, on every batch,
    a large share of a default step (docs/studies/2026-11-27-eval-batch-size.md;
    docs/performance.md, "Measurements behind code choices").
    The network gets these maps as ``query_encoded`` / ``support_encoded`` and applies the
    projection's dropout itself (:meth:`simprop.model.network.SimPropNet.forward`); the result
    is the training of the uncached path up to float summation order
    (``tests/test_frozen_projection.py``).
    """

    def __init__(self, projection, cache: FeatureCache, device: torch.device, gray: bool, chunk: int = 256) -> None:
        self.index = dict(cache.index)
        ids = sorted(self.index, key=self.index.get)
        self.color = self._encode(projection, cache, ids, device, chunk, gray=False)
        self.gray = self._encode(projection, cache, ids, device, chunk, gray=True) if gray else None

    @staticmethod
    @torch.no_grad()
    def _encode(projection, cache: FeatureCache, ids: list[str], device: torch.device, chunk: int, gray: bool) -> torch.Tensor:
        parts = [projection.conv_relu(cache.get(ids[i : i + chunk], gray=gray).to(device)) for i in range(0, len(ids), chunk)]
        return torch.cat(parts).contiguous()

    def get(self, image_ids: list[str], gray: bool = False) -> torch.Tensor:
        table = self.gray if gray else self.color
        if table is None:
            raise RuntimeError("EncodedFeatures was built without the channel-averaged (ICA) features")
        rows = torch.tensor(cache_rows(self.index, image_ids), dtype=torch.long, device=table.device)
        return table.index_select(0, rows)
