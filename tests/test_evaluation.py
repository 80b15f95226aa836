"""Evaluation mechanics on a tiny generated tree: per-image encoding, identical-input episodes,
the all-foreground reference and the encoded-feature shortcut of the network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simprop.data.datasets import DataPaths, ImageStore
from simprop.data.io import read_episodes
from simprop.engine.inference import EpisodeRunner
from simprop.engine.metrics import EpisodeMetrics
from simprop.evaluate.controls import all_foreground_metrics, identical_input_episodes
from simprop.model.network import build_model
from simprop.params import ModelParams


class NaiveRunner(EpisodeRunner):
    """Re-encodes every image of every episode (what the memoisation must be equal to)."""

    def features(self, image_ids):
        self._features.clear()
        return super().features(image_ids)


@pytest.fixture(scope="module")
def setup(data_pipeline):
    layout, params, _ = data_pipeline
    paths = DataPaths(layout.root)
    torch.manual_seed(0)
    model = build_model("simpropnet", ModelParams(channels=8)).eval()
    return paths, ImageStore(paths, 33), model


def test_each_image_is_encoded_once_and_results_equal_per_episode_encoding(setup):
    paths, store, model = setup
    episodes = read_episodes(paths.episode_file(0, "test_seed1"), 5)[:12]
    runner = EpisodeRunner(model, store, torch.device("cpu"), batch_size=4)
    memo = runner.evaluate(episodes).summary()
    unique = {e.query for e in episodes} | {s for e in episodes for s in e.supports}
    assert runner.feature_computations == len(unique)
    naive_runner = NaiveRunner(model, store, torch.device("cpu"), batch_size=4)
    naive = naive_runner.evaluate(episodes).summary()
    assert naive_runner.feature_computations > len(unique)
    assert memo["miou"] == pytest.approx(naive["miou"], abs=1e-9)
    assert memo["class_iou"] == pytest.approx(naive["class_iou"], abs=1e-9)


def test_encoded_features_give_the_same_logits_as_backbone_features():
    torch.manual_seed(0)
    model = build_model("fbaf", ModelParams(channels=8)).eval()
    query, supports = torch.randn(2, 3, 33, 33), torch.randn(2, 3, 3, 33, 33)
    masks = (torch.rand(2, 3, 33, 33) > 0.5).float()
    with torch.no_grad():
        qf, sf = model.backbone_features(query), model.backbone_features(supports.flatten(0, 1))
        direct = model(query_feats=qf, support_feats=sf.view(2, 3, *sf.shape[1:]), support_masks=masks, out_size=(33, 33))
        encoded = model(query_encoded=model.encode(qf), support_encoded=model.encode(sf), support_masks=masks,
                        out_size=(33, 33))  # fmt: skip
    torch.testing.assert_close(direct["query"], encoded["query"])


def test_identical_input_uses_the_query_as_its_own_support(setup):
    paths, store, model = setup
    pairs = [("a", 3), ("b", 7)]
    episodes = identical_input_episodes(pairs)
    assert [(e.query, e.cls, e.supports) for e in episodes] == [("a", 3, ("a",)), ("b", 7, ("b",))]


def test_all_foreground_reference_equals_the_foreground_fraction(setup):
    paths, store, _ = setup
    episodes = read_episodes(paths.episode_file(0, "test_seed1"), 1)[:10]
    reference = all_foreground_metrics(store, episodes)
    expected = EpisodeMetrics()
    for e in episodes:
        label = store.label(e.query)
        target = (label == e.cls).astype(np.uint8)
        target[label == 255] = 255
        expected.update(np.ones_like(target, dtype=bool), target, e.cls)
    assert reference.miou() == pytest.approx(expected.miou())
    for cls, iou in reference.class_iou().items():
        fg = sum(int((store.label(e.query) == cls).sum()) for e in episodes if e.cls == cls)
        valid = sum(int((store.label(e.query) != 255).sum()) for e in episodes if e.cls == cls)
        assert iou == pytest.approx(fg / valid)


def test_scoring_conventions_change_what_the_prediction_is_scored_against(setup):
    """evaluate.resolution 321 scores 321 x 321 labels (CANet's code); void background counts the
    void band of every query against the all-foreground predictor (OSLSM)."""
    paths, store, model = setup
    episodes = read_episodes(paths.episode_file(0, "test_seed1"), 1)[:8]
    classes = (1, 2, 3, 4, 5)
    runner = EpisodeRunner(model, store, torch.device("cpu"), batch_size=4, resolution="321", classes=classes)
    for p in runner.predict(episodes):
        assert p.pred.shape == p.label.shape == (321, 321)
    original = next(EpisodeRunner(model, store, torch.device("cpu"), batch_size=4).predict(episodes[:1]))
    assert original.pred.shape == store.label(episodes[0].query).shape
    ignore = all_foreground_metrics(store, episodes, classes=classes)
    background = all_foreground_metrics(store, episodes, void="background", classes=classes)
    for cls, iou in background.class_iou().items():
        if np.isnan(iou):
            continue
        fg = sum(int((store.label(e.query) == cls).sum()) for e in episodes if e.cls == cls)
        everything = sum(store.label(e.query).size for e in episodes if e.cls == cls)
        assert iou == pytest.approx(fg / everything)  # void pixels are predicted foreground: false positives
        assert iou <= ignore.class_iou()[cls]
    # the mean is over the fold's five classes, whatever the eight episodes hold
    assert ignore.summary()["classes_in_mean"] == 5
    assert ignore.miou() == pytest.approx(sum(v for v in ignore.class_iou().values() if not np.isnan(v)) / 5)


def test_qualitative_panels_at_the_321_scoring_size(data_pipeline, setup, tmp_path):
    from simprop.engine.visualize import save_qualitative
    from simprop.evaluate.run import qualitative_rows

    layout, params, _ = data_pipeline
    paths, store, model = setup
    runner = EpisodeRunner(model, store, torch.device("cpu"), batch_size=4, resolution="321")
    rows = qualitative_rows(params, runner, 0, layout.root.parent, 2)
    assert [r["query"].shape for r in rows] == [(321, 321, 3)] * 2 and rows[0]["pred"].shape == (321, 321)
    assert save_qualitative(rows, tmp_path / "q.png", title="321").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_on_a_machine_without_one_is_a_params_error_naming_the_key():
    from simprop.errors import ParamsError
    from simprop.infra.device import resolve_device

    with pytest.raises(ParamsError, match=r"evaluate\.device: 'cuda:0' .*set evaluate\.device: auto"):
        resolve_device("cuda:0", "evaluate.device")
    assert resolve_device("auto", "evaluate.device").type == "cpu"


def test_batched_scoring_equals_scoring_each_episode_on_its_own():
    """score_margins upsamples and counts the episodes of one label size together; the result is
    the per-episode upsampling + confusion_counts, bit for bit, also when sizes differ in a batch."""
    from simprop.data.io import Episode
    from simprop.engine.inference import evaluate_predictions, score_margins
    from simprop.engine.metrics import confusion_counts, scoring_label

    rng = np.random.default_rng(4)
    sizes = {"a": (96, 128), "b": (50, 70), "c": (96, 128), "d": (50, 70), "e": (33, 33)}
    labels = {k: rng.choice([0, 3, 255], size=hw, p=[0.5, 0.4, 0.1]).astype(np.uint8) for k, hw in sizes.items()}

    class Labels:  # score_margins reads only store.label(query id)
        def label(self, image_id):
            return labels[image_id]

    batch = [Episode(index=n, query=k, supports=("x",), cls=3) for n, k in enumerate(sizes)]
    margins = torch.randn(len(batch), 1, 9, 9, generator=torch.Generator().manual_seed(0))
    for resolution in ("original", "321"):
        got = list(score_margins(Labels(), batch, margins, resolution=resolution))
        for n, (episode, p) in enumerate(zip(batch, got)):
            target = scoring_label(labels[episode.query], 3, resolution=resolution)
            full = torch.nn.functional.interpolate(margins[n][None], size=target.shape, mode="bilinear", align_corners=True)
            pred = (full[0, 0] > 0).numpy()
            assert p.episode is episode
            np.testing.assert_array_equal(p.pred, pred)
            np.testing.assert_array_equal(p.label, target)
            assert tuple(int(v) for v in p.counts) == confusion_counts(pred, target)
        counted = evaluate_predictions(got, (1, 2, 3, 4, 5)).summary()
        recount = EpisodeMetrics((1, 2, 3, 4, 5))
        for p in got:
            recount.update(p.pred, p.label, 3)
        assert counted == recount.summary()
