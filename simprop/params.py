"""The one typed, validated place where ``params.yaml`` is read.

Every stage calls :func:`load_params` before doing any work.  A missing or
misspelt key, a value of the wrong type or an unknown choice raises
:class:`ParamsError` whose message names the dotted key (``train.lr``) and
says what is allowed, so a bad ``dvc exp run -S ...`` fails in a second
instead of after an hour of training.

The schema is a tree of frozen dataclasses, one per ``params.yaml`` section.
Field types drive the checks; extra rules live in each class' ``validate``.

Why one module of ~540 lines: every key of every section, with its type, default, allowed values
and the comment saying what it does, is here and nowhere else (the brief's "one typed place
where params are loaded and validated"); split by section, a reader would look for a key in
nine files.
"""

from __future__ import annotations

import dataclasses
import math
import os
import posixpath
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from simprop.errors import ParamsError

VARIANTS = ("canet", "dpr", "fbaf", "dpr_fbaf", "simpropnet")
FOLDS = (0, 1, 2, 3)

REPO_PATHS = ("data.root", "backbone.path")
# folders of the repository that git and DVC own: no output of a stage may live there
CONTROL_DIRS = (".git", ".dvc")
"""Keys naming where a stage *writes*: relative paths inside the repository (DVC tracks only
outputs inside it, and refuses an outside one only after the stage wrote there).  Read-only file
inputs may live anywhere: ``model.backbone_weights``, ``backbone.source`` (a weights file) and
``analysis.supervised_weights`` are not checked; neither is ``tracking.tracking_uri``."""


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class SyntheticParams:
    """The embedded generated dataset (a miniature VOC2012 + SBD tree)."""

    num_sbd_images: int = 480  # SBD train+val images (training pool)
    num_voc_images: int = 240  # VOC2012 trainval images with masks (val half = test pool)
    width: int = 128
    height: int = 96
    seed: int = 0

    def validate(self, key: str) -> None:
        _positive(self, key, "num_sbd_images", "num_voc_images")
        for name in ("width", "height"):
            # OSLSM's filter samples rows/columns 32k + 1 (simprop/data/filters.py): a side of 96
            # holds 3 of them (1, 33, 65). The rule's bare minimum for 3 is 66 px, but the generator
            # sizes its objects to the image, and below 96 px they no longer pass the filter.
            if getattr(self, name) < 96:
                raise ParamsError(f"{key}.{name}: must be >= 96 pixels, got {getattr(self, name)}")


@dataclass(frozen=True)
class DataParams:
    source: Literal["synthetic", "voc"] = "synthetic"
    root: str = "data"
    voc_url: str = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
    voc_md5: str = "6cd6e144f989b92b3379bac3b3de84fd"
    sbd_url: str = (
        "https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/"
        "semantic_contours/benchmark.tgz"
    )
    sbd_md5: str = "82b4d87ceb2ed10f6038a1cba92111cb"
    train_noval_url: str = "http://home.bharathh.info/pubs/codes/SBD/train_noval.txt"
    train_noval_md5: str = "79bff800c5f0b1ec6b21080a3c066722"
    workers: int = 0  # 0 = all cores of the machine
    # a download attempt that receives less than 64 KiB in this many seconds is abandoned
    # (retried, resuming, then given up on with an error)
    stall_timeout_s: float = 60.0
    synthetic: SyntheticParams = field(default_factory=SyntheticParams)

    def validate(self, key: str) -> None:
        for name in ("voc_md5", "sbd_md5", "train_noval_md5"):
            value = getattr(self, name)
            if len(value) != 32 or any(c not in "0123456789abcdef" for c in value.lower()):
                raise ParamsError(f"{key}.{name}: expected a 32-digit hex md5, got {value!r}")
        if self.workers < 0:
            raise ParamsError(f"{key}.workers: must be >= 0 (0 = all cores), got {self.workers}")
        _positive(self, key, "stall_timeout_s")


@dataclass(frozen=True)
class SplitsParams:
    protocol: Literal["oslsm", "pfenet"] = "oslsm"
    small_object_filter: Literal["oslsm", "pfenet", "none"] = "oslsm"
    folds: tuple[int, ...] = FOLDS

    def validate(self, key: str) -> None:
        _folds(self.folds, f"{key}.folds")


@dataclass(frozen=True)
class EpisodesParams:
    test_seeds: tuple[int, ...] = (1, 2, 3)
    val_seed: int = 1000
    num_episodes: int = 1000
    num_val_episodes: int = 300
    max_shots: int = 5
    # pairs: the query is a uniformly drawn (image, class) pair, then distinct supports of its class
    # (OSLSM, CANet, HSNet, PFENet: classes in proportion to their pair counts); uniform: a class
    # uniformly among the fold's five, then query and supports among its images
    class_sampling: Literal["pairs", "uniform"] = "pairs"

    def validate(self, key: str) -> None:
        _positive(self, key, "num_episodes", "num_val_episodes", "max_shots")
        if not self.test_seeds:
            raise ParamsError(f"{key}.test_seeds: give at least one seed")
        if len(set(self.test_seeds)) != len(self.test_seeds):
            raise ParamsError(f"{key}.test_seeds: seeds must be distinct, got {list(self.test_seeds)}")
        if self.val_seed in self.test_seeds:
            raise ParamsError(
                f"{key}.val_seed: {self.val_seed} is also a test seed; the validation episodes "
                "used for checkpoint selection must be drawn with a seed disjoint from test_seeds"
            )


@dataclass(frozen=True)
class BackboneParams:
    """The ``backbone`` stage: which frozen ResNet-50 weights to materialise at ``path``."""

    source: str = "imagenet"  # imagenet | random | path to a torchvision ResNet-50 state dict
    seed: int = 0
    calibration_images: int = 160  # random source only: images for BatchNorm statistics
    # random source only: every bottleneck's residual branch is scaled by this factor (its last
    # BatchNorm weight), so the random deep net keeps its input's information (see backbone.py)
    residual_scale: float = 1.0
    path: str = "backbone/resnet50.pt"

    def validate(self, key: str) -> None:
        if not self.source:
            raise ParamsError(f"{key}.source: use 'imagenet', 'random' or a file path")
        if self.source == "random" and self.calibration_images < 1:
            raise ParamsError(f"{key}.calibration_images: must be >= 1 for a random backbone")
        if not 0.0 <= self.residual_scale <= 1.0:
            raise ParamsError(f"{key}.residual_scale: must be in [0, 1], got {self.residual_scale}")
        if not self.path:
            raise ParamsError(f"{key}.path: must not be empty")


@dataclass(frozen=True)
class ModelParams:
    backbone_weights: str = "none"  # imagenet | none | path to a ResNet-50 state dict
    backbone_seed: int = 0  # initialises a random backbone when backbone_weights is none
    # CANet's iterative optimisation module (IOM): the variants that run it (history input in
    # training, refinement passes at test time), and its test-time refinement passes
    iom_variants: tuple[str, ...] = ("canet", "dpr")
    iom_iterations: int = 4
    dropout: float = 0.5
    channels: int = 256  # width of the shared encoder conv, fusion and ASPP (256 in the paper)
    # the encoder conv's form on the CPU in float32 (simprop/model/shifted_gemm.py): "auto" times the
    # shifted GEMM and conv2d on the first call of each shape and keeps the faster (a timing-dependent
    # choice: float rounding may differ between runs); "shifted_gemm" / "conv2d" pin one. Checkpoints
    # written before this key ran "shifted_gemm" (simprop.model.checkpoint.load_checkpoint)
    conv_kernel: Literal["auto", "shifted_gemm", "conv2d"] = "auto"

    def validate(self, key: str) -> None:
        if self.channels < 8:
            raise ParamsError(f"{key}.channels: must be >= 8, got {self.channels}")
        if self.iom_iterations < 0:
            raise ParamsError(f"{key}.iom_iterations: must be >= 0, got {self.iom_iterations}")
        for v in self.iom_variants:
            if v not in VARIANTS:
                raise ParamsError(f"{key}.iom_variants: unknown variant {v!r}; choose from {list(VARIANTS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ParamsError(f"{key}.dropout: must be in [0, 1), got {self.dropout}")
        if not self.backbone_weights:
            raise ParamsError(f"{key}.backbone_weights: use 'imagenet', 'none' or a file path")


@dataclass(frozen=True)
class TrainParams:
    variants: tuple[str, ...] = VARIANTS
    folds: tuple[int, ...] = FOLDS
    lr: float = 2.5e-3
    lr_schedule: Literal["constant", "poly"] = "constant"  # poly: lr * (1 - step / steps) ** 0.9
    # the encoder projection's rate is lr * projection_lr_scale (simprop.train.optim.parameter_groups);
    # 0 freezes it at its seeded initialisation
    projection_lr_scale: float = 1.0
    # the encoder projection's initial weights: "default" = nn.Conv2d's seeded init; "pca" = its
    # centre tap reads the fold's training features along their leading principal components,
    # whitened, each as a +/- pair of units (simprop.model.pca.pca_projection_init)
    projection_init: Literal["default", "pca"] = "default"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 8
    epochs: int = 180
    iterations_per_epoch: int = 0  # 0 = one pass over the fold's training pairs
    image_size: int = 321
    augment: bool = True  # CANet's support augmentation: scale, crop, flip
    scale_min: float = 1.0
    scale_max: float = 1.5
    ica_initial_p: float = 0.25
    ica_decay: float = 0.98  # p(epoch) = ica_initial_p * ica_decay ** epoch
    # IOM variants: probability that a sample's stored previous prediction is fed as the history
    # input (else zeros); CANet's train.py `-prob 0.7` is the probability of zeros
    iom_history_p: float = 0.3
    cache_backbone_features: bool = False  # only valid without augmentation
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # mixed precision (simprop/infra/device.py): true = bf16 on CPU, bf16/fp16 on CUDA; "auto" = bf16
    # where it is native (CPU with avx512_bf16/amx_bf16, CUDA with bf16), float32 elsewhere
    amp: bool | Literal["auto"] = False
    channels_last: bool = False  # channels-last memory layout for the trainable convolutions
    # training replicates: every (variant, fold) is trained once per seed (initialisation, sample
    # order, supports, dropout and ICA draws all derive from it); the report gives each cell as the
    # mean and spread over them and tests the paper's claims against that spread
    seeds: tuple[int, ...] = (0,)
    val_every: int = 1
    # DDP processes on this machine (one per GPU); > 1 relaunches the train stage through
    # torchrun, each process taking batch_size / processes samples of every batch
    processes: int = 1
    # folds trained at once by the train stage, each in its own process (which trains the variants in turn)
    # with cores // parallel_folds threads (simprop/infra/parallel.py); 1 = one after another, as with
    # processes > 1 (DDP spreads each fold over the processes, and the folds take turns)
    parallel_folds: int = 1
    # the training seed of one job: not a params.yaml key (train.seeds is), set per replicate by
    # Params.for_seed; the first of train.seeds until then
    seed: int | None = field(default=None, metadata={"derived": "train.seed is set per replicate from "
                             "train.seeds; write train.seeds: [N] instead of train.seed: N"})

    def __post_init__(self) -> None:
        if self.seed is None:
            object.__setattr__(self, "seed", self.seeds[0] if self.seeds else 0)

    def validate(self, key: str) -> None:
        for v in self.variants:
            if v not in VARIANTS:
                raise ParamsError(f"{key}.variants: unknown variant {v!r}; choose from {list(VARIANTS)}")
        if not self.variants:
            raise ParamsError(f"{key}.variants: give at least one variant")
        if not self.seeds:
            raise ParamsError(f"{key}.seeds: give at least one training seed, e.g. [0, 1, 2]")
        if len(set(self.seeds)) != len(self.seeds):
            raise ParamsError(f"{key}.seeds: training seeds must be distinct, got {list(self.seeds)}")
        if any(seed < 0 for seed in self.seeds):
            raise ParamsError(f"{key}.seeds: training seeds must be >= 0, got {list(self.seeds)}")
        _folds(self.folds, f"{key}.folds")
        _positive(self, key, "lr", "batch_size", "epochs", "image_size", "val_every")
        if self.projection_lr_scale < 0:
            raise ParamsError(f"{key}.projection_lr_scale: must be >= 0 (0 freezes the encoder conv), "
                              f"got {self.projection_lr_scale}")  # fmt: skip
        if self.projection_init not in ("default", "pca"):
            raise ParamsError(f"{key}.projection_init: use 'default' or 'pca', got {self.projection_init!r}")
        if self.iterations_per_epoch < 0:
            raise ParamsError(f"{key}.iterations_per_epoch: must be >= 0, got {self.iterations_per_epoch}")
        if not 0 <= self.momentum < 1:
            raise ParamsError(f"{key}.momentum: must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ParamsError(f"{key}.weight_decay: must be >= 0, got {self.weight_decay}")
        if not 0 < self.scale_min <= self.scale_max:
            raise ParamsError(f"{key}.scale_min/scale_max: need 0 < scale_min <= scale_max")
        if not 0 <= self.ica_initial_p <= 1:
            raise ParamsError(f"{key}.ica_initial_p: must be a probability, got {self.ica_initial_p}")
        if not 0 <= self.iom_history_p <= 1:
            raise ParamsError(f"{key}.iom_history_p: must be a probability, got {self.iom_history_p}")
        if not 0 < self.ica_decay <= 1:
            raise ParamsError(f"{key}.ica_decay: must be in (0, 1], got {self.ica_decay}")
        if self.cache_backbone_features and self.augment:
            raise ParamsError(
                f"{key}.cache_backbone_features: backbone features can only be cached when "
                f"{key}.augment is false (augmented images change every epoch)"
            )
        _device(self.device, f"{key}.device")
        if self.processes < 1:
            raise ParamsError(f"{key}.processes: must be >= 1, got {self.processes}")
        if self.batch_size % self.processes:
            raise ParamsError(
                f"{key}.batch_size: {self.batch_size} does not split evenly over {key}.processes = "
                f"{self.processes}; use a multiple of the process count"
            )
        if self.parallel_folds < 1:
            raise ParamsError(f"{key}.parallel_folds: must be >= 1, got {self.parallel_folds}")


@dataclass(frozen=True)
class EvaluateParams:
    shots: tuple[int, ...] = (1, 5)
    image_size: int = 321  # network input size
    # the label the prediction is scored against: original = the label's own size (HSNet, PFENet);
    # 321 = the label resized (nearest) to 321 x 321, as CANet's code scores (the paper's baselines)
    resolution: Literal["original", "321"] = "original"
    # void (255) pixels: ignore = in neither intersection nor union (HSNet, PFENet, CANet's loss);
    # background = counted as background (OSLSM's test code)
    void: Literal["ignore", "background"] = "ignore"
    batch_size: int = 16
    identical_input: bool = True  # support = query test (paper Table 5)
    device: str = "auto"
    # the network under autocast (simprop/infra/device.py; true, false or "auto" as train.amp); controls stay float32
    amp: bool | Literal["auto"] = False
    # folds evaluated at once by the evaluate stage (simprop/infra/parallel.py)
    parallel_folds: int = 1

    def validate(self, key: str) -> None:
        if not self.shots:
            raise ParamsError(f"{key}.shots: give at least one shot count")
        for s in self.shots:
            if s < 1:
                raise ParamsError(f"{key}.shots: shots must be >= 1, got {s}")
        _positive(self, key, "image_size", "batch_size", "parallel_folds")
        _device(self.device, f"{key}.device")


@dataclass(frozen=True)
class ReportParams:
    num_qualitative: int = 4

    def validate(self, key: str) -> None:
        if self.num_qualitative < 0:
            raise ParamsError(f"{key}.num_qualitative: must be >= 0")


@dataclass(frozen=True)
class AnalysisParams:
    variant: str = "simpropnet"  # trained model whose errors are analysed
    fold: int = 0
    background_pairs_per_class: int = 200
    error_pairs: int = 1000
    overlap_episodes: int = 1000  # 1-shot test episodes of the error-overlap analysis; 0 = all
    supervised_weights: str = "voc"  # voc (torchvision DeepLabV3 VOC-label weights) | none | path
    seed: int = 7
    # images per pass of the full networks the analyses run (ResNet-50, DeepLabV3); not
    # evaluate.batch_size, whose default-setup value (256 episodes of tiny cached maps) made
    # these passes slower and larger (docs/studies/2026-11-27-eval-batch-size.md)
    batch_size: int = 16

    def validate(self, key: str) -> None:
        if self.variant not in VARIANTS:
            raise ParamsError(f"{key}.variant: unknown variant {self.variant!r}; choose from {list(VARIANTS)}")
        _folds((self.fold,), f"{key}.fold")
        _positive(self, key, "background_pairs_per_class", "error_pairs", "batch_size")
        if self.overlap_episodes < 0:
            raise ParamsError(f"{key}.overlap_episodes: must be >= 0 (0 = all), got {self.overlap_episodes}")
        if not self.supervised_weights or self.supervised_weights == "imagenet":
            raise ParamsError(
                f"{key}.supervised_weights: use 'voc' (torchvision's DeepLabV3 VOC-label weights), "
                "'none' (skip the error-overlap analysis) or the path of a deeplabv3_resnet50 state dict"
            )


@dataclass(frozen=True)
class TrackingParams:
    experiment: str = "simprop"
    tracking_uri: str = ""  # empty: MLFLOW_TRACKING_URI, else sqlite:///<repo root>/mlflow.db
    # how long a stage waits for a tracking server (http/https URI) to answer before any work
    connect_timeout_s: float = 5.0
    # log + register every evaluated checkpoint (simprop/engine/registry.py): auto = on for a
    # tracking server (http/https), off for the local sqlite store
    register_models: Literal["auto", True, False] = "auto"
    registered_model: str = "simprop-{variant}"  # one registered model per variant

    def validate(self, key: str) -> None:
        if not self.experiment:
            raise ParamsError(f"{key}.experiment: must not be empty")
        _positive(self, key, "connect_timeout_s")
        if self.register_models != "auto" and not isinstance(self.register_models, bool):
            raise ParamsError(f"{key}.register_models: use auto, true or false, got {self.register_models!r}")
        name = self.registered_model.replace("{variant}", "")
        if "{variant}" not in self.registered_model or not re.fullmatch(r"[\w.\-]*", name):
            raise ParamsError(
                f"{key}.registered_model: {self.registered_model!r} must contain {{variant}} (one registered "
                "model per variant) and otherwise only letters, digits, '_', '-' and '.', e.g. 'team-simprop-{variant}'"
            )


@dataclass(frozen=True)
class SlurmParams:
    """Where and how the ``train`` / ``evaluate`` jobs run on SLURM (``executor.kind: slurm``,
    :mod:`simprop.infra.slurm`): one array task per (variant, fold, training seed)."""

    partition: str = ""  # empty: the cluster's default partition
    account: str = ""  # sbatch --account; empty: the user's default
    qos: str = ""  # sbatch --qos; empty: the partition's default
    gpus_per_job: int = 0  # GPUs of each job (sbatch --gpus-per-node); 0 for CPU jobs
    cpus_per_job: int = 1  # cores of each job (--cpus-per-task); the job's torch threads
    mem_gb: float = 0.0  # memory of each job (--mem); 0: the partition's default
    time_min: int = 60  # time limit of each job; a job reaching it is requeued and resumes from last.pt
    array_parallelism: int = 32  # array tasks running at once (--array=...%N)
    log_dir: str = "logs/slurm"  # submitit's folder (job scripts, pickles, stdout/stderr), relative to the repo
    # shell lines run in the job script before python (module load ..., source a venv)
    setup: tuple[str, ...] = ()
    # further sbatch options, {option: value} (true for a flag), e.g. {constraint: a100, mail-type: FAIL}
    additional: dict[str, Any] = field(default_factory=dict)
    poll_s: float = 10.0  # how often the stage asks squeue whether its jobs are done

    def validate(self, key: str) -> None:
        _positive(self, key, "cpus_per_job", "time_min", "array_parallelism", "poll_s")
        if self.gpus_per_job < 0 or self.mem_gb < 0:
            raise ParamsError(f"{key}.gpus_per_job/{key}.mem_gb: must be >= 0 (0: none / the default)")
        if not self.log_dir:
            raise ParamsError(f"{key}.log_dir: must not be empty (e.g. logs/slurm)")
        for option, value in self.additional.items():
            if option.startswith("-") or not option:
                raise ParamsError(f"{key}.additional: write sbatch options without dashes, e.g. mail-type: FAIL, "
                                  f"got {option!r}")
            if value is False or value is None or isinstance(value, (dict, list)):
                raise ParamsError(f"{key}.additional.{option}: give a string or number, or true for a flag; "
                                  f"got {value!r}")


@dataclass(frozen=True)
class ExecutorParams:
    """Where the ``train`` / ``evaluate`` jobs run (:mod:`simprop.infra.executor`).  Not a DVC params
    dependency of any stage: where a job runs does not change what it writes."""

    # local: on this machine (train/evaluate.parallel_folds processes, or one per GPU); slurm: SLURM jobs
    kind: Literal["local", "slurm"] = "local"
    slurm: SlurmParams = field(default_factory=SlurmParams)


@dataclass(frozen=True)
class Params:
    setup: Literal["default", "paper", "tiny"] = "default"
    data: DataParams = field(default_factory=DataParams)
    splits: SplitsParams = field(default_factory=SplitsParams)
    episodes: EpisodesParams = field(default_factory=EpisodesParams)
    backbone: BackboneParams = field(default_factory=BackboneParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    report: ReportParams = field(default_factory=ReportParams)
    analysis: AnalysisParams = field(default_factory=AnalysisParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)
    executor: ExecutorParams = field(default_factory=ExecutorParams)

    def validate(self, key: str) -> None:
        for shot in self.evaluate.shots:
            if shot > self.episodes.max_shots:
                raise ParamsError(
                    f"evaluate.shots: {shot}-shot needs episodes.max_shots >= {shot} "
                    f"(it is {self.episodes.max_shots})"
                )
        for fold in self.train.folds:
            if fold not in self.splits.folds:
                raise ParamsError(f"train.folds: fold {fold} has no splits; add it to splits.folds")
        if self.analysis.fold not in self.train.folds or self.analysis.variant not in self.train.variants:
            raise ParamsError(
                f"analysis.variant/analysis.fold: ({self.analysis.variant}, fold {self.analysis.fold}) "
                "is not trained; it must be in train.variants and train.folds"
            )
        if self.executor.kind == "slurm" and self.train.processes > 1:
            raise ParamsError(
                "executor.kind: slurm runs each (variant, fold, seed) as one single-process job; with "
                f"train.processes = {self.train.processes} (DDP through torchrun) use executor.kind: local"
            )

    def for_seed(self, seed: int) -> "Params":
        """These params for the training replicate ``seed`` (one of ``train.seeds``): ``train.seed``
        is what every seeded draw of a training and of its evaluation reads."""
        if seed not in self.train.seeds:
            raise ParamsError(f"train.seeds: seed {seed} is not in {list(self.train.seeds)}")
        return dataclasses.replace(self, train=dataclasses.replace(self.train, seed=seed))

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def flat(self) -> dict[str, Any]:
        """Params flattened to dotted keys, as MLflow and ``dvc exp show`` present them."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out


# --------------------------------------------------------------------------- loading


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``; raise :class:`ParamsError` naming the bad key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found; run from the repository root")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    return params_from_dict(raw if raw is not None else {}, source=str(path))


def params_from_dict(raw: Any, source: str = "params") -> Params:
    params = _build(Params, raw, "", source)
    return params


def _build(cls: type, raw: Any, key: str, source: str) -> Any:
    where = key or "top level"
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: {where} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    derived = {f.name: f.metadata["derived"] for f in dataclasses.fields(cls) if "derived" in f.metadata}
    for name, hint in derived.items():
        if name in raw:
            bad = f"{key}.{name}" if key else name
            raise ParamsError(f"{source}: {bad!r} is not a params key: {hint}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in derived}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        bad = f"{key}.{unknown[0]}" if key else unknown[0]
        raise ParamsError(
            f"{source}: unknown key {bad!r} (misspelt?); known keys under {where}: {sorted(fields)}"
        )
    missing = sorted(set(fields) - set(raw))
    if missing:
        bad = f"{key}.{missing[0]}" if key else missing[0]
        raise ParamsError(f"{source}: missing key {bad!r}; every key of the schema must be set")
    values = {}
    for name in fields:
        sub = f"{key}.{name}" if key else name
        values[name] = _coerce(hints[name], raw[name], sub, source)
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate(key)
        except ParamsError as exc:
            raise ParamsError(f"{source}: {exc}") from None
    return obj


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, source)
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, int) and not isinstance(value, bool) and str(value) in choices:
            value = str(value)  # `-S evaluate.resolution=321` arrives as an integer
        if value not in choices:
            raise ParamsError(f"{source}: {key} = {value!r} is not allowed; choose one of {list(choices)}")
        return value
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(get_args(tp)):
            return None
        if len(args) == 1:
            return _coerce(args[0], value, key, source)
        for arg in args:  # e.g. train.amp: true / false or "auto"
            try:
                return _coerce(arg, value, key, source)
            except ParamsError:
                continue
        allowed = " or ".join("true / false" if a is bool else ", ".join(map(repr, get_args(a))) if get_origin(a) is Literal
                              else a.__name__ for a in args)  # fmt: skip
        raise ParamsError(f"{source}: {key} = {value!r} is not allowed; use {allowed}")
    if origin is dict:  # a free mapping of options (executor.slurm.additional): names to scalars
        if not isinstance(value, dict):
            raise ParamsError(f"{source}: {key} must be a mapping (option: value), got {value!r}")
        for name, item in value.items():
            if not isinstance(name, str) or isinstance(item, (dict, list)):
                raise ParamsError(f"{source}: {key}.{name} must be a name with a string, number or true")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{source}: {key} must be a list, got {value!r}")
        (item,) = get_args(tp)[:1]
        return tuple(_coerce(item, v, f"{key}[{i}]", source) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads "5e-4" (no dot) as a string; accept it explicitly
            if isinstance(value, str):
                try:
                    number = float(value)
                except ValueError:
                    pass
                else:
                    return _finite(number, key, source)
            raise ParamsError(f"{source}: {key} must be a number, got {value!r}")
        return _finite(float(value), key, source)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{source}: {key} must be a string, got {value!r}")
        if key in REPO_PATHS:
            _inside_repository(value, key, source)
        return value
    raise TypeError(f"unsupported schema type {tp!r} for {key}")  # a bug in this module


def _finite(value: float, key: str, source: str) -> float:
    """Reject ``.nan`` / ``.inf`` (YAML) and ``"nan"`` / ``"inf"`` strings: no param means them."""
    if not math.isfinite(value):
        raise ParamsError(f"{source}: {key} must be a finite number, got {value!r}")
    return value


def _inside_repository(value: str, key: str, source: str) -> None:
    """A path a stage writes to must stay inside the repository: relative, no escaping ``..``."""
    if not value:
        raise ParamsError(f"{source}: {key} must not be empty")
    normal = posixpath.normpath(value.replace(os.sep, "/"))
    if os.path.isabs(value) or value.startswith("~") or normal == ".." or normal.startswith("../"):
        raise ParamsError(
            f"{source}: {key} = {value!r} leaves the repository; a stage writes there and DVC tracks "
            f"only outputs inside the repository: give a relative path inside it (e.g. "
            f"{'data' if key == 'data.root' else 'backbone/resnet50.pt'}), or link a big disk "
            f"into the repository"
        )
    first = normal.split("/", 1)[0]
    if first in CONTROL_DIRS or normal in (".", ""):
        raise ParamsError(
            f"{source}: {key} = {value!r} is "
            + ("the repository root" if normal in (".", "") else f"inside {first}/, which git / DVC own")
            + f"; a stage writes and deletes there: give a folder of its own (e.g. "
            f"{'data' if key == 'data.root' else 'backbone/resnet50.pt'})"
        )


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if "derived" not in f.metadata}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


def _positive(obj: Any, key: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ParamsError(f"{key}.{name}: must be > 0, got {value}")


def _folds(folds: tuple[int, ...], key: str) -> None:
    if not folds:
        raise ParamsError(f"{key}: give at least one fold")
    for f in folds:
        if f not in FOLDS:
            raise ParamsError(f"{key}: fold {f} is outside 0..3 (PASCAL-5i has four folds)")
    if len(set(folds)) != len(folds):
        raise ParamsError(f"{key}: folds must be distinct, got {list(folds)}")


def _device(device: str, key: str) -> None:
    if device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit()):
        return
    raise ParamsError(f"{key}: {device!r} is not a device; use auto, cpu, cuda or cuda:N")


def default_params() -> Params:
    return Params()


def dump_yaml(params: Params) -> str:
    return yaml.safe_dump(params.to_dict(), sort_keys=False)
