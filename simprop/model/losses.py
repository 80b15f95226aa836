"""Losses: cross-entropy with ignore index 255 on logits upsampled to the label size (DPr §3.3)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = 255


def upsample_logits(logits: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def segmentation_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of [N,2,h,w] logits against [N,H,W] labels (0/1, 255 = ignore).

    Logits are upsampled to the label size first.  A batch whose pixels are all 255 gives
    a zero loss (still attached to the graph) instead of NaN.
    """
    labels = labels.long()
    logits = upsample_logits(logits, tuple(labels.shape[-2:]))
    if not (labels != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


def dual_prediction_loss(
    outputs: dict[str, Tensor], query_labels: Tensor, support_labels: Tensor | None = None, return_terms: bool = False
):
    """CE(query) + CE(support) (paper §3.3); just CE(query) when there is no support output.

    ``outputs`` is the model's dict (``"query"`` [B,2,H,W], optional ``"support"`` [B*K,2,H,W]);
    ``query_labels`` [B,H,W]; ``support_labels`` [B,K,H,W], [B*K,H,W] or [B,H,W] (K=1).
    With ``return_terms`` returns ``(total, {"query": ..., "support": ...})``.
    """
    terms = {"query": segmentation_loss(outputs["query"], query_labels)}
    if "support" in outputs:
        if support_labels is None:
            raise ValueError("the model predicted the support masks (DPr) but no support_labels were given")
        support_logits = outputs["support"]
        support_labels = support_labels.reshape(-1, *support_labels.shape[-2:])
        if support_labels.shape[0] != support_logits.shape[0]:
            raise ValueError(
                f"support labels {tuple(support_labels.shape)} do not match support logits {tuple(support_logits.shape)}"
            )
        terms["support"] = segmentation_loss(support_logits, support_labels)
    total = sum(terms.values())
    return (total, terms) if return_terms else total
