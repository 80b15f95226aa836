"""The ``evaluate`` stage's work: one (variant, fold)'s selected checkpoint on every fixed test set
and shot count (protocol.md §5), with the support-use controls, written as one metrics record.

Predictions go through :mod:`simprop.engine.inference` (the one inference path) and are scored
by :mod:`simprop.engine.metrics`: the network sees square ``image_size`` inputs; its margins are
upsampled bilinearly to the size of the label they are scored against (the query's original
label, ``evaluate.resolution: original``, HSNet / PFENet; or the label resized (nearest) to
321 x 321, ``321``, CANet's code); void pixels are ignored (``evaluate.void: ignore``) or
background (``background``, OSLSM).  The per-class TP/FP/FN are pooled over episodes; the mIoU
is over the fold's five classes (a class without a defined IoU counts as 0; ``classes_scored``
says how many had one).

Every evaluation carries the controls that tell whether a model uses its support
(:mod:`simprop.evaluate.controls`): the parameter-free prototype matcher on the same frozen
features, the trained model with a *mismatched* support, the identical-input test, the
all-foreground predictor and the untrained network.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from simprop.data.datasets import (
    DataPaths,
    Episode,
    ImageStore,
    read_pairs,
)
from simprop.data.episodes import read_test_episodes
from simprop.engine.features import FeatureCache, open_feature_cache
from simprop.engine.inference import EpisodeRunner
from simprop.engine.metrics import EpisodeMetrics
from simprop.engine.visualize import save_qualitative
from simprop.evaluate.controls import (
    all_foreground_metrics,
    evaluate_matcher,
    identical_input_episodes,
    mismatched_episodes,
    over_test_sets,
    seed_metrics,
    support_use,
)
from simprop.infra.atomic import write_json
from simprop.infra.device import precision, resolve_amp, resolve_device
from simprop.infra.machine import machine_info
from simprop.infra.tracking import stage_run
from simprop.engine.registry import register_in_run
from simprop.layout import RunLayout
from simprop.model import build_model, expected_identity, load_checkpoint
from simprop.model.shifted_gemm import kernel_record
from simprop.params import Params
from simprop.voc import fold_classes


def evaluate_model(
    params: Params,
    model: torch.nn.Module,
    variant: str,
    fold: int,
    root: Path,
    device: torch.device,
    cache: FeatureCache | None,
    untrained: torch.nn.Module | None = None,
    log=None,
    matcher_record: dict | None = None,
) -> tuple[dict, EpisodeRunner]:
    """All test sets and shots, the identical-input test, and the support-use controls.

    Per test set and shot: the model and the prototype matcher; per test set, 1-shot: the
    model with the mismatched support; on the first test set: the all-foreground predictor
    and the untrained network.  ``support_use`` holds the gains the controls are read by:
    ``support_gain`` = 1-shot mIoU - mismatched-support mIoU, ``shot5_gain`` = 5-shot - 1-shot,
    ``identical_gain`` = identical input - 1-shot, ``matcher_gain`` = 1-shot - the matcher's
    1-shot (means over the test sets).  Returns the metrics record (docs/architecture.md,
    percent) and the runner so the caller can draw qualitative examples from its memoised
    features.  ``matcher_record``: the fold's prototype-matcher entries (:func:`evaluate_matcher`)
    when the caller has them already (the matcher has no parameters: every variant of a fold
    gets the same numbers); they are logged like the ones computed here.
    """
    ev = params.evaluate
    paths = DataPaths(root / params.data.root)
    store = ImageStore(paths, ev.image_size)
    scoring = dict(resolution=ev.resolution, void=ev.void, classes=fold_classes(fold))
    amp = resolve_amp(ev.amp, device)  # evaluate.amp "auto": bf16 where this device has it natively
    runner = EpisodeRunner(model, store, device, ev.batch_size, cache, amp=amp, **scoring)
    record: dict = {
        "variant": variant,
        "fold": fold,
        "protocol": params.splits.protocol,
        "setup": params.setup,
        "data_source": params.data.source,
        "episodes": params.episodes.num_episodes,
        "seeds": list(params.episodes.test_seeds),
        "class_sampling": params.episodes.class_sampling,
        "resolution": ev.resolution,
        "void": ev.void,
        "image_size": ev.image_size,
        "iom_iterations": getattr(model, "iom_iterations", 0),
        "precision": precision(device, amp),
        "amp": ev.amp,
        "miou_classes": "the fold's 5 classes; a class without a defined IoU counts as 0 (classes_scored)",
    }
    started = time.perf_counter()

    def test_set(seed: int, shots: int) -> list[Episode]:
        return read_test_episodes(paths, fold, seed, shots)

    def over_seeds(name: str, evaluate: Callable[[list[Episode], str], EpisodeMetrics], shots: int,
                   episodes_of: Callable[[list[Episode]], list[Episode]] = lambda e: e) -> dict:  # fmt: skip
        return over_test_sets(params, lambda seed: episodes_of(test_set(seed, shots)), evaluate, name,
                           f"{variant} fold{fold}", log)  # fmt: skip

    for shots in ev.shots:
        record[f"shot{shots}"] = over_seeds(f"shot{shots}", runner.evaluate, shots)
    record["mismatched"] = over_seeds("mismatched", runner.evaluate, 1, lambda eps: mismatched_episodes(eps, 1))
    if matcher_record is None:
        matcher_record = evaluate_matcher(params, fold, root, device, cache, model.backbone_features)
    record["matcher"] = matcher_record
    if log is not None:  # the run of every variant carries the matcher's per-seed numbers
        for k, entry in matcher_record.items():
            for seed in params.episodes.test_seeds:
                log(seed_metrics(f"matcher_{k}", seed, entry[f"seed{seed}"]))
    if ev.identical_input:
        pairs = read_pairs(paths.split(fold, "test"))
        summary = runner.evaluate(identical_input_episodes(pairs), desc="identical input").summary()
        record["identical"] = {"miou": summary["miou"], "fbiou": summary["fbiou"], "class_iou": summary["class_iou"],
                               "classes_scored": summary["classes_scored"]}  # fmt: skip
    first = test_set(params.episodes.test_seeds[0], 1)
    reference = {"all_foreground_miou": all_foreground_metrics(store, first, **scoring).summary()["miou"]}
    if untrained is not None:
        baseline = EpisodeRunner(untrained, store, device, ev.batch_size, cache, amp=amp, **scoring)
        reference["untrained_miou"] = baseline.evaluate(first, desc="untrained").summary()["miou"]
    record["reference"] = reference
    record["support_use"] = support_use(record)
    record["feature_computations"] = runner.feature_computations
    record["wall_time_s"] = round(time.perf_counter() - started, 2)
    return record, runner


def qualitative_rows(params: Params, runner: EpisodeRunner, fold: int, root: Path, count: int) -> list[dict]:
    """The first ``count`` 1-shot episodes of the first test set, ready for the panel figure."""
    if count == 0:
        return []
    paths = DataPaths(root / params.data.root)
    episodes = read_test_episodes(paths, fold, params.episodes.test_seeds[0], 1)[:count]
    rows = []
    for p in runner.predict(episodes, desc="qualitative"):
        support = p.episode.supports[0]
        query = runner.store.raw_image(p.episode.query)
        if query.shape[:2] != p.pred.shape:  # scored on 321 x 321 labels: show the query at that size
            query = np.asarray(Image.fromarray(query).resize(p.pred.shape[::-1], Image.Resampling.BILINEAR))
        rows.append(
            {
                "support": runner.store.raw_image(support),
                "support_mask": runner.store.label(support) == p.episode.cls,
                "query": query,
                "pred": p.pred,
                "label": p.label,
                "caption": f"{p.episode.query} class {p.episode.cls}",
            }
        )
    return rows


def evaluate_fold_variants(params: Params, variants: list[str], fold: int, root: Path | str = ".",
                           seeds: list[int] | None = None) -> list[dict]:  # fmt: skip
    """The ``evaluate`` stage's job for one fold: every training replicate (seed of ``seeds``,
    default ``train.seeds``) of every variant of ``variants`` in turn, each in its own MLflow run
    (:func:`evaluate_fold`); the prototype matcher, which has no parameters, is scored once for
    the fold and its numbers go into every replicate's record and run.  Module-level so that
    :func:`simprop.infra.parallel.run_folds` can run it in a worker process."""
    records, matcher = [], None
    for seed in list(params.train.seeds) if seeds is None else seeds:
        for variant in variants:
            records.append(evaluate_fold(params.for_seed(seed), variant, fold, root, matcher_record=matcher))
            matcher = records[-1]["matcher"]
    return records


def evaluate_fold(params: Params, variant: str, fold: int, root: Path | str = ".",
                  matcher_record: dict | None = None) -> dict:  # fmt: skip
    """One (variant, fold) evaluation of training replicate ``params.train.seed`` (:meth:`Params.for_seed`)
    in the ``evaluate`` stage, in its own MLflow run.

    Scores the selected checkpoint (``models/<variant>/fold<i>/seed<s>/best.pt``) on every test set
    and shot count with the support-use controls (:func:`evaluate_model`); writes
    ``metrics/evaluate/<variant>/fold<i>/seed<s>.json`` and ``outputs/evaluate/<variant>/fold<i>/seed<s>/qualitative.png``.
    ``matcher_record``: the fold's matcher entries when an earlier variant of the fold scored them
    (:func:`evaluate_fold_variants`), else they are scored here.
    """

    root = Path(root)
    device = resolve_device(params.evaluate.device, "evaluate.device")
    seed = params.train.seed
    paths = RunLayout(root, variant, fold, seed)
    untrained = build_model(variant, params.model, init_seed=params.train.seed).to(device).eval()
    # the checkpoint must be this stage's: variant, fold, protocol, backbone and fold lists
    # (not the training code's digest: see simprop/model/checkpoint.py)
    expected = expected_identity(params, variant, fold, root, untrained.backbone.checksum())
    model, meta = load_checkpoint(paths.best, map_location=device, expected=expected)
    cache = open_feature_cache(params, root, params.evaluate.image_size, model.backbone.checksum())
    out, figure = paths.evaluate_metrics, paths.qualitative
    shots = ",".join(str(s) for s in params.evaluate.shots)
    with stage_run("evaluate", params, variant=variant, fold=fold, shots=shots, seed=seed) as run:
        run.set_tags({"checkpoint_epoch": meta.get("epoch"), "checkpoint_val_miou": meta.get("val_miou"),
                      "torch_threads": torch.get_num_threads()})  # fmt: skip
        record, runner = evaluate_model(params, model, variant, fold, root, device, cache, untrained=untrained,
                                        log=run.log_metrics, matcher_record=matcher_record)  # fmt: skip
        record["train_seed"] = seed
        record["checkpoint"] = {"epoch": meta.get("epoch"), "val_miou": meta.get("val_miou")}
        # what ran, as decided on this machine (issue 29): the encoder conv's forms, the machine
        record["conv_kernel"] = kernel_record(model.projection[0].kernel)
        record["machine"] = machine_info()
        run.set_tags({"precision": record["precision"], "conv_kernel": record["conv_kernel"]["setting"],
                      "conv_kernel_used": record["conv_kernel"]["used"]})  # fmt: skip
        write_json(out, record)
        rows = qualitative_rows(params, runner, fold, root, params.report.num_qualitative)
        if rows:
            save_qualitative(rows, figure, title=f"{variant}, {params.splits.protocol} fold {fold}, seed {seed}, 1-shot")
        else:
            figure.parent.mkdir(parents=True, exist_ok=True)
        for shot in params.evaluate.shots:
            entry = record[f"shot{shot}"]
            run.log_metrics({f"shot{shot}_miou_mean": entry["miou_mean"], f"shot{shot}_miou_std": entry["miou_std"],
                             f"shot{shot}_fbiou_mean": entry["fbiou_mean"],
                             f"shot{shot}_classes_scored": entry["classes_scored"]})  # fmt: skip
        if "identical" in record:
            run.log_metrics({"identical_miou": record["identical"]["miou"]})
        run.log_metrics({"mismatched_miou_mean": record["mismatched"]["miou_mean"],
                         **{f"matcher_{k}_miou_mean": v["miou_mean"] for k, v in record["matcher"].items()},
                         **record["support_use"]})  # fmt: skip
        run.log_metrics({k: v for k, v in record["reference"].items() if v is not None})
        run.log_artifact(out)
        if figure.is_file():
            run.log_artifact(figure)
        # the checkpoint as a registered model version (tracking.register_models; simprop/engine/registry.py)
        register_in_run(run, paths.best, params, variant, fold, seed, meta, dataclasses.asdict(model.params))
    summary = ", ".join(f"{s}-shot mIoU {record[f'shot{s}']['miou_mean']:.2f}" for s in params.evaluate.shots)
    print(f"{variant} fold {fold} seed {seed}: {summary}", flush=True)
    return record
