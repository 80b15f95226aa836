"""The paper's claims read against the spread over training seeds (simprop/report/claims.py)."""

from __future__ import annotations

import math

import pytest

from simprop.report.claims import (
    CONTRADICTED,
    NOT_RUN,
    PAPER_CLAIMS,
    SUPPORTED,
    UNDECIDED,
    Claim,
    claims_lists,
    judge,
    judge_claims,
    seed_interval,
    t_quantile,
)

CLAIM = Claim("a_vs_b", "A beats B", "a", "b", "shot1", "test")


def test_t_quantile_matches_the_table():
    # Student's t, two-sided 95 %: the printed table values
    assert t_quantile(0.95, 1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile(0.95, 4) == pytest.approx(2.776, abs=1e-3)
    assert t_quantile(0.95, 8) == pytest.approx(2.306, abs=1e-3)


def test_seed_interval_pools_the_seed_variance_within_folds():
    # fold 0: 1, 2, 3 (mean 2); fold 1: 12, 13, 14 (mean 13): the folds differ by 11 points, which
    # is not seed noise; within each fold the seeds spread with variance 1
    mean, half, dof = seed_interval({0: [1.0, 2.0, 3.0], 1: [12.0, 13.0, 14.0]})
    assert mean == pytest.approx(7.5)
    assert dof == 4
    se = math.sqrt(1.0 * (1 / 3 + 1 / 3)) / 2
    assert half == pytest.approx(2.7764451 * se, rel=1e-6)


def test_seed_interval_with_one_seed_has_no_width():
    mean, half, dof = seed_interval({0: [1.5], 1: [2.5]})
    assert (mean, half, dof) == (2.0, None, 0)


def _values(diffs: dict[tuple[int, int], float]):
    """A value function where variant b scores 50 and a scores 50 + the given difference."""
    return lambda variant, fold, seed: 50.0 + (diffs[(fold, seed)] if variant == "a" else 0.0)


FOLDS, SEEDS = [0, 1, 2, 3], [0, 1, 2]


@pytest.mark.parametrize(
    ("diff", "expected"),
    [
        (lambda f, s: 3.0 + 0.5 * (s - 1), SUPPORTED),  # +3 ± a small seed spread
        (lambda f, s: -3.0 + 0.5 * (s - 1), CONTRADICTED),
        (lambda f, s: 0.2 + 4.0 * (s - 1), UNDECIDED),  # a small mean inside a large seed spread
        (lambda f, s: 0.2 + 4.0 * (s - 1) + 5.0 * f, SUPPORTED),  # the folds differ, the seeds agree
    ],
)
def test_verdicts(diff, expected):
    values = _values({(f, s): diff(f, s) for f in FOLDS for s in SEEDS})
    verdict = judge(CLAIM, values, FOLDS, SEEDS)
    assert verdict.verdict == expected
    assert verdict.pairs == 12 and verdict.dof == 8
    assert verdict.low < verdict.mean < verdict.high


def test_one_draw_is_undecided_and_says_why():
    verdict = judge(CLAIM, _values({(f, 0): 5.0 for f in FOLDS}), FOLDS, [0])
    assert verdict.verdict == UNDECIDED and verdict.low is None
    assert "one draw per cell" in verdict.note and verdict.mean == pytest.approx(5.0)


def test_a_variant_not_run_is_listed_as_such():
    values = lambda variant, fold, seed: None if variant == "dpr" else 50.0  # noqa: E731
    verdicts = judge_claims(lambda measure: values, FOLDS, SEEDS)
    lists = claims_lists(verdicts)
    assert "dpr_vs_canet" in lists[NOT_RUN]
    assert "fbaf_vs_canet" in lists[UNDECIDED]  # equal scores: zero difference, zero spread
    assert sum(len(v) for v in lists.values()) == len(PAPER_CLAIMS)


def test_claims_name_the_papers_differences():
    by_key = {c.key: c for c in PAPER_CLAIMS}
    assert by_key["dpr_vs_canet"].paper_difference() == pytest.approx(55.89 - 51.75)
    assert by_key["simpropnet_vs_dpr_fbaf"].paper_difference() == pytest.approx(57.19 - 57.09)
    assert by_key["simpropnet_vs_canet_identical"].paper_difference() == pytest.approx(76.36 - 54.86)
    # every adjacent pair of the paper's Table 4 ordering is a claim
    order = ["simpropnet", "dpr_fbaf", "dpr", "fbaf", "canet"]
    pairs = {(c.better, c.worse) for c in PAPER_CLAIMS if c.measure == "shot1"}
    assert all((a, b) in pairs for a, b in zip(order, order[1:]))


def _summary(verdicts: dict[str, int], shift: float = 0.0) -> dict:
    return {
        "canet": {"shot1_miou": 60.0 + shift, "shot1_miou_std": 1.2},
        "dpr": {"shot1_miou": 65.0 + shift, "shot1_miou_std": 0.8},
        "claims": {key: {"mean": 2.0 * v, "low": 2.0 * v - 1.0, "high": 2.0 * v + 1.0, "paper": 4.14, "verdict": v}
                   for key, v in verdicts.items()},  # fmt: skip
    }


def test_compare_claims_flags_runs_that_disagree(tmp_path, capsys):
    """benchmarks/compare_claims.py: the rounding test's comparison of two runs' conclusions."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from compare_claims import main

    one, two, three = tmp_path / "one.json", tmp_path / "two.json", tmp_path / "three.json"
    one.write_text(json.dumps(_summary({"dpr_vs_canet": 1, "fbaf_vs_canet": 0})))
    two.write_text(json.dumps(_summary({"dpr_vs_canet": 1, "fbaf_vs_canet": -1}, shift=0.5)))  # undecided -> contradicted
    three.write_text(json.dumps(_summary({"dpr_vs_canet": -1, "fbaf_vs_canet": 0})))  # supported -> contradicted
    assert main([str(one), str(two), "--names", "a", "b", "--out", str(tmp_path / "c.md")]) == 0
    text = capsys.readouterr().out
    assert "| canet | 60.00 ± 1.20 | 60.50 ± 1.20 |" in text
    assert "| dpr_vs_canet | +2.00 [+1.00, +3.00] supported | +2.00 [+1.00, +3.00] supported |" in text
    assert "contradicted in another: none" in (tmp_path / "c.md").read_text()
    assert main([str(one), str(three)]) == 1
    assert "contradicted in another: dpr_vs_canet" in capsys.readouterr().out
