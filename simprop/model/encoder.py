"""Shared encoder (paper §3.2, protocol §6): frozen dilated ResNet-50 + one trainable conv.

The frozen part (:class:`Backbone`) is ResNet-50 up to ``layer3`` with ``layer3`` dilated
(stride 1, dilation 2), so the output stride is 8 (321x321 -> 41x41).  The outputs of
``layer2`` (512 ch) and ``layer3`` (1024 ch) are concatenated (1536 ch).  Its BatchNorm
layers always stay in eval mode (CANet's public code let them drift).

The trainable part (:class:`FeatureProjection`) is a 3x3 conv with dilation 2 to 256
channels, ReLU and Dropout2d, shared by the support and the query branch.
"""

from __future__ import annotations

import hashlib
import os
import socket
import urllib.error
from pathlib import Path

import torch
from torch import Tensor, nn

from simprop.errors import BackboneWeightsError
from simprop.model.resnet import EXPANSION, LAYERS, init_weights, make_layer
from simprop.model.shifted_gemm import ShiftedGemmConv2d

LAYER2_CHANNELS = 512
LAYER3_CHANNELS = 1024
BACKBONE_CHANNELS = LAYER2_CHANNELS + LAYER3_CHANNELS  # 1536
FEATURE_CHANNELS = 256  # the shared 3x3 dilated conv (paper §3.2)
LAYER3_DILATION = 2
PROJECTION_DILATION = 2
OUTPUT_STRIDE = 8

# ImageNet statistics that the (normalised) input images must be standardised with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMAGENET_WEIGHTS = "ResNet50_Weights.IMAGENET1K_V1"  # torchvision's, imported only when fetched
DOWNLOAD_TIMEOUT_S = 20.0  # socket timeout while torchvision fetches the ImageNet weights

# The modules of torchvision's ResNet-50 that the backbone keeps.
BACKBONE_LAYERS = ("conv1", "bn1", "layer1", "layer2", "layer3")


class Backbone(nn.Module):
    """Frozen ResNet-50 stem + layer1..layer3 (layer3 dilated); returns layer2 ⊕ layer3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        (w1, n1, s1), (w2, n2, s2), (w3, n3, s3) = LAYERS
        self.layer1 = make_layer(64, w1, n1, s1, dilation=1)
        self.layer2 = make_layer(w1 * EXPANSION, w2, n2, s2, dilation=1)
        # layer3: stride replaced by dilation 2 in every block (CANet / DeepLab), output stride 8
        self.layer3 = make_layer(w2 * EXPANSION, w3, n3, s3, dilation=LAYER3_DILATION)
        init_weights(self)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "Backbone":
        # Frozen: BatchNorm keeps its running statistics whatever the parent's mode.
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer1(x)
        f2 = self.layer2(x)
        f3 = self.layer3(f2)
        return torch.cat([f2, f3], dim=1)

    def checksum(self) -> str:
        """sha256 over every frozen tensor (parameters and BN buffers), in key order."""
        h = hashlib.sha256()
        for key, value in sorted(self.state_dict().items()):
            h.update(key.encode())
            t = value.detach().to("cpu").contiguous()
            h.update(str(t.dtype).encode())
            h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
        return h.hexdigest()


def build_backbone(weights: str, seed: int = 0) -> Backbone:
    """Build the frozen backbone from ``model.backbone_weights``.

    ``imagenet``: torchvision's ``ResNet50_Weights.IMAGENET1K_V1`` (cached under
    ``$TORCH_HOME`` or downloaded); if unreachable, :class:`BackboneWeightsError` explains
    how to provide a local file (never a silent random fallback).
    ``none``: random initialisation seeded by ``seed`` (the global RNG is untouched).
    anything else: path to a torchvision ResNet-50 state dict (``torch.save(m.state_dict())``).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = Backbone()
    if weights == "none":
        return backbone
    if weights == "imagenet":
        state = _imagenet_state_dict()
        source = f"torchvision {IMAGENET_WEIGHTS}"
    else:
        state = _state_dict_from_file(weights)
        source = f"model.backbone_weights file {weights!r}"
    _load_backbone_state(backbone, state, source)
    return backbone


def _imagenet_state_dict() -> dict[str, Tensor]:
    from torchvision.models import ResNet50_Weights

    weights = ResNet50_Weights.IMAGENET1K_V1
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return weights.get_state_dict(progress=False)
    except (urllib.error.URLError, OSError, RuntimeError, ValueError) as exc:
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        raise BackboneWeightsError(
            f"model.backbone_weights=imagenet: could not fetch torchvision's ResNet-50 ImageNet "
            f"weights ({weights.url}): {type(exc).__name__}: {exc}. This machine may "
            f"have no internet. Download that file on a machine that has, then either copy it "
            f"to {hub}/ (torchvision's cache, $TORCH_HOME) or set model.backbone_weights to its "
            f"path (e.g. `dvc exp run -S model.backbone_weights=/path/resnet50-0676ba61.pth`); "
            f"use model.backbone_weights=none for a random (seeded) backbone."
        ) from exc
    finally:
        socket.setdefaulttimeout(previous)


def _state_dict_from_file(path: str) -> dict[str, Tensor]:
    if not os.path.isfile(path):
        raise BackboneWeightsError(
            f"model.backbone_weights={path!r}: no such file. Give 'imagenet', 'none' or the path "
            f"of a torchvision ResNet-50 state dict (torch.save(resnet50().state_dict(), path))."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, not a torch file
        raise BackboneWeightsError(
            f"model.backbone_weights={path!r}: cannot read it as a torch state dict "
            f"({type(exc).__name__}: {exc}); re-download or re-save the file."
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneWeightsError(
            f"model.backbone_weights={path!r}: expected a ResNet-50 state dict (a dict of "
            f"tensors), got {type(state).__name__}"
        )
    return state


def _load_backbone_state(backbone: Backbone, state: dict[str, Tensor], source: str) -> None:
    expected = backbone.state_dict()
    used = {k: v for k, v in state.items() if k.split(".")[0] in BACKBONE_LAYERS}
    missing = sorted(set(expected) - set(used))
    unexpected = sorted(set(used) - set(expected))
    mismatched = [
        f"{k}: file {tuple(used[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in used and tuple(used[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        detail = "; ".join(
            part
            for part in (
                f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}" if missing else "",
                f"unexpected keys {unexpected[:5]}" if unexpected else "",
                f"shape mismatch {mismatched[:3]}" if mismatched else "",
            )
            if part
        )
        raise BackboneWeightsError(
            f"{source} is not a torchvision ResNet-50 state dict: {detail}. Save one with "
            f"torch.save(torchvision.models.resnet50(...).state_dict(), path)."
        )
    backbone.load_state_dict(used, strict=True)


class FeatureProjection(nn.Sequential):
    """3x3 dilated conv 1536 -> 256, ReLU, Dropout2d: the trainable part of the encoder.

    The conv is an ``nn.Conv2d`` that can run on the CPU as one matrix product and nine shifted
    adds (:mod:`simprop.model.shifted_gemm`), 2.6x as fast as oneDNN's ``conv2d`` on the cached
    9 x 9 maps of an AVX2 CPU, slower on an AVX-512 one: ``kernel`` (``model.conv_kernel``)
    pins a form or lets ``auto`` measure.
    """

    def __init__(
        self,
        in_channels: int = BACKBONE_CHANNELS,
        out_channels: int = FEATURE_CHANNELS,
        dilation: int = PROJECTION_DILATION,
        dropout: float = 0.5,
        kernel: str = "auto",
    ) -> None:
        super().__init__(
            ShiftedGemmConv2d(in_channels, out_channels, dilation=dilation, kernel=kernel),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
        )

    def conv_relu(self, x: Tensor) -> Tensor:
        """The conv and ReLU alone: with frozen weights, a function of the image (no dropout)."""
        return self[1](self[0](x))

    @property
    def dropout(self) -> nn.Dropout2d:
        return self[2]
