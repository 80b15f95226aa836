"""The episodes stage: determinism, support/query rules, 1-shot/5-shot pairing, clear errors."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter

import pytest

from simprop.data.episodes import build_episodes, draw_episodes
from simprop.data.errors import EpisodeError
from simprop.data.io import Episode, read_episodes, read_pairs, write_episodes
from simprop.data.layout import DataLayout
from simprop.voc import class_name, fold_classes


def test_episode_files_are_byte_identical_for_the_same_inputs(data_pipeline, copy_tree, tmp_path):
    source, params, _ = data_pipeline
    layout = DataLayout(tmp_path / "data")
    copy_tree(source.splits, "data/splits")
    build_episodes(layout, params.splits.folds, params.episodes)
    for new, old, count in (
        (layout.episodes, source.episodes, len(params.splits.folds) * len(params.episodes.test_seeds)),
        (layout.val_episodes, source.val_episodes, len(params.splits.folds)),
    ):
        files = sorted(p.relative_to(old) for p in old.rglob("*.csv"))
        assert len(files) == count
        for rel in files:
            assert (new / rel).read_bytes() == (old / rel).read_bytes()


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
    assert header == (
        "episode,query,class,support1,support2,support3,support4,support5,"
        "mismatch_class,mismatch1,mismatch2,mismatch3,mismatch4,mismatch5"
    )


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
    episodes = draw_episodes(pairs, (1,), num_episodes=3, max_shots=5, seed=1, fold=0, mismatch=False)
    assert len(episodes) == 3
    with pytest.raises(EpisodeError, match="mismatched supports need at least two classes"):
        draw_episodes(pairs, (1,), num_episodes=3, max_shots=5, seed=1, fold=0)
    with pytest.raises(EpisodeError, match=r"class 2 \(bicycle\) has 5 images.*at least 6"):
        draw_episodes(pairs, (1, 2), num_episodes=3, max_shots=5, seed=1, fold=0, source="test.csv")


def test_draws_depend_only_on_seed_and_fold():
    pairs = [(f"img{i:02d}", c) for i in range(30) for c in (1, 2) if (i + c) % 3]
    draw = dataclasses.asdict  # compare as plain data

    def episodes(seed, fold, order=pairs):
        return [draw(x) for x in draw_episodes(order, (1, 2), num_episodes=50, max_shots=5, seed=seed, fold=fold)]

    assert episodes(1, 0) == episodes(1, 0, order=list(reversed(pairs)))  # input order does not matter
    assert episodes(1, 0) != episodes(2, 0) and episodes(1, 0) != episodes(1, 1)


# ---------------------------------------------------------------------------- class sampling (issue 10)


def _toy_pairs() -> list[tuple[str, int]]:
    """Class 1 in 40 images, class 2 in 10 (5 of them shared with class 1), class 3 in 10."""
    pairs = [(f"a{i:02d}", 1) for i in range(40)]
    pairs += [(f"a{i:02d}", 2) for i in range(5)] + [(f"b{i:02d}", 2) for i in range(5)]
    pairs += [(f"c{i:02d}", 3) for i in range(10)]
    return pairs


def test_pairs_sampling_draws_classes_in_proportion_to_their_pairs():
    pairs = _toy_pairs()
    kwargs = dict(num_episodes=3000, max_shots=5, seed=4, fold=0)
    by_pairs = draw_episodes(pairs, (1, 2, 3), class_sampling="pairs", **kwargs)
    by_class = draw_episodes(pairs, (1, 2, 3), class_sampling="uniform", **kwargs)
    share = {c: sum(e.cls == c for e in by_pairs) / 3000 for c in (1, 2, 3)}
    assert share[1] == pytest.approx(40 / 60, abs=0.03) and share[3] == pytest.approx(10 / 60, abs=0.03)
    assert sum(e.cls == 1 for e in by_class) / 3000 == pytest.approx(1 / 3, abs=0.03)
    # every (image, class) pair is a query about equally often: 3000 / 60 = 50 times on average
    queries = Counter((e.query, e.cls) for e in by_pairs)
    assert set(queries) == set(pairs) and max(queries.values()) < 100
    for e in by_pairs:
        assert (e.query, e.cls) in set(pairs) and e.query not in e.supports and len(set(e.supports)) == 5
        assert all((s, e.cls) in set(pairs) for s in e.supports)


def test_uniform_sampling_is_the_previous_rule():
    """`uniform` keeps the earlier draws: a class uniformly, then max_shots + 1 distinct images."""
    import numpy as np

    pairs = _toy_pairs()
    got = draw_episodes(pairs, (1, 2, 3), num_episodes=50, max_shots=5, seed=9, fold=2, class_sampling="uniform")
    rng = np.random.default_rng([9, 2])
    images = {c: sorted({i for i, k in pairs if k == c}) for c in (1, 2, 3)}
    for e in got:
        cls = (1, 2, 3)[int(rng.integers(3))]
        picks = rng.choice(len(images[cls]), size=6, replace=False)
        assert (e.cls, e.query, e.supports) == (cls, images[cls][picks[0]], tuple(images[cls][i] for i in picks[1:]))


@pytest.mark.parametrize("class_sampling", ["pairs", "uniform"])
def test_mismatched_supports_leave_the_episodes_unchanged_and_follow_the_rules(class_sampling):
    pairs = _toy_pairs()
    kwargs = dict(num_episodes=400, max_shots=5, seed=3, fold=1, class_sampling=class_sampling)
    plain = draw_episodes(pairs, (1, 2, 3), mismatch=False, **kwargs)
    full = draw_episodes(pairs, (1, 2, 3), **kwargs)
    assert [(e.index, e.query, e.cls, e.supports) for e in full] == [(e.index, e.query, e.cls, e.supports) for e in plain]
    assert all(e.mismatch_class is None and e.mismatch_supports == () for e in plain)
    images = {c: {i for i, k in pairs if k == c} for c in (1, 2, 3)}
    drawn = Counter()
    for e in full:
        assert e.mismatch_class in (1, 2, 3) and e.mismatch_class != e.cls
        assert len(e.mismatch_supports) == 5 == len(set(e.mismatch_supports))
        assert e.query not in e.mismatch_supports
        assert set(e.mismatch_supports) <= images[e.mismatch_class]
        clean = images[e.mismatch_class] - images[e.cls] - {e.query}
        if len(clean) >= 5:  # enough images without the episode's class: only those
            assert not set(e.mismatch_supports) & images[e.cls]
        else:  # fewer: all of them come first
            assert set(e.mismatch_supports[: len(clean)]) == clean
        drawn[(e.cls, e.mismatch_class)] += 1
    # the mismatch class is uniform among the other two classes
    for cls in (1, 2, 3):
        total = sum(v for (c, _), v in drawn.items() if c == cls)
        for other in {1, 2, 3} - {cls}:
            assert drawn[(cls, other)] / total == pytest.approx(0.5, abs=0.12)
    # reproducible
    again = draw_episodes(pairs, (1, 2, 3), **kwargs)
    assert [e.mismatch_supports for e in again] == [e.mismatch_supports for e in full]


def test_a_query_sharing_every_image_with_the_mismatch_class_takes_images_of_its_own_class_last():
    # class 2's images all hold class 1 except b0..b1: a class-1 query gets b0, b1 first, then others
    pairs = [(f"a{i}", 1) for i in range(8)] + [(f"a{i}", 2) for i in range(5)] + [("b0", 2), ("b1", 2)]
    for e in draw_episodes(pairs, (1, 2), num_episodes=40, max_shots=5, seed=1, fold=0):
        if e.cls == 1:
            assert set(e.mismatch_supports[:2]) == {"b0", "b1"} and e.query not in e.mismatch_supports
            assert len(set(e.mismatch_supports)) == 5


def test_episode_files_with_and_without_mismatch_columns_read_back(tmp_path):
    with_mismatch = [Episode(0, "q", 3, ("s1", "s2", "s3"), 4, ("m1", "m2", "m3")),
                     Episode(1, "r", 4, ("t1", "t2", "t3"), 3, ("n1", "n2", "n3"))]  # fmt: skip
    write_episodes(tmp_path / "new.csv", with_mismatch)
    assert read_episodes(tmp_path / "new.csv") == with_mismatch
    one = read_episodes(tmp_path / "new.csv", shots=1)[0]
    assert (one.supports, one.mismatch_class, one.mismatch_supports) == (("s1",), 4, ("m1",))
    two = read_episodes(tmp_path / "new.csv", shots=2)[0]
    assert two.supports == ("s1", "s2") and two.mismatch_supports == ("m1", "m2")
    assert two.support_mask_class == 3  # the supports' masks are of the episode's class

    control = two.mismatched(2)
    assert (control.query, control.cls) == ("q", 3)  # same query, still scored on class 3
    assert control.supports == ("m1", "m2") and control.support_mask_class == 4
    assert two.mismatched(1).supports == ("m1",)
    with pytest.raises(ValueError, match="asked for 3"):
        two.mismatched(3)

    # a file written before the mismatch columns existed
    (tmp_path / "old.csv").write_text("episode,query,class,support1,support2\n0,q,3,s1,s2\n")
    old = read_episodes(tmp_path / "old.csv", shots=1)
    assert old == [Episode(0, "q", 3, ("s1",))] and old[0].mismatch_class is None and old[0].mismatch_supports == ()
    with pytest.raises(ValueError, match="no mismatched supports"):
        old[0].mismatched(1)
    # a file mixing both kinds cannot be written
    with pytest.raises(ValueError, match="needs 3 of each"):
        write_episodes(tmp_path / "mixed.csv", [with_mismatch[0], Episode(1, "r", 4, ("t1", "t2", "t3"))])


def test_episode_stage_files_carry_mismatches_and_provenance(data_pipeline, copy_tree, tmp_path):
    layout, params, _ = data_pipeline
    e = params.episodes
    for fold in params.splits.folds:
        for name, pool, path in [("val", "val", layout.val_episode_file(fold))] + [
            (f"test_seed{s}", "test", layout.test_episode_file(fold, s)) for s in e.test_seeds
        ]:
            pairs = set(read_pairs(layout.split_file(fold, pool)))
            for x in read_episodes(path):
                assert x.mismatch_class in fold_classes(fold) and x.mismatch_class != x.cls
                assert x.query not in x.mismatch_supports and len(set(x.mismatch_supports)) == e.max_shots
                assert all((i, x.mismatch_class) in pairs for i in x.mismatch_supports), name
    provenance = json.loads((layout.episodes / "provenance.json").read_text())
    assert provenance["class_sampling"] == e.class_sampling == "pairs"
    entry = provenance["files"]["fold0/test_seed1.csv"]
    counted = Counter(x.cls for x in read_episodes(layout.test_episode_file(0, 1)))
    assert entry["episodes_per_class"] == {class_name(c): counted[c] for c in fold_classes(0)}
    # the same inputs give byte-identical files, provenance included
    copy = DataLayout(tmp_path / "data")
    copy_tree(layout.splits, "data/splits")
    build_episodes(copy, params.splits.folds, e)
    digest = lambda root: {p.relative_to(root): hashlib.md5(p.read_bytes()).hexdigest() for p in root.rglob("*.*")}  # noqa: E731
    assert digest(copy.episodes) == digest(layout.episodes)
    assert digest(copy.val_episodes) == digest(layout.val_episodes)
    val_provenance = json.loads((layout.val_episodes / "provenance.json").read_text())
    assert val_provenance["files"]["fold0.csv"]["seed"] == e.val_seed
    assert val_provenance["files"]["fold0.csv"]["episodes"] == e.num_val_episodes
    # other test sets leave the validation files (the train stages' only episode input) byte-identical
    build_episodes(copy, params.splits.folds, dataclasses.replace(e, num_episodes=7, test_seeds=(4,)))
    assert digest(copy.val_episodes) == digest(layout.val_episodes)
    assert digest(copy.episodes) != digest(layout.episodes)
    # uniform sampling: the same episode files as before, class by class, recorded as such
    build_episodes(copy, params.splits.folds, dataclasses.replace(e, class_sampling="uniform"))
    assert json.loads((copy.episodes / "provenance.json").read_text())["class_sampling"] == "uniform"
    assert read_episodes(copy.test_episode_file(0, 1)) != read_episodes(layout.test_episode_file(0, 1))


# --------------------------------------------------------------------------- tampered files (issue 28)


@pytest.fixture
def episode_copy(data_pipeline, copy_tree, tmp_path):
    """A private copy of the data tree's splits and episodes (the shared one stays untouched)."""
    source, params, _ = data_pipeline
    for name in ("splits", "episodes", "val_episodes"):
        copy_tree(getattr(source, name), f"data/{name}")
    return DataLayout(tmp_path / "data"), source, params


def _edit_line(path, line: int, edit) -> None:
    """Replace CSV line ``line`` (1-based, the header is line 1) by ``edit(fields)``."""
    lines = path.read_text().splitlines()
    fields = lines[line - 1].split(",")
    lines[line - 1] = ",".join(edit(fields))
    path.unlink()  # never write through a hard link into a cache
    path.write_text("\n".join(lines) + "\n")


def test_checked_episodes_read_the_stage_files_unchanged(episode_copy):
    from simprop.data.episodes import read_test_episodes, read_validation_episodes

    layout, _, params = episode_copy
    fold, seed = params.splits.folds[0], params.episodes.test_seeds[0]
    assert read_test_episodes(layout, fold, seed, 5) == read_episodes(layout.test_episode_file(fold, seed), 5)
    assert read_validation_episodes(layout, fold, 1) == read_episodes(layout.val_episode_file(fold), 1)


@pytest.mark.parametrize(
    "tamper, rule",
    [
        ("class", r"class 6 is not one of fold 0's classes \[1, 2, 3, 4, 5\]"),
        ("other_fold_query", r"query '.+' with class 1 is not in .*splits/fold0/test.csv"),
        ("unknown_query", r"query 'no_such_image' with class \d is not in .*splits/fold0/test.csv"),
        ("support_is_query", r"the supports .* repeat an image or the query"),
        ("mismatch_class", r"mismatch_class \d is not another of fold 0's classes"),
    ],
)
def test_a_tampered_episode_file_is_refused_naming_file_line_and_rule(episode_copy, tamper, rule):
    """Issue 28: a query swapped for a fold-1 test image was scored; class 6 in fold 0 gave a
    ValueError traceback; an unknown image named neither the file nor the line."""
    from simprop.data.episodes import read_test_episodes

    layout, _, params = episode_copy
    seed = params.episodes.test_seeds[0]
    path = layout.test_episode_file(0, seed)
    other = read_pairs(layout.split_file(1, "test"))[0][0] if (layout.splits / "fold1").exists() else None
    edits = {
        "class": lambda f: f[:2] + ["6"] + f[3:],
        "other_fold_query": lambda f: [f[0], other, "1", *f[3:]],
        "unknown_query": lambda f: [f[0], "no_such_image", *f[2:]],
        "support_is_query": lambda f: f[:3] + [f[1]] + f[4:],
        "mismatch_class": lambda f: f[:8] + [f[2]] + f[9:],
    }
    if tamper == "other_fold_query" and other is None:
        pytest.skip("the data tree has no fold 1")
    _edit_line(path, 5, edits[tamper])
    with pytest.raises(EpisodeError, match=rf"test_seed{seed}\.csv, line 5: {rule}.*rerun `dvc repro episodes`"):
        read_test_episodes(layout, 0, seed, 1)


def test_episodes_drawn_from_another_list_are_refused(episode_copy):
    """The provenance records the sha256 of the list each file was drawn from; a changed list
    (regenerated data, another filter) makes its old episode files unusable, by name."""
    from simprop.data.episodes import read_test_episodes, read_validation_episodes

    layout, _, params = episode_copy
    test_list = layout.split_file(0, "test")
    pairs = read_pairs(test_list)
    test_list.unlink()
    test_list.write_text(test_list.with_name("val.csv").read_text().splitlines()[0] + "\n"
                         + "\n".join(f"{i},{c}" for i, c in pairs[:-1]) + "\n")  # fmt: skip
    with pytest.raises(EpisodeError, match=r"test_seed\d\.csv: drawn from another .*fold0/test.csv"):
        read_test_episodes(layout, 0, params.episodes.test_seeds[0], 1)
    read_validation_episodes(layout, 0, 1)  # its own list is unchanged
    (layout.val_episodes / "provenance.json").unlink()
    with pytest.raises(EpisodeError, match=r"fold0\.csv: its tree has no provenance.json"):
        read_validation_episodes(layout, 0, 1)
