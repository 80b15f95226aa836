"""The support-use controls: the parameter-free prototype matcher on hand-made features whose
answer is known, the mismatched-support episodes as the evaluation reads them, and the gains."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from simprop.data.datasets import DataPaths, ImageStore
from simprop.data.io import read_episodes
from simprop.engine.features import FeatureCache
from simprop.engine.inference import EpisodeRunner
from simprop.engine.matcher import PrototypeMatcher
from simprop.errors import DataError
from simprop.evaluate.controls import mismatched_episodes, support_use
from simprop.model.network import build_model
from simprop.params import ModelParams

A = torch.tensor([1.0, 0.5, 0.0, 0.0])  # "object" feature
B = torch.tensor([0.0, 1.0, 0.3, 0.0])  # "scene" feature (cos(A, B) = 0.43)
C = torch.tensor([0.0, 0.0, 0.0, 1.0])  # "another object", orthogonal to A and B


def cos(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(u, v, dim=0)


def feature_map(left: torch.Tensor, right: torch.Tensor, h: int = 4, w: int = 6) -> torch.Tensor:
    """[C, h, w]: ``left`` on the left half of the columns, ``right`` on the right half."""
    out = torch.empty(len(left), h, w)
    out[:, :, : w // 2] = left[:, None, None]
    out[:, :, w // 2 :] = right[:, None, None]
    return out


def matcher() -> PrototypeMatcher:
    return PrototypeMatcher(store=None, device=torch.device("cpu"), backbone=None)


def test_matcher_marks_the_pixels_closer_to_the_foreground_prototype():
    query = feature_map(A, B)[None]  # object on the left, scene on the right
    support = feature_map(A, B)[None, None]  # the support shows the same object on its left
    mask = torch.zeros(1, 1, 8, 12)
    mask[..., :6] = 1  # its mask covers the left half (resized to the 4 x 6 grid by the pooling)
    margin = matcher().margins(query, support, mask)[0, 0]
    assert margin.shape == (4, 6)
    # left: cos(A, Z^f = A) - cos(A, Z^b = B) = 1 - cos(A, B) > 0; right: cos(B, A) - 1 < 0
    torch.testing.assert_close(margin[:, :3], (1 - cos(A, B)).expand(4, 3))
    torch.testing.assert_close(margin[:, 3:], (cos(B, A) - 1).expand(4, 3))


def test_matcher_follows_the_support_not_the_query():
    query = feature_map(A, C)[None]  # two objects, A left and C right
    support_of_c = feature_map(B, C)[None, None]  # a support whose masked object is C (right half)
    mask = torch.zeros(1, 1, 4, 6)
    mask[..., 3:] = 1
    margin = matcher().margins(query, support_of_c, mask)[0, 0]
    assert (margin[:, 3:] > 0).all() and (margin[:, :3] < 0).all()  # now the right object is found


def test_matcher_averages_the_prototypes_of_its_shots_and_skips_empty_masks():
    query = feature_map(A, B)[None]
    supports = torch.stack([feature_map(A, B), feature_map(C, B)])[None]  # [1, 2, C, h, w]
    masks = torch.zeros(1, 2, 4, 6)
    masks[:, :, :, :3] = 1  # shot 1 masks A, shot 2 masks C
    margin = matcher().margins(query, supports, masks)[0, 0]
    zf = (A + C) / 2  # eq. 4: the mean of the shots' prototypes
    torch.testing.assert_close(margin[:, :3], (cos(A, zf) - cos(A, B)).expand(4, 3))
    empty = masks.clone()
    empty[:, 1] = 0  # a shot without foreground is no foreground evidence: left out of Z^f's mean
    margin = matcher().margins(query, supports, empty)[0, 0]
    zb = (B + (C + B) / 2) / 2  # ... but its whole image is background evidence
    torch.testing.assert_close(margin[:, :3], (cos(A, A) - cos(A, zb)).expand(4, 3))


def test_matcher_margin_equals_the_two_cosine_similarities_on_random_features():
    """The one-pass margin (unit query . (unit Z^f - unit Z^b)) is cos(F_q, Z^f) - cos(F_q, Z^b)
    exactly as torch computes it, also when a region is empty (zero prototype -> cosine 0)."""
    from simprop.model.prototypes import masked_average_pool

    gen = torch.Generator().manual_seed(3)
    query, supports = torch.randn(4, 64, 9, 9, generator=gen), torch.randn(4, 1, 64, 9, 9, generator=gen)
    masks = (torch.rand(4, 1, 33, 33, generator=gen) > 0.6).float()
    masks[0] = 0  # no foreground: Z^f is the zero vector
    masks[1] = 1  # no background: Z^b is the zero vector
    zf, zb = masked_average_pool(supports[:, 0], masks[:, 0])
    expected = torch.nn.functional.cosine_similarity(query, zf[:, :, None, None], dim=1) - torch.nn.functional.cosine_similarity(
        query, zb[:, :, None, None], dim=1
    )
    margin = matcher().margins(query, supports, masks)[:, 0]
    assert (margin - expected).abs().max() <= 1e-5


def test_matcher_end_to_end_on_cached_features_of_real_episodes(data_pipeline):
    """Through the evaluation's scoring path: features from a feature cache whose rows are the
    label maps themselves (one-hot per class), so the matcher must find exactly the class."""
    layout, params, _ = data_pipeline
    paths = DataPaths(layout.root)
    store = ImageStore(paths, 33)
    episodes = read_episodes(paths.episode_file(0, "test_seed1"), 1)[:40]
    ids = sorted({i for e in episodes for i in (e.query, *e.supports)})
    size = 33
    table = np.zeros((len(ids), size, size, 21), np.float16)  # cache rows are [h, w, C]
    for n, image_id in enumerate(ids):
        label = torch.nn.functional.interpolate(
            torch.from_numpy(store.label(image_id)).float()[None, None], size=(size, size), mode="nearest"
        )[0, 0].long()
        table[n] = torch.nn.functional.one_hot(label.clamp_max(20), 21).numpy()
    cache = FeatureCache({i: n for n, i in enumerate(ids)}, table, None)
    summary = PrototypeMatcher(store, torch.device("cpu"), backbone=None, cache=cache).evaluate(episodes).summary()
    assert summary["miou"] > 85  # one-hot features: only resizing and void bands cost IoU


def test_mismatched_episodes_keep_the_query_and_its_class_and_swap_the_supports(data_pipeline):
    layout, _, _ = data_pipeline
    episodes = read_episodes(DataPaths(layout.root).episode_file(0, "test_seed1"), 1)
    swapped = mismatched_episodes(episodes, 1)
    for e, m in zip(episodes, swapped):
        assert (m.query, m.cls) == (e.query, e.cls)
        assert m.support_mask_class == e.mismatch_class != e.cls
        assert m.supports == e.mismatch_supports[:1] and e.query not in m.supports
    stripped = [dataclasses.replace(e, mismatch_class=None, mismatch_supports=()) for e in episodes]
    with pytest.raises(DataError, match="rerun `dvc repro episodes`"):
        mismatched_episodes(stripped, 1)


def test_a_network_that_ignores_its_support_has_no_support_gain(data_pipeline):
    """The control itself: a network scored with the right and with a mismatched support gives
    the same mIoU when its prediction does not depend on the support (zero prototype weights)."""
    layout, _, _ = data_pipeline
    paths = DataPaths(layout.root)
    store = ImageStore(paths, 33)
    torch.manual_seed(0)
    model = build_model("canet", ModelParams(channels=8, iom_iterations=0)).eval()
    with torch.no_grad():
        model.fusion.comparison.weight[:, 8:] = 0  # the tiled prototype's half of the comparison
    episodes = read_episodes(paths.episode_file(0, "test_seed1"), 1)[:48]
    runner = EpisodeRunner(model, store, torch.device("cpu"), 16)
    right = runner.evaluate(episodes).summary()["miou"]
    wrong = runner.evaluate(mismatched_episodes(episodes, 1)).summary()["miou"]
    assert right == pytest.approx(wrong, abs=1e-9)


def test_support_use_gains_from_a_record():
    record = {"shot1": {"miou_mean": 50.0}, "shot5": {"miou_mean": 54.0}, "mismatched": {"miou_mean": 20.0},
              "identical": {"miou": 60.0}, "matcher": {"shot1": {"miou_mean": 45.0}}}  # fmt: skip
    assert support_use(record) == {"support_gain": 30.0, "shot5_gain": 4.0, "identical_gain": 10.0, "matcher_gain": 5.0}
    assert support_use({"shot1": {"miou_mean": 50.0}})["support_gain"] is None
