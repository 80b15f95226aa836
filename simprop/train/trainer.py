"""Episodic training of one variant on one PASCAL-5i fold (paper §3.6, protocol.md §6).

* SGD with momentum and weight decay on the trainable parameters only (the
  ResNet-50 layers are frozen, their BatchNorm in eval mode).
* Each training sample is a query (image, class) pair of the fold's training
  classes with one support image of the same class (never the query itself);
  CANet's support augmentation (scale, crop, flip) when ``train.augment``.
* ICA (``simpropnet``): per-sample channel averaging of the query with the
  exponentially decaying probability of :func:`simprop.model.ica.ica_probability`.
* CANet's IOM (variants in ``model.iom_variants``): the network's last prediction for
  each training pair is kept (:class:`IOMHistory`) and fed back as its history input
  with probability ``train.iom_history_p`` the next time the pair is drawn, as CANet's
  ``train.py`` / ``dataset_mask_train.py`` do.
* The checkpoint is selected on the *validation* episodes (training-pool images
  of the fold's test classes, never the test episodes).
* Resumable: ``last.pt`` is written atomically after every epoch with the
  optimiser state and history; all randomness of epoch ``e`` is derived from
  ``(train.seed, e)``, so a resumed run continues exactly where a killed one
  stopped.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from simprop.data.datasets import (
    DataPaths,
    ImageStore,
)
from simprop.data.episodes import read_validation_episodes
from simprop.engine.encoded import EncodedFeatures
from simprop.engine.features import FeatureCache, open_feature_cache
from simprop.engine.inference import EpisodeRunner
from simprop.errors import TrainingDiverged
from simprop.infra.atomic import replace_on_success, write_json
from simprop.infra.device import amp_warning, autocast, needs_grad_scaler, precision, resolve_amp, resolve_device
from simprop.infra.distributed import (
    DistContext,
    barrier,
    gather_across,
    init_process_group,
    mean_across,
)
from simprop.infra.machine import machine_info
from simprop.layout import RunLayout
from simprop.model import VARIANTS as VARIANT_SPECS
from simprop.model import build_model, dual_prediction_loss
from simprop.model.checkpoint import (
    expected_identity,
)
from simprop.model.ica import ica_probability
from simprop.model.pca import feature_moments, pca_units, set_centre_taps
from simprop.model.shifted_gemm import kernel_record
from simprop.params import Params, ParamsError
from simprop.train.batches import BatchBuilder, IOMHistory, TrainingPairs, dropout_seed, epoch_order
from simprop.train.checkpointing import TrainingCheckpoints, file_digest, run_fingerprint, training_code_digest
from simprop.train.optim import SGD, learning_rate, parameter_groups
from simprop.train.shared import FoldShared


def _write_csv(path: Path, header: tuple[str, ...], rows: list[tuple]) -> None:
    with replace_on_success(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


class Trainer:
    """Trains ``variant`` on ``fold`` with training seed ``params.train.seed`` (one replicate of
    ``train.seeds``: :meth:`simprop.params.Params.for_seed`); :meth:`run` returns the training summary.

    The parts, each on one screen: set-up here (data, network, features, checkpoints,
    precision), the samples in :class:`~simprop.train.batches.BatchBuilder`, one SGD step in
    :meth:`_step`, validation in :meth:`validate`, checkpoint and resume in
    :class:`~simprop.train.checkpointing.TrainingCheckpoints`, the loop in :meth:`run`.
    """

    def __init__(self, params: Params, variant: str, fold: int, root: Path, tracker=None,
                 dist_context: DistContext | None = None, shared: FoldShared | None = None):  # fmt: skip
        self.params, self.variant, self.fold, self.root, self.tracker = params, variant, fold, Path(root), tracker
        self.dist = dist_context or DistContext()
        tp = params.train
        if tp.batch_size % self.dist.world_size:
            raise ParamsError(
                f"train.batch_size: {tp.batch_size} does not split evenly over the "
                f"{self.dist.world_size} torchrun processes; use a multiple of the process count"
            )
        self.spec = VARIANT_SPECS[variant]
        self.seed = tp.seed
        self.paths = RunLayout(self.root, variant, fold, tp.seed)
        self.device = init_process_group(self.dist, resolve_device(tp.device, "train.device"))
        # 1. the fold's data: training pairs, validation episodes, images
        self.data = DataPaths(self.root / params.data.root)
        self.store = ImageStore(self.data, tp.image_size)
        self.training = TrainingPairs(self.data.split(fold, "train"))
        self.pairs = self.training.pairs
        self.val_episodes = read_validation_episodes(self.data, fold, 1)
        # 2. the network, the frozen backbone's feature cache, the projection's initialisation
        self.model = build_model(variant, params.model, init_seed=tp.seed).to(self.device)
        self.iom = IOMHistory(len(self.pairs)) if self.model.uses_iom else None
        backbone_sha256 = self.model.backbone.checksum()
        self.cache = self._open_cache(backbone_sha256)
        shared = shared or FoldShared()
        self._init_projection(shared)
        # 3. the optimizer (torch.optim.SGD's update without its import of torch._dynamo: train/optim.py)
        self.optimizer = SGD(parameter_groups(self.model, tp.projection_lr_scale), lr=tp.lr, momentum=tp.momentum,
                             weight_decay=tp.weight_decay)  # fmt: skip
        # 4. a frozen projection on cached features: its outputs once, not its convolution every step
        self.encoded: EncodedFeatures | None = None
        if self.cache is not None and tp.projection_lr_scale == 0.0:
            self.encoded = shared.encoded(self.model.projection, self.cache, self.device, gray=self.spec.ica)
        self.batches = BatchBuilder(params, self.training, self.store, self.device, ica=self.spec.ica, iom=self.iom,
                                    cache=self.cache, encoded=self.encoded)  # fmt: skip
        # 5. what best.pt / last.pt record they were trained as, and what a resumed last.pt must share
        self.checkpoints = TrainingCheckpoints(
            self.paths,
            identity=expected_identity(params, variant, fold, self.root, backbone_sha256),
            fingerprint=run_fingerprint(params, variant, fold, inputs={
                "backbone_sha256": backbone_sha256,
                "code": training_code_digest(),
                "train_split": file_digest(self.data.split(fold, "train")),
                "val_episodes": file_digest(self.data.val_episode_file(fold)),
            }),
            epochs=tp.epochs,
        )  # fmt: skip
        # 6. precision, memory layout, and the DDP wrapper that averages the trainable layers'
        #    gradients over the processes (the frozen backbone is skipped)
        #    (train.amp / evaluate.amp "auto": bf16 where this device has it natively, else float32)
        self.amp = resolve_amp(tp.amp, self.device)
        self.eval_amp = resolve_amp(params.evaluate.amp, self.device)
        warning = amp_warning(self.device, self.amp)
        if warning and self.dist.is_main:
            print(f"warning: {warning}")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=needs_grad_scaler(self.device, self.amp))
        if tp.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.network: torch.nn.Module = self.model
        if self.dist.enabled:
            self.network = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )

    # ------------------------------------------------------------------ set-up

    def _open_cache(self, backbone_sha256: str) -> FeatureCache | None:
        """The ``features`` stage's cache when ``train.cache_backbone_features`` (else ``None``)."""
        tp = self.params.train
        if not tp.cache_backbone_features:
            return None
        cache = open_feature_cache(self.params, self.root, tp.image_size, backbone_sha256)
        if cache is None:
            raise RuntimeError(
                f"train.cache_backbone_features is true but {self.data.features} holds no cache for "
                f"image size {tp.image_size}; run `dvc repro features` first"
            )
        return cache

    def _init_projection(self, shared: FoldShared) -> None:
        """``train.projection_init: pca``: the projection's centre taps read the principal
        components of the fold's training features (:mod:`simprop.model.pca`), computed once per
        fold (``shared``)."""
        if self.params.train.projection_init != "pca":
            return
        units = self.model.projection[0].weight.shape[0]

        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            return pca_units(*feature_moments(self._feature_rows()), units)

        key = ("pca", self.fold, self.params.train.seed, self.cache is not None, units)
        set_centre_taps(self.model.projection, *shared.memo(key, compute))

    def _feature_rows(self, images: int = 256, pixels: int = 50_000, chunk_size: int | None = None):
        """Backbone feature vectors of up to ``images`` training images of the fold (a seeded
        choice), chunk by chunk ([M_i, 1536] each): every pixel, thinned to at most ``pixels``
        rows in all by a fixed stride over the images' pixels in order."""
        ids = sorted({image for image, _ in self.pairs})
        ids = [ids[i] for i in np.random.default_rng(self.params.train.seed).permutation(len(ids))[:images]]
        if chunk_size is None:
            chunk_size = 32 if self.cache is not None else 8  # 8 maps of 41 x 41 at the paper's 321 px
        stride, seen = None, 0
        for start in range(0, len(ids), chunk_size):
            chunk = ids[start : start + chunk_size]
            if self.cache is not None:
                feats = self.cache.get(chunk)
            else:
                batch = torch.stack([self.store.image(i) for i in chunk]).to(self.device)
                feats = self.model.backbone_features(batch).cpu()
            rows = feats.float().permute(0, 2, 3, 1).flatten(0, 2)
            if stride is None:  # every image has the same feature map size
                stride = max(1, math.ceil(len(ids) * feats.shape[2] * feats.shape[3] / pixels))
            yield rows[(-seen) % stride :: stride]
            seen += len(rows)


    # ------------------------------------------------------------------ step and validation

    def _step(self, batch: dict) -> float:
        size = self.params.train.image_size
        inputs = {k: batch[k] for k in ("query_img", "support_imgs", "query_feats", "support_feats", "query_encoded",
                                        "support_encoded", "query_history") if batch.get(k) is not None}  # fmt: skip
        with autocast(self.device, self.amp):
            outputs = self.network(support_masks=batch["support_masks"], out_size=(size, size), **inputs)
            loss = dual_prediction_loss(
                outputs, batch["query_labels"], batch["support_labels"] if self.spec.dual_prediction else None
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.iom is not None:  # every rank keeps the whole table: gather the batch's predictions
            pairs = gather_across(self.dist, batch["pair_ids"].to(self.device))
            self.iom.update(pairs, gather_across(self.dist, outputs["query_probs"].contiguous()))
        return float(loss.detach())

    def validate(self) -> float:
        # a frozen projection's outputs were computed once for every cached image (EncodedFeatures):
        # the validation reads them instead of running the 1536-channel conv on its images every epoch
        runner = EpisodeRunner(self.model, self.store, self.device, self.params.evaluate.batch_size, self.cache,
                               amp=self.eval_amp, encoded=self.encoded)  # fmt: skip
        miou = runner.evaluate(self.val_episodes, desc="validation").miou() * 100.0
        self.model.train()
        return miou


    # ------------------------------------------------------------------ loop

    def run(self, stop_after_epoch: int | None = None) -> dict:
        tp = self.params.train
        ctx = self.dist
        start_epoch, history = self.checkpoints.resume(self.model, self.optimizer, self.iom, self.tracker)
        started = time.perf_counter()
        per_epoch = tp.iterations_per_epoch or math.ceil(len(self.pairs) / tp.batch_size)
        local = tp.batch_size // ctx.world_size  # this process' share of every batch
        self.model.train()
        for epoch in range(start_epoch, tp.epochs):
            torch.manual_seed(dropout_seed(tp.seed, epoch, ctx.rank))
            p_ica = ica_probability(epoch, tp.ica_initial_p, tp.ica_decay) if self.spec.ica else 0.0
            order = epoch_order(tp.seed, epoch, len(self.pairs), per_epoch * tp.batch_size)
            losses = []
            bar = tqdm(
                range(per_epoch), desc=f"{self.variant} fold{self.fold} epoch {epoch + 1}/{tp.epochs}", unit="it",
                leave=False, **({} if ctx.is_main else {"disable": True}),
            )  # fmt: skip
            for it in bar:
                first = it * tp.batch_size + ctx.rank * local
                indices = list(range(first, first + local))
                pair_ids = [int(i) for i in order[indices]]
                lr = learning_rate(tp.lr, tp.lr_schedule, epoch * per_epoch + it, tp.epochs * per_epoch)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                loss = mean_across(ctx, self._step(self.batches.build(epoch, indices, pair_ids, p_ica)), self.device)
                step = epoch * per_epoch + it
                if not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"{self.variant} fold {self.fold}: loss is {loss} at epoch {epoch + 1}, step {step} "
                        f"(train.lr = {tp.lr}); lower train.lr or check the data, then rerun dvc repro"
                    )
                losses.append((step, loss))
                bar.set_postfix(loss=f"{loss:.4f}")
            history["loss"].extend(losses)
            record = {"epoch": epoch + 1, "loss": float(np.mean([v for _, v in losses])), "ica_p": p_ica}
            if ctx.is_main:
                if (epoch + 1) % tp.val_every == 0 or epoch + 1 == tp.epochs:
                    val = self.validate()
                    record["val_miou"] = val
                    history["val"].append((epoch + 1, val))
                    if val > history["best_val_miou"]:
                        history["best_val_miou"], history["best_epoch"] = val, epoch + 1
                        self.checkpoints.save_best(self.model, epoch + 1, val, tp.image_size)
                if self.tracker is not None:
                    self.tracker.log_history("train_loss", [st for st, _ in losses], [v for _, v in losses])
                    self.tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch + 1)
                print(json.dumps(record))
                run_id = self.tracker.run_id if self.tracker is not None else None
                self.checkpoints.save_last(epoch, history, self.model, self.optimizer, self.iom, run_id)
                self._write_curves(history)
            barrier(ctx)  # the other ranks wait for rank 0's validation and files
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
                break
        if ctx.is_main:  # also when a finished run resumed with nothing left (DVC removed the curves)
            self._write_curves(history)
        return self._summary(history, time.perf_counter() - started)

    def _write_curves(self, history: dict) -> None:
        _write_csv(self.paths.loss_curve, ("step", "loss"), [tuple(r) for r in history["loss"]])
        _write_csv(self.paths.val_curve, ("epoch", "val_miou"), [tuple(r) for r in history["val"]])

    def _summary(self, history: dict, wall_time: float) -> dict:
        last_losses = [v for _, v in history["loss"][-50:]]
        summary = {
            "variant": self.variant,
            "fold": self.fold,
            "train_seed": self.seed,
            "epochs": self.params.train.epochs,
            "best_val_miou": history["best_val_miou"],
            "best_epoch": history["best_epoch"],
            "final_loss": float(np.mean(last_losses)) if last_losses else None,
            "first_loss": history["loss"][0][1] if history["loss"] else None,
            "steps": len(history["loss"]),
            "resumed_from_epoch": history.get("resumed_from"),
            "wall_time_s": round(wall_time, 2),
            "device": str(self.device),
            "val_episodes": len(self.val_episodes),
            "processes": self.dist.world_size,
            # what ran, as decided on this machine (issue 29): strings, beside the numbers
            "precision": precision(self.device, self.amp),
            "amp": self.params.train.amp,
            "conv_kernel": kernel_record(self.model.projection[0].kernel),
            "machine": machine_info(),
        }
        if self.dist.is_main:
            write_json(self.paths.train_metrics, summary)
        return summary
