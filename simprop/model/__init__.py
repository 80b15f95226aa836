"""SimPropNet model family (paper §3.2-3.5): CANet baseline, DPr, FBAF, ICA and k-shot."""

from simprop.model.checkpoint import (
    CheckpointError,
    CheckpointIdentity,
    UnsafeCheckpointError,
    expected_identity,
    load_checkpoint,
    save_checkpoint,
)
from simprop.model.encoder import BackboneWeightsError, build_backbone
from simprop.model.fbaf import attention_maps
from simprop.model.ica import apply_input_channel_averaging, ica_probability
from simprop.model.losses import IGNORE_INDEX, dual_prediction_loss, segmentation_loss
from simprop.model.network import VARIANTS, SimPropNet, VariantSpec, build_model
from simprop.model.prototypes import masked_average_pool

__all__ = [
    "VARIANTS",
    "BackboneWeightsError",
    "CheckpointError",
    "CheckpointIdentity",
    "IGNORE_INDEX",
    "SimPropNet",
    "UnsafeCheckpointError",
    "VariantSpec",
    "apply_input_channel_averaging",
    "attention_maps",
    "build_backbone",
    "build_model",
    "dual_prediction_loss",
    "expected_identity",
    "ica_probability",
    "load_checkpoint",
    "masked_average_pool",
    "save_checkpoint",
    "segmentation_loss",
]
