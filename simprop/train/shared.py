"""What the trainings of one fold, run one after another in one process, compute once.
"""

from __future__ import annotations

import torch

from simprop.engine.encoded import EncodedFeatures
from simprop.engine.features import FeatureCache


class FoldShared:
    """What the trainings of one fold, run one after another in one process, compute once.

    The ``train`` stage hands each worker a fold and trains every variant on it in turn
    (:func:`train_fold_variants`); the variants share the PCA initialisation of the projection,
    which reads the same training features whatever the variant (paid by each of the default
    setup's 20 trainings before; its cost: docs/performance.md, "Measurements behind code
    choices"), and, when the projection is frozen, its outputs (:class:`EncodedFeatures`).  A
    value is reused only when everything it was computed from matches: the PCA's key names the
    fold, seed, feature source and unit count; the encoded features are kept with the projection
    weights and the feature-cache index they were computed from, compared exactly
    (``torch.equal``) before reuse.  Computed once or five times, the values are the same, so the
    trainings are too.  A training on its own uses a fresh one.
    """

    def __init__(self, gray: bool = False) -> None:
        self.gray = gray  # encode the channel-averaged features too (some variant of the job uses ICA)
        self._values: dict[tuple, object] = {}
        self._encoded: list[tuple[torch.Tensor, torch.Tensor, dict, EncodedFeatures]] = []

    def memo(self, key: tuple, compute):
        """``compute()``, once per ``key`` (which must name everything the value depends on)."""
        if key not in self._values:
            self._values[key] = compute()
        return self._values[key]

    def encoded(self, projection, cache: FeatureCache, device: torch.device, gray: bool) -> EncodedFeatures:
        conv = projection[0]
        for weight, bias, index, table in self._encoded:
            if (torch.equal(weight, conv.weight) and torch.equal(bias, conv.bias) and index == cache.index
                    and (table.gray is not None or not gray) and table.color.device == device):  # fmt: skip
                return table
        table = EncodedFeatures(projection, cache, device, gray=gray or self.gray)
        self._encoded.append((conv.weight.detach().clone(), conv.bias.detach().clone(), dict(cache.index), table))
        return table
