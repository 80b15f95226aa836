"""The registered model's Python side: a ``mlflow.pyfunc`` model that loads ``best.pt`` through
simprop's own identity-checked, weights-only loader (:func:`simprop.model.load_checkpoint`).

MLflow's *models from code* (``mlflow.pyfunc.log_model(python_model=<path of a .py file>, ...)``,
MLflow >= 2.12, https://mlflow.org/docs/latest/ml/model/models-from-code/) stores the model as the
text of a Python file plus its artifacts; nothing is cloudpickled.  :data:`MODEL_CODE` is that
file: three lines that import :class:`Segmenter` from the installed ``simprop`` and hand it to
``mlflow.models.set_model``.  It is written to a temporary file when a model is logged
(:mod:`simprop.engine.registry`) rather than kept as a module here, because importing it
would call ``set_model`` - a side effect no library module of simprop may have.

``mlflow.pyfunc.load_model("models:/simprop-canet@fold0")`` therefore runs the stored
``MODEL_CODE`` (our source, as text) and :meth:`Segmenter.load_context`, which reads the
checkpoint with ``torch.load(weights_only=True)`` and checks its identity against the one recorded
when it was registered (``model_config["identity"]``).  ``simprop segment --model`` does not even
run that: it downloads ``artifacts/best.pt`` alone (:func:`simprop.engine.registry.fetch_checkpoint`).

Input (the signature, :func:`signature`): ``query`` uint8 ``[N, H, W, 3]`` RGB images,
``support_images`` uint8 ``[K, H, W, 3]`` and ``support_masks`` uint8 ``[K, H, W]`` (1 =
foreground), one size for all; output: uint8 ``[N, H, W]`` masks (1 = foreground) at that size,
predicted as ``simprop segment`` predicts (:mod:`simprop.segment.predict`).  Importing this module
imports mlflow (the base class), so only the model code and the registry import it.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np
import torch

from simprop.model import CheckpointIdentity, load_checkpoint
from simprop.params import ModelParams
from simprop.segment.inputs import mask_to_tensor, to_tensor
from simprop.segment.predict import encode_images, predict_masks

class Segmenter(mlflow.pyfunc.PythonModel):
    """k-shot segmentation with a registered simprop checkpoint (artifact ``checkpoint``)."""

    def load_context(self, context) -> None:
        config = context.model_config or {}
        identity = CheckpointIdentity.from_dict(config.get("identity"))
        params = None
        if config.get("model_params") and "backbone" in context.artifacts:  # the frozen backbone came along
            params = ModelParams(**{**config["model_params"], "backbone_weights": context.artifacts["backbone"]})
        self.model, self.meta = load_checkpoint(context.artifacts["checkpoint"], map_location="cpu", expected=identity,
                                                params=params)  # fmt: skip
        self.size = int(self.meta["image_size"])

    def predict(self, context, model_input, params=None):  # no type hints: the signature is given explicitly
        queries = np.asarray(model_input["query"], dtype=np.uint8)
        images = np.asarray(model_input["support_images"], dtype=np.uint8)
        masks = np.asarray(model_input["support_masks"], dtype=np.uint8)
        if images.shape[0] != masks.shape[0] or images.shape[0] == 0:
            raise ValueError(f"give k >= 1 support images and as many masks, got {images.shape[0]} and {masks.shape[0]}")
        device = next(self.model.parameters()).device
        support = torch.stack([to_tensor(img, self.size) for img in images]).to(device)
        support_masks = torch.stack([mask_to_tensor((m > 0).astype(np.uint8), self.size) for m in masks]).to(device)
        encoded = encode_images(self.model, support)
        out = predict_masks(self.model, encoded, support_masks, list(queries), self.size, device)
        return np.stack(out).astype(np.uint8)
