"""The frozen-feature cache: rows stored [h, w, C], read back as channels-last [N, C, h, w]."""

from __future__ import annotations

import json

import pytest
import torch

from simprop.data.datasets import DataPaths, ImageStore
from simprop.engine.features import MANIFEST, all_image_ids, open_feature_cache
from simprop.errors import DataError
from simprop.model.network import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cached(feature_cache_tree):
    return feature_cache_tree(train={"image_size": 33})


def test_cached_features_are_the_backbone_features_in_channels_last_memory(cached):
    params, root, manifest = cached
    model = build_model("canet", params.model).eval()
    assert manifest["layout"] == "NHWC" and manifest["feature_shape"] == [1536, 5, 5]
    cache = open_feature_cache(params, root, 33, model.backbone.checksum())
    ids = all_image_ids(params, root)[:3]
    got = cache.get(ids)
    assert got.shape == (3, 1536, 5, 5) and got.is_contiguous(memory_format=torch.channels_last)
    store = ImageStore(DataPaths(root / params.data.root), 33)
    with torch.no_grad():
        expected = model.backbone_features(torch.stack([store.image(i) for i in ids]))
    # float16 rows (and another batch composition): one float16 step apart at most; a wrong
    # layout would put other channels' or pixels' values here
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)


def test_a_cache_in_the_older_layout_asks_for_a_rebuild(cached):
    params, root, _ = cached
    path = DataPaths(root / params.data.root).features / MANIFEST
    manifest = json.loads(path.read_text())
    del manifest["layout"]  # written before the rows were [h, w, C]
    path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="older layout; rerun dvc repro features"):
        open_feature_cache(params, root, 33, manifest["backbone_checksum"])
