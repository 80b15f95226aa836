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
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from simprop.datasets import (
    DataPaths,
    ImageStore,
    augment_support,
    binary_target,
    read_episodes,
    read_pairs,
)
from simprop.distributed import DistContext, barrier, gather_across, init_process_group, mean_across
from simprop.evaluation import EpisodeRunner, resolve_device, write_json
from simprop.features import FeatureCache, cache_rows, open_feature_cache
from simprop.model import VARIANTS as VARIANT_SPECS
from simprop.model import build_model, dual_prediction_loss, save_checkpoint
from simprop.model.checkpoint import (
    CheckpointIdentity,
    CorruptCheckpointError,
    expected_identity,
    load_training_state,
    save_training_state,
)
from simprop.model.ica import apply_input_channel_averaging, ica_probability
from simprop.optim import SGD
from simprop.params import Params, ParamsError
from simprop.precision import amp_warning, autocast, needs_grad_scaler

STATE_FILE = "state.json"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class TrainPaths:
    """Where one (variant, fold) training writes its outputs (docs/architecture.md)."""

    root: Path
    variant: str
    fold: int

    @property
    def model_dir(self) -> Path:
        return self.root / "models" / self.variant / f"fold{self.fold}"

    @property
    def best(self) -> Path:
        return self.model_dir / "best.pt"

    @property
    def last(self) -> Path:
        return self.model_dir / "last.pt"

    @property
    def state(self) -> Path:
        return self.model_dir / STATE_FILE

    @property
    def metrics(self) -> Path:
        return self.root / "metrics" / "train" / self.variant / f"fold{self.fold}.json"

    @property
    def loss_curve(self) -> Path:
        return self.root / "plots" / "train" / "loss" / self.variant / f"fold{self.fold}.csv"

    @property
    def val_curve(self) -> Path:
        return self.root / "plots" / "train" / "val" / self.variant / f"fold{self.fold}.csv"


def run_fingerprint(params: Params, variant: str, fold: int, inputs: dict[str, str] | None = None) -> str:
    """What a checkpoint must share with the current run to be resumed.

    Everything that shapes training except ``train.epochs`` (raising the epoch
    count continues a finished run), the device, the process count (N DDP
    processes see the same batches as one) and how many folds train side by
    side, plus ``inputs``: digests of what the params do not pin down (the
    frozen backbone's weights, the fold's training list and validation
    episodes, the training code), so that a rebuilt backbone, regenerated data
    or changed code never resumes a stale checkpoint.
    """
    train = params.to_dict()["train"]
    # raising the epoch count continues a constant-lr run; a poly schedule depends on it
    for key in ("device", "processes", "parallel_folds", "variants", "folds") + (("epochs",) if params.train.lr_schedule == "constant" else ()):
        train.pop(key)
    relevant = {
        "variant": variant,
        "fold": fold,
        "train": train,
        "model": params.to_dict()["model"],
        "data": params.to_dict()["data"],
        "splits": params.to_dict()["splits"],
        "episodes": params.to_dict()["episodes"],
        "inputs": inputs or {},
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# The code that shapes a training (the train stage's code deps in dvc.yaml): when DVC reruns
# the stage because one of them changed, the old last.pt must not be resumed.
TRAINING_CODE = ("training.py", "optim.py", "distributed.py", "evaluation.py", "datasets.py", "features.py", "metrics.py", "model")


def training_code_digest() -> str:
    """sha256 over the source files in :data:`TRAINING_CODE` (a package: all its ``*.py``)."""
    package = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in TRAINING_CODE:
        path = package / name
        for file in sorted(path.glob("*.py")) if path.is_dir() else [path]:
            h.update(file.relative_to(package).as_posix().encode())
            h.update(file.read_bytes())
    return h.hexdigest()


POLY_POWER = 0.9  # PFENet util/util.py poly_learning_rate (and DeepLab): lr * (1 - it / max_it) ** 0.9


def learning_rate(base_lr: float, schedule: str, step: int, total_steps: int) -> float:
    """``train.lr_schedule``: ``constant`` (CANet's train.py) or ``poly`` (PFENet's
    ``poly_learning_rate``: ``base_lr * (1 - step / total_steps) ** 0.9``)."""
    if schedule == "constant":
        return base_lr
    return base_lr * (1.0 - min(step, total_steps) / total_steps) ** POLY_POWER


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

    Why: the default setup's random 16-channel view of the 1536 backbone channels throws away
    most of what the parameter-free prototype matcher reads, and at the projection's small rate
    (``train.projection_lr_scale``) training moves it little.  The matcher on the validation
    episodes (``python3 benchmarks/projection_views.py``, mean of the four folds) scores 33.1
    through the seeded random view, 52.0 through this one and 56.9 on all 1536 channels; through
    the projections the networks had learned from the random view at scale 0.01, 43.7-48.5.
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


def parameter_groups(model, projection_lr_scale: float) -> list[dict]:
    """The optimizer's parameter groups: every trainable parameter at ``train.lr``, except the
    encoder's projection (1536 -> ``model.channels``, ReLU) at ``train.lr * train.projection_lr_scale``
    when that scale is not 1.

    Why a separate rate: the projection reads the frozen backbone's ReLU features, which are all
    non-negative with a large common mean (default setup: per-channel mean 0.46, std 0.58; one
    3 x 3 receptive field has a squared norm of ~6,000), so one SGD step moves a projection
    unit's pre-activation by ~lr x 6,000 x its error signal, the same sign at every pixel. At the
    head's rate such steps push whole units below zero everywhere, where ReLU passes no gradient
    to revive them: on the default setup at lr 0.05, 3 to 12 of the 16 projection channels were
    dead (zero on every pixel of 100 cached images, ``benchmarks/dead_channels.py``) in the
    checkpoints of the run before this parameter; ``simpropnet`` fold 0 had lost 8 of them by
    step 50 (docs/architecture.md, "Dead projection channels"). CANet's ``train.py`` uses one
    rate (2.5e-3 with 256 channels); the paper setup keeps that (scale 1).

    Scale 0 freezes the projection at its seeded initialisation: its parameters stop requiring
    gradients and are left out of the optimizer (so weight decay cannot shrink them either), and
    the trainer feeds the network its cached outputs (:class:`EncodedFeatures`).
    """
    if projection_lr_scale == 1.0:
        return [{"params": model.trainable_parameters()}]
    projection = list(model.projection.parameters())
    ids = {id(p) for p in projection}
    head = [p for p in model.trainable_parameters() if id(p) not in ids]
    if projection_lr_scale == 0.0:
        for p in projection:
            p.requires_grad_(False)
        return [{"params": head}]
    return [{"params": head, "lr_scale": 1.0}, {"params": projection, "lr_scale": float(projection_lr_scale)}]


class EncodedFeatures:
    """The frozen encoder conv and ReLU of every image of the feature cache, computed once.

    With ``train.projection_lr_scale = 0`` the projection is a fixed function of the image, so a
    training need not run its 1536-channel convolution, forward and backward, on every batch:
    on the default setup its two matrix products are ~40 % of a step (``torch.profiler``, one
    thread), and a step is 2.2-2.4x faster without them (``benchmarks/bench_eval_batch.py``).
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


class FoldShared:
    """What the trainings of one fold, run one after another in one process, compute once.

    The ``train`` stage hands each worker a fold and trains every variant on it in turn
    (:func:`train_fold_variants`); the variants share the PCA initialisation of the projection,
    which reads the same training features whatever the variant (3.7 s of one thread, paid by
    each of the default setup's 20 trainings before), and, when the projection is frozen, its
    outputs (:class:`EncodedFeatures`).  A value is reused only when everything it was computed
    from matches: the PCA's key names the fold, seed, feature source and unit count; the encoded
    features are kept with the projection weights and the feature-cache index they were computed
    from, compared exactly (``torch.equal``) before reuse.  Computed once or five times, the
    values are the same, so the trainings are too.  A training on its own uses a fresh one.
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


def _epoch_order(seed: int, epoch: int, num_pairs: int, needed: int) -> np.ndarray:
    """Which training pair each of the epoch's ``needed`` samples is (repeating the permutation)."""
    return np.resize(np.random.default_rng([seed, epoch]).permutation(num_pairs), needed)


def _sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of sample ``index`` of ``epoch``: support choice, augmentation, ICA."""
    return np.random.default_rng([seed, epoch, index])


def _dropout_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.default_rng([seed, epoch, 2**31 + rank]).integers(0, 2**62))


def _write_csv(path: Path, header: tuple[str, ...], rows: list[tuple]) -> None:
    from simprop.atomic import replace_on_success

    with replace_on_success(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


class IOMHistory:
    """CANet's IOM history in training: the last predicted probabilities of every training pair.

    CaNet's ``dataset_mask_train.py`` keeps ``history_mask_list[index]`` per (image, class)
    training pair; ``train.py`` writes the softmax of the prediction (at the feature size) back
    after every step, and the next time the pair is drawn the dataset returns it with
    probability ``1 - prob`` (``-prob 0.7``), zeros otherwise and zeros before its first visit.
    Stored as float16 [pairs, 2, h, w]; allocated at the first update (h, w = feature size).
    """

    def __init__(self, num_pairs: int) -> None:
        self.num_pairs = num_pairs
        self.table: torch.Tensor | None = None
        self.seen = torch.zeros(num_pairs, dtype=torch.bool)

    def history(self, pairs: list[int], feed: list[bool], device: torch.device) -> torch.Tensor | None:
        """The history input of a batch: the stored prediction where fed and seen, else zeros."""
        if self.table is None:
            return None
        index = torch.tensor(pairs, dtype=torch.long)
        keep = torch.tensor(feed, dtype=torch.bool) & self.seen[index]
        return (self.table[index].float() * keep[:, None, None, None]).to(device)

    def update(self, pairs: torch.Tensor, probs: torch.Tensor) -> None:
        probs = probs.detach().to("cpu", torch.float16)
        if self.table is None:
            self.table = torch.zeros(self.num_pairs, *probs.shape[1:], dtype=torch.float16)
        index = pairs.to("cpu", torch.long)
        self.table[index] = probs
        self.seen[index] = True

    def state_dict(self) -> dict:
        return {"table": self.table, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.table, self.seen = state["table"], state["seen"]


class Trainer:
    """Trains ``variant`` on ``fold``; :meth:`run` returns the training summary."""

    def __init__(self, params: Params, variant: str, fold: int, root: Path, tracker=None,
                 dist_context: DistContext | None = None, shared: FoldShared | None = None):  # fmt: skip
        self.params = params
        shared = shared or FoldShared()
        self.dist = dist_context or DistContext()
        if params.train.batch_size % self.dist.world_size:
            raise ParamsError(
                f"train.batch_size: {params.train.batch_size} does not split evenly over the "
                f"{self.dist.world_size} torchrun processes; use a multiple of the process count"
            )
        self.variant = variant
        self.fold = fold
        self.root = Path(root)
        self.tracker = tracker
        self.spec = VARIANT_SPECS[variant]
        self.paths = TrainPaths(self.root, variant, fold)
        self.device = init_process_group(self.dist, resolve_device(params.train.device, "train.device"))
        self.data = DataPaths(self.root / params.data.root)
        tp = params.train
        self.store = ImageStore(self.data, tp.image_size)
        self._targets: dict[tuple[str, int], torch.Tensor] = {}  # see _target
        self.pairs = read_pairs(self.data.split(fold, "train"))
        self.by_class: dict[int, list[str]] = {}
        for image, cls in self.pairs:
            self.by_class.setdefault(cls, []).append(image)
        for cls, images in sorted(self.by_class.items()):
            if len(set(images)) < 2:
                raise RuntimeError(
                    f"{self.data.split(fold, 'train')}: class {cls} has fewer than 2 images, so no support "
                    "different from the query exists; use more data or a looser small-object filter"
                )
        self.val_episodes = read_episodes(self.data.val_episode_file(fold), 1)
        self.model = build_model(variant, params.model, init_seed=tp.seed).to(self.device)
        self.iom = IOMHistory(len(self.pairs)) if self.model.uses_iom else None
        backbone_sha256 = self.model.backbone.checksum()
        self.cache: FeatureCache | None = None
        if tp.cache_backbone_features:
            self.cache = open_feature_cache(params, self.root, tp.image_size, backbone_sha256)
            if self.cache is None:
                raise RuntimeError(
                    f"train.cache_backbone_features is true but {self.data.features} holds no cache for "
                    f"image size {tp.image_size}; run `dvc repro features` first"
                )
        if tp.projection_init == "pca":
            units = self.model.projection[0].weight.shape[0]

            def compute() -> tuple[torch.Tensor, torch.Tensor]:
                return pca_units(*feature_moments(self._feature_rows()), units)

            key = ("pca", fold, tp.seed, self.cache is not None, units)
            set_centre_taps(self.model.projection, *shared.memo(key, compute))
        # torch.optim.SGD's update without its 2 s import of torch._dynamo (simprop/optim.py)
        self.optimizer = SGD(parameter_groups(self.model, tp.projection_lr_scale), lr=tp.lr, momentum=tp.momentum,
                             weight_decay=tp.weight_decay)  # fmt: skip
        # a frozen projection on cached features: its outputs once, not its convolution every step
        self.encoded: EncodedFeatures | None = None
        if self.cache is not None and tp.projection_lr_scale == 0.0:
            self.encoded = shared.encoded(self.model.projection, self.cache, self.device, gray=self.spec.ica)
        self.fingerprint = run_fingerprint(
            params,
            variant,
            fold,
            inputs={
                "backbone_sha256": backbone_sha256,
                "code": training_code_digest(),
                "train_split": _file_digest(self.data.split(fold, "train")),
                "val_episodes": _file_digest(self.data.val_episode_file(fold)),
            },
        )
        # What best.pt / last.pt record they were trained as (checked by every loader)
        self.identity = expected_identity(params, variant, fold, self.root, backbone_sha256)
        warning = amp_warning(self.device, tp.amp)
        if warning and self.dist.is_main:
            print(f"warning: {warning}")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=needs_grad_scaler(self.device, tp.amp))
        if tp.channels_last:
            self.model.to(memory_format=torch.channels_last)
        # What the training step calls: the model itself, or its DDP wrapper that averages the
        # gradients of the trainable layers over the processes (the frozen backbone is skipped).
        self.network: torch.nn.Module = self.model
        if self.dist.enabled:
            self.network = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )

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

    # ------------------------------------------------------------------ state

    def _resume(self) -> tuple[int, dict]:
        """The next epoch to run and the history so far (fresh start if nothing matches).

        ``last.pt`` is read by :func:`simprop.model.checkpoint.load_training_state` (weights only,
        never arbitrary pickled objects): an unsafe file or one of another variant or fold stops
        the stage with a clear error; a truncated one, an older format or another training
        fingerprint (params, data, backbone or code changed) starts from scratch.
        """
        fresh = {"loss": [], "val": [], "best_val_miou": -1.0, "best_epoch": -1, "resumed_from": None}
        if not self.paths.last.is_file():
            return 0, fresh
        try:
            state = load_training_state(self.paths.last, CheckpointIdentity(variant=self.variant, fold=self.fold))
        except CorruptCheckpointError as exc:  # a torn file from a kill during the (atomic) replace is
            print(f"ignoring unreadable {self.paths.last} ({exc}); starting from scratch")  # impossible, but be safe
            return 0, fresh
        if state is None:
            print(f"{self.paths.last} is not a training state of this simprop version; starting from scratch")
            return 0, fresh
        if state.get("fingerprint") != self.fingerprint:
            print(f"{self.paths.last} was trained with other params, data, backbone or code; starting from scratch")
            return 0, fresh
        missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
        if unexpected or any(not k.startswith("backbone.") for k in missing):
            print(f"{self.paths.last} does not fit this network; starting from scratch")
            return 0, fresh
        self.optimizer.load_state_dict(state["optimizer"])
        if self.iom is not None and state.get("iom_history") is not None:
            self.iom.load_state_dict(state["iom_history"])
        history = state["history"]
        history["loss"] = [tuple(r) for r in history["loss"]]
        history["val"] = [tuple(r) for r in history["val"]]
        history["resumed_from"] = state["epoch"] + 2  # 1-based number of the first epoch run now
        print(f"resuming {self.variant} fold {self.fold} after completed epoch {state['epoch'] + 1}")
        if self.tracker is not None:  # link the MLflow run to the run whose last.pt it continues
            self.tracker.set_tags({
                "resumed_from_run": state.get("run_id") or "unknown",
                "resumed_from_epoch": history["resumed_from"],
            })  # fmt: skip
        return state["epoch"] + 1, history

    def _save_last(self, epoch: int, history: dict) -> None:
        save_training_state(
            self.paths.last, identity=self.identity, fingerprint=self.fingerprint, epoch=epoch,
            model_state=self.model.trainable_state_dict(), optimizer_state=self.optimizer.state_dict(),
            history=history, run_id=self.tracker.run_id if self.tracker is not None else None,
            iom_history=self.iom.state_dict() if self.iom is not None else None,
        )  # fmt: skip
        state = {
            "variant": self.variant,
            "fold": self.fold,
            "completed_epochs": epoch + 1,
            "epochs": self.params.train.epochs,
            "fingerprint": self.fingerprint,
            "resumed_from": history.get("resumed_from"),
        }
        write_json(self.paths.state, state)

    # ------------------------------------------------------------------ batches

    def _batch(self, epoch: int, indices: list[int], pair_ids: list[int], p_ica: float) -> dict:
        """The tensors of the samples of training pairs ``pair_ids`` (global sample numbers ``indices`` of ``epoch``).

        Every random choice of a sample (its support, augmentation and ICA switch) comes from
        :func:`_sample_rng`, so a sample is the same whichever process builds it.
        """
        tp = self.params.train
        support_ids, q_targets, s_targets, s_images, gray, feed_history = [], [], [], [], [], []
        items = [self.pairs[i] for i in pair_ids]
        for index, (query, cls) in zip(indices, items):
            rng = _sample_rng(tp.seed, epoch, index)
            candidates = [i for i in self.by_class[cls] if i != query]
            support = candidates[int(rng.integers(len(candidates)))]
            support_ids.append(support)
            gray.append(bool(self.spec.ica and p_ica > 0 and rng.random() < p_ica))
            q_targets.append(self._target(query, cls))
            if tp.augment:
                s_image, s_label = augment_support(
                    self.store.image(support), self.store.input_label(support), tp.scale_min, tp.scale_max, rng
                )
                s_images.append(s_image)
                s_targets.append(binary_target(s_label, cls).to(torch.uint8))
            else:
                s_targets.append(self._target(support, cls))
            feed_history.append(bool(self.iom is not None and rng.random() < tp.iom_history_p))
        query_ids = [q for q, _ in items]
        gray = torch.tensor(gray, dtype=torch.bool)
        s_targets = torch.stack(s_targets)[:, None]
        batch = {
            "query_labels": torch.stack(q_targets).long().to(self.device),
            "support_labels": s_targets.long().to(self.device),
            # support_mask(): the class's pixels; void (255) is not foreground
            "support_masks": (s_targets == 1).float().to(self.device),
            "ica_fraction": float(gray.float().mean()),
            "pair_ids": torch.tensor(pair_ids, dtype=torch.long),
        }
        if self.iom is not None:
            batch["query_history"] = self.iom.history(pair_ids, feed_history, self.device)
        features = self.encoded if self.encoded is not None else self.cache
        if features is not None:
            color = features.get(query_ids)
            if gray.any():  # the channel-averaged features of the ICA queries only
                color[gray] = features.get([q for q, g in zip(query_ids, gray.tolist()) if g], gray=True)
            kind = "encoded" if self.encoded is not None else "feats"
            batch[f"query_{kind}"] = color.to(self.device)
            batch[f"support_{kind}"] = features.get(support_ids)[:, None].to(self.device)
        else:
            queries = torch.stack([self.store.image(q) for q in query_ids])
            if gray.any():
                queries[gray] = apply_input_channel_averaging(queries[gray], p=1.0)
            batch["query_img"] = queries.to(self.device)
            supports = s_images if tp.augment else [self.store.image(s) for s in support_ids]
            batch["support_imgs"] = torch.stack(supports)[:, None].to(self.device)
        return batch

    def _target(self, image_id: str, cls: int) -> torch.Tensor:
        """:func:`binary_target` of an unaugmented image for ``cls`` as uint8 {0, 1, 255}.

        With the feature cache (the default setup: small inputs, an image is a query or support in
        ~50 steps of a training) it is made once per (image, class) and kept (~4 KB each); without
        it (the paper setup: 321 px, ~11k training pairs, ~100 KB each) it is made per use, so the
        trainer does not hold another ~1 GB beside the images it already memoises.
        """
        key = (image_id, cls)
        target = self._targets.get(key)
        if target is None:
            target = binary_target(self.store.input_label(image_id), cls).to(torch.uint8)
            if self.cache is not None:
                self._targets[key] = target
        return target

    def _step(self, batch: dict) -> float:
        size = self.params.train.image_size
        inputs = {k: batch[k] for k in ("query_img", "support_imgs", "query_feats", "support_feats", "query_encoded",
                                        "support_encoded", "query_history") if batch.get(k) is not None}  # fmt: skip
        with autocast(self.device, self.params.train.amp):
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

    # ------------------------------------------------------------------ loop

    def validate(self) -> float:
        # a frozen projection's outputs were computed once for every cached image (EncodedFeatures):
        # the validation reads them instead of running the 1536-channel conv on its images every epoch
        runner = EpisodeRunner(self.model, self.store, self.device, self.params.evaluate.batch_size, self.cache,
                               amp=self.params.evaluate.amp, encoded=self.encoded)  # fmt: skip
        miou = runner.evaluate(self.val_episodes, desc="validation").miou() * 100.0
        self.model.train()
        return miou

    def run(self, stop_after_epoch: int | None = None) -> dict:
        tp = self.params.train
        ctx = self.dist
        start_epoch, history = self._resume()
        started = time.perf_counter()
        per_epoch = tp.iterations_per_epoch or math.ceil(len(self.pairs) / tp.batch_size)
        local = tp.batch_size // ctx.world_size  # this process' share of every batch
        self.model.train()
        for epoch in range(start_epoch, tp.epochs):
            torch.manual_seed(_dropout_seed(tp.seed, epoch, ctx.rank))
            p_ica = ica_probability(epoch, tp.ica_initial_p, tp.ica_decay) if self.spec.ica else 0.0
            order = _epoch_order(tp.seed, epoch, len(self.pairs), per_epoch * tp.batch_size)
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
                loss = mean_across(ctx, self._step(self._batch(epoch, indices, pair_ids, p_ica)), self.device)
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
                        save_checkpoint(
                            self.paths.best, self.model, identity=self.identity, epoch=epoch + 1, val_miou=val,
                            image_size=tp.image_size, fold=self.fold, fingerprint=self.fingerprint,
                        )  # fmt: skip
                if self.tracker is not None:
                    self.tracker.log_history("train_loss", [st for st, _ in losses], [v for _, v in losses])
                    self.tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch + 1)
                print(json.dumps(record))
                self._save_last(epoch, history)
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
        }
        if self.dist.is_main:
            write_json(self.paths.metrics, summary)
        return summary


def train_fold_variants(params: Params, variants: list[str], fold: int, root: Path | str = ".") -> list[dict]:
    """The ``train`` stage's job for one fold: every variant of ``variants`` in turn, each in its
    own MLflow run (:func:`train_fold`), sharing what the fold's trainings compute alike
    (:class:`FoldShared`).  Module-level so that :func:`simprop.parallel.run_folds` can run it
    in a worker process.  Returns the summaries in variant order."""
    shared = FoldShared(gray=any(VARIANT_SPECS[v].ica for v in variants))
    return [train_fold(params, variant, fold, root, shared=shared) for variant in variants]


def train_fold(params: Params, variant: str, fold: int, root: Path | str = ".", shared: FoldShared | None = None) -> dict:
    """One (variant, fold) training of the ``train`` stage, in its own MLflow run.

    Under torchrun every rank calls it, rank 0 alone logs and writes.  Returns the summary
    (best validation mIoU and epoch, wall time, ...) on rank 0, ``{}`` on the others.
    ``shared``: what an earlier training of this fold in this process computed (:class:`FoldShared`).
    """
    from simprop.distributed import context_from_env, destroy
    from simprop.tracking import stage_run

    root = Path(root)
    ctx = context_from_env()
    try:
        if not ctx.is_main:  # rank > 0: train its share of each batch; rank 0 logs and writes
            Trainer(params, variant, fold, root, dist_context=ctx, shared=shared).run()
            return {}
        with stage_run("train", params, variant=variant, fold=fold, shots=1) as run:
            trainer = Trainer(params, variant, fold, root, tracker=run, dist_context=ctx, shared=shared)
            run.set_tags({
                "device": str(trainer.device), "processes": ctx.world_size, "torch_threads": torch.get_num_threads(),
                **trainer.model.parameter_counts(),
            })  # fmt: skip
            summary = trainer.run()
            run.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float)) and v is not None})
            run.log_artifact(trainer.paths.best, "checkpoint")
            run.log_artifact(trainer.paths.metrics)
            # one folder per curve: both files are named fold<i>.csv
            run.log_artifact(trainer.paths.loss_curve, "curves/loss")
            run.log_artifact(trainer.paths.val_curve, "curves/val")
    finally:
        destroy(ctx)
    print(
        f"{variant} fold {fold}: best validation mIoU {summary['best_val_miou']:.2f} "
        f"at epoch {summary['best_epoch']} ({summary['wall_time_s']} s)",
        flush=True,
    )
    return summary
