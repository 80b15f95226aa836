"""SimPropNet and its ablations in one network, configured by the variant name.

============  ========  ===============  ====
variant       fusion    dual prediction  ICA
============  ========  ===============  ====
canet         canet     no               no
dpr           canet     yes              no
fbaf          fbaf      no               no
dpr_fbaf      fbaf      yes              no
simpropnet    fbaf      yes              yes
============  ========  ===============  ====

CANet's iterative optimisation module (IOM) runs for the variants in ``model.iom_variants``
(``canet`` and ``dpr``, the CANet-fusion variants, by default; the FBAF variants only when
asked), as CANet trains and tests it (icoz69/CaNet ``train.py`` and ``dataset_mask_train.py``):
in training the fusion takes a *history* input, the sample's previous prediction (or zeros),
which the trainer keeps per training pair (:class:`simprop.train.batches.IOMHistory`); at test time
the first pass sees zeros and ``model.iom_iterations`` more passes each see the softmax of the
previous one.  ICA is a training-time input operation (:mod:`simprop.model.ica`); the network only
records whether the variant uses it (``model.uses_ica``, :meth:`SimPropNet.maybe_apply_ica`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simprop.model.canet import CANetFusion
from simprop.model.decoder import Decoder
from simprop.model.encoder import BACKBONE_CHANNELS, FeatureProjection, build_backbone
from simprop.model.fbaf import FBAFFusion
from simprop.model.ica import apply_input_channel_averaging
from simprop.model.losses import upsample_logits
from simprop.model.prototypes import average_shots, masked_average_pool, region_is_empty
from simprop.params import VARIANTS as VARIANT_NAMES
from simprop.params import ModelParams


@dataclass(frozen=True)
class VariantSpec:
    name: str
    fusion: Literal["canet", "fbaf"]
    dual_prediction: bool
    ica: bool


VARIANTS: dict[str, VariantSpec] = {
    "canet": VariantSpec("canet", fusion="canet", dual_prediction=False, ica=False),
    "dpr": VariantSpec("dpr", fusion="canet", dual_prediction=True, ica=False),
    "fbaf": VariantSpec("fbaf", fusion="fbaf", dual_prediction=False, ica=False),
    "dpr_fbaf": VariantSpec("dpr_fbaf", fusion="fbaf", dual_prediction=True, ica=False),
    "simpropnet": VariantSpec("simpropnet", fusion="fbaf", dual_prediction=True, ica=True),
}
assert tuple(VARIANTS) == tuple(VARIANT_NAMES), "model variants and params.VARIANTS disagree"


class SimPropNet(nn.Module):
    """Shared encoder -> (CANet | FBAF) fusion -> shared ASPP decoder, support and query branch.

    Call ``model(query_img, support_imgs, support_masks)`` with query [B,3,H,W], supports
    [B,K,3,H,W] and masks [B,K,H,W] in {0,1} (ignore pixels set to 0), or pass precomputed
    backbone features instead (``query_feats`` [B,1536,h,w], ``support_feats``
    [B,K,1536,h,w], from :meth:`backbone_features`; ``out_size`` is then required), or the
    encoder conv's outputs (``query_encoded`` / ``support_encoded``, see :meth:`forward`).
    Returns ``{"query": [B,2,H,W] logits}`` plus ``"support": [B*K,2,Hs,Ws]`` for DPr
    variants in training mode (or when ``predict_support=True``).
    """

    def __init__(self, variant: str, params: ModelParams) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose from {list(VARIANTS)}")
        self.variant = variant
        self.spec = VARIANTS[variant]
        self.params = params
        self.uses_iom = variant in params.iom_variants
        self.iom_iterations = params.iom_iterations if self.uses_iom else 0
        self.backbone = build_backbone(params.backbone_weights, params.backbone_seed)
        self.backbone_no_grad = True  # benchmarks flip this to measure the cost of autograd
        channels = params.channels  # model.channels: 256 in the paper (FEATURE_CHANNELS, ASPP_CHANNELS)
        self.projection = FeatureProjection(BACKBONE_CHANNELS, channels, dropout=params.dropout, kernel=params.conv_kernel)
        if self.spec.fusion == "canet":
            self.fusion: nn.Module = CANetFusion(channels, dropout=params.dropout)
        else:
            self.fusion = FBAFFusion(channels, history=self.uses_iom)
        self.decoder = Decoder(self.fusion.out_channels, channels=channels, dropout=params.dropout)

    # ------------------------------------------------------------------ properties / helpers

    @property
    def uses_ica(self) -> bool:
        return self.spec.ica

    @property
    def dual_prediction(self) -> bool:
        return self.spec.dual_prediction

    def train(self, mode: bool = True) -> "SimPropNet":
        super().train(mode)
        self.backbone.eval()  # frozen BatchNorm keeps its running statistics
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("backbone.")]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def parameter_counts(self) -> dict[str, int]:
        """Parameters the optimizer updates, and the frozen rest (the backbone, and the encoder
        projection when ``train.projection_lr_scale`` is 0)."""
        head = self.trainable_parameters()
        trainable = sum(p.numel() for p in head if p.requires_grad)
        frozen = sum(p.numel() for p in self.backbone.parameters()) + sum(p.numel() for p in head if not p.requires_grad)
        return {"trainable": trainable, "frozen": frozen}

    def backbone_features(self, images: Tensor) -> Tensor:
        """Frozen layer2 ⊕ layer3 features [N,1536,h,w] of normalised images [N,3,H,W]."""
        ctx = torch.no_grad() if self.backbone_no_grad else contextlib.nullcontext()
        with ctx:
            return self.backbone(images)

    def maybe_apply_ica(self, query_img: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
        """ICA on the query images when this variant uses it and the model is training."""
        if not (self.uses_ica and self.training):
            return query_img
        return apply_input_channel_averaging(query_img, p, generator)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        query_img: Tensor | None = None,
        support_imgs: Tensor | None = None,
        support_masks: Tensor | None = None,
        *,
        query_feats: Tensor | None = None,
        support_feats: Tensor | None = None,
        out_size: tuple[int, int] | None = None,
        predict_support: bool | None = None,
        query_encoded: Tensor | None = None,
        support_encoded: Tensor | None = None,
        query_history: Tensor | None = None,
    ) -> dict[str, Tensor]:
        if support_masks is None:
            raise ValueError("support_masks [B,K,H,W] is required")
        if support_masks.dim() == 3:  # [B,H,W]: one shot
            support_masks = support_masks.unsqueeze(1)
        batch, shots = support_masks.shape[:2]
        support_size = tuple(support_masks.shape[-2:])

        if query_encoded is not None and support_encoded is not None:
            # already through the shared encoder conv and its ReLU: evaluation memoises them (see
            # :meth:`encode`), and so does a training with a frozen projection
            # (simprop.engine.encoded.EncodedFeatures). The projection's Dropout2d, the one part that is
            # not a function of the image, runs here in training, on the same concatenation of
            # query and support maps as below, so it draws the same random channels.
            if out_size is None:
                raise ValueError("out_size=(H, W) is required with encoded features")
            fq, fs = query_encoded, support_encoded.flatten(0, 1) if support_encoded.dim() == 5 else support_encoded
            if self.training:
                dropped = self.projection.dropout(torch.cat([fq, fs], dim=0))
                fq, fs = dropped[:batch], dropped[batch:]
            return self._head(fq, fs, support_masks, batch, shots, support_size, out_size, predict_support, query_history)
        if query_feats is None:
            if query_img is None:
                raise ValueError("give query_img [B,3,H,W] or query_feats [B,1536,h,w]")
            query_feats = self.backbone_features(query_img)
        if out_size is None:
            if query_img is None:
                raise ValueError("out_size=(H, W) is required when only query_feats are given")
            out_size = tuple(query_img.shape[-2:])
        if support_feats is None:
            if support_imgs is None:
                raise ValueError("give support_imgs [B,K,3,H,W] or support_feats [B,K,1536,h,w]")
            if support_imgs.dim() == 4:
                support_imgs = support_imgs.unsqueeze(1)
            support_feats = self.backbone_features(support_imgs.flatten(0, 1))
        elif support_feats.dim() == 5:
            support_feats = support_feats.flatten(0, 1)
        if support_feats.shape[0] != batch * shots or query_feats.shape[0] != batch:
            raise ValueError(
                f"batch mismatch: query {tuple(query_feats.shape)}, support features "
                f"{tuple(support_feats.shape)}, support masks {tuple(support_masks.shape)}"
            )

        # shared encoder conv (one call when query and support maps have the same size)
        if query_feats.shape[-2:] == support_feats.shape[-2:]:
            projected = self.projection(torch.cat([query_feats, support_feats], dim=0))
            fq, fs = projected[:batch], projected[batch:]
        else:
            fq, fs = self.projection(query_feats), self.projection(support_feats)
        return self._head(fq, fs, support_masks, batch, shots, support_size, out_size, predict_support, query_history)

    def encode(self, backbone_feats: Tensor) -> Tensor:
        """The shared encoder conv on backbone features; in eval mode a per-image function."""
        return self.projection(backbone_feats)

    def _head(self, fq, fs, support_masks, batch, shots, support_size, out_size, predict_support, query_history=None):
        """Prototypes, fusion and decoding from encoded query [B,C,h,w] and support [B*K,C,h,w] maps.

        ``query_history`` [B,2,h',w'] is the IOM's history input for the query (resized to the
        feature size as CANet does; ``None`` = zeros).  For IOM variants in training the output
        also holds ``"query_probs"``: the softmax of the query logits at the feature size,
        detached, which the trainer keeps as the sample's next history.
        """
        predict_support = self.spec.dual_prediction and self.training if predict_support is None else predict_support
        if query_history is not None and self.uses_iom:
            query_history = F.interpolate(query_history.to(fq.dtype), size=fq.shape[-2:], mode="bilinear", align_corners=True)
        else:
            query_history = None

        # dual probe feature extraction (eq. 1), per support, then averaged over the shots (eq. 4)
        masks = support_masks.flatten(0, 1)
        zf, zb = masked_average_pool(fs, masks)
        fg_empty, bg_empty = region_is_empty(masks, tuple(fs.shape[-2:]))
        zf_q = average_shots(zf.view(batch, shots, -1), fg_empty.view(batch, shots))
        zb_q = average_shots(zb.view(batch, shots, -1), bg_empty.view(batch, shots))

        outputs: dict[str, Tensor] = {}
        if predict_support and fq.shape[-2:] == fs.shape[-2:]:
            # the support branch: each support with its own prototypes, decoded by the same decoder;
            # a support has no previous prediction (CANet never predicts it): zero history
            history = None
            if query_history is not None:
                history = torch.cat([query_history, query_history.new_zeros(fs.shape[0], *query_history.shape[1:])])
            logits = self._fuse_and_decode(torch.cat([fq, fs]), torch.cat([zf_q, zf]), torch.cat([zb_q, zb]), history)
            query_logits, support_logits = logits[:batch], logits[batch:]
        else:
            query_logits = self._fuse_and_decode(fq, zf_q, zb_q, query_history)
            support_logits = self._fuse_and_decode(fs, zf, zb) if predict_support else None
        outputs["query"] = upsample_logits(query_logits, out_size)
        if support_logits is not None:
            outputs["support"] = upsample_logits(support_logits, support_size)
        if self.uses_iom and self.training:
            outputs["query_probs"] = F.softmax(query_logits.detach().float(), dim=1)
        return outputs

    def _fuse_and_decode(self, features: Tensor, fg_prototype: Tensor, bg_prototype: Tensor,
                         history: Tensor | None = None) -> Tensor:  # fmt: skip
        """One fused and decoded pass; at test time plus the IOM's refinement passes."""
        state = self.fusion.prepare(features, fg_prototype, bg_prototype)
        logits = self.decoder(self.fusion.refine(state, history))
        if self.training:
            return logits  # CANet trains one pass, its history coming from the sample's last visit
        for _ in range(self.iom_iterations):  # CANet's IOM: feed the previous prediction back
            history = F.softmax(logits, dim=1)
            logits = self.decoder(self.fusion.refine(state, history))
        return logits


def build_model(variant: str, params: ModelParams | None = None, init_seed: int | None = None) -> SimPropNet:
    """The network of ``variant`` (one of :data:`VARIANTS`) configured by ``model.*`` params.

    ``model.channels`` sets the width of the encoder conv, the fusion and the ASPP (256 in
    the paper); narrower networks are for CPU demos and tests.  ``init_seed`` seeds the
    initialisation of the trainable layers (the global RNG is left untouched); training
    passes ``train.seed``, so the evaluation's untrained reference is exactly the network
    training started from.
    """
    params = params if params is not None else ModelParams()
    if init_seed is None:
        return SimPropNet(variant, params)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return SimPropNet(variant, params)
