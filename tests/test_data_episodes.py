"""The episodes stage: determinism, support/query rules, 1-shot/5-shot pairing, clear errors."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from simprop.data.episodes import build_episodes, draw_episodes
from simprop.data.errors import EpisodeError
from simprop.data.io import read_episodes, read_pairs
from simprop.data.layout import DataLayout
from simprop.data.voc import fold_classes


def test_episode_files_are_byte_identical_for_the_same_inputs(data_pipeline, copy_tree, tmp_path):
    source, params, _ = data_pipeline
    layout = DataLayout(tmp_path / "data")
    copy_tree(source.splits, "data/splits")
    build_episodes(layout, params.splits.folds, params.episodes)
    files = sorted(p.relative_to(source.episodes) for p in source.episodes.rglob("*.csv"))
    assert len(files) == len(params.splits.folds) * (len(params.episodes.test_seeds) + 1)
    for rel in files:
        assert (layout.episodes / rel).read_bytes() == (source.episodes / rel).read_bytes()


def test_test_episodes_follow_the_rules(data_pipeline):
    layout, params, _ = data_pipeline
    e = params.episodes
    for fold in params.splits.folds:
        test_pairs = set(read_pairs(layout.split_file(fold, "test")))
        seen = []
        for seed in e.test_seeds:
            episodes = read_episodes(layout.test_episode_file(fold, seed))
            assert len(episodes) == e.num_episodes and [x.index for x in episodes] == list(range(e.num_episodes))
            for x in episodes:
                assert x.cls in fold_classes(fold)
                assert len(x.supports) == e.max_shots == len(set(x.supports))  # distinct supports
                assert x.query not in x.supports  # supports never equal the query
                assert all((i, x.cls) in test_pairs for i in (x.query, *x.supports))
            seen.append([(x.query, x.cls, x.supports) for x in episodes])
            assert set(Counter(x.cls for x in episodes)) == set(fold_classes(fold))
        assert seen[0] != seen[1]  # the seeds give different sets


def test_one_shot_is_the_first_support_of_the_five_shot_episode(data_pipeline):
    layout, params, _ = data_pipeline
    path = layout.test_episode_file(params.splits.folds[0], params.episodes.test_seeds[0])
    five, one = read_episodes(path, shots=5), read_episodes(path, shots=1)
    for a, b in zip(five, one):
        assert (b.query, b.cls) == (a.query, a.cls) and b.supports == a.supports[:1] == a.shots(1)
    header = path.read_text().splitlines()[0]
    assert header == "episode,query,class,support1,support2,support3,support4,support5"


def test_validation_episodes_never_touch_test_images(data_pipeline):
    layout, params, _ = data_pipeline
    for fold in params.splits.folds:
        val_pairs = set(read_pairs(layout.split_file(fold, "val")))
        test_images = {i for i, _ in read_pairs(layout.split_file(fold, "test"))}
        episodes = read_episodes(layout.val_episode_file(fold))
        assert len(episodes) == params.episodes.num_val_episodes
        for x in episodes:
            assert all((i, x.cls) in val_pairs for i in (x.query, *x.supports))
            assert not {x.query, *x.supports} & test_images


def test_a_class_with_too_few_images_is_a_clear_error():
    pairs = [(f"img{i}", 1) for i in range(6)] + [(f"img{i}", 2) for i in range(5)]
    episodes = draw_episodes(pairs, (1,), num_episodes=3, max_shots=5, seed=1, fold=0)
    assert len(episodes) == 3
    with pytest.raises(EpisodeError, match=r"class 2 \(bicycle\) has 5 images.*at least 6"):
        draw_episodes(pairs, (1, 2), num_episodes=3, max_shots=5, seed=1, fold=0, source="test.csv")


def test_draws_depend_only_on_seed_and_fold():
    pairs = [(f"img{i:02d}", c) for i in range(30) for c in (1, 2) if (i + c) % 3]
    draw = dataclasses.asdict  # compare as plain data

    def episodes(seed, fold, order=pairs):
        return [draw(x) for x in draw_episodes(order, (1, 2), num_episodes=50, max_shots=5, seed=seed, fold=fold)]

    assert episodes(1, 0) == episodes(1, 0, order=list(reversed(pairs)))  # input order does not matter
    assert episodes(1, 0) != episodes(2, 0) and episodes(1, 0) != episodes(1, 1)
