"""The paper's claims tested against the spread over training seeds: supported, contradicted or
undecided.

One training is one draw: the default training amplifies float rounding, so another CPU, thread
count or seed moves a cell by several points (docs/studies/2026-11-26-training-seeds.md).  A
difference between two variants is therefore read from training *replicates* (``train.seeds``):

* for each claim "A beats B" the per-replicate paired difference ``d[f, s] = A[f, s] - B[f, s]``
  (fold ``f``, training seed ``s``; each value is the mean over the fold's test sets), paired by
  seed because two variants trained with one seed see the same samples in the same order;
* its mean over folds of the per-fold means over seeds, the quantity the paper's mean column
  compares;
* a 95 % **t interval over training seeds**, stratified by fold: the seed-to-seed variance of
  ``d`` is pooled within folds (the folds differ systematically, so their spread is not noise),
  ``SE = s_pooled * sqrt(sum_f 1/S_f) / F`` with ``sum_f (S_f - 1)`` degrees of freedom.

Why a t interval and not a bootstrap: with three seeds per fold a bootstrap over seeds has ten
distinct resamples per fold and understates the spread; the t interval pools the folds' 8
degrees of freedom (4 folds x 3 seeds) and is exact for normal seed noise.  The test episodes are
fixed and shared by both variants, so the interval is conditional on them: their own sampling
noise is the "test sets" std the tables print beside each cell.

A claim is **supported** when the interval lies above 0, **contradicted** when it lies below 0,
**undecided** otherwise, and undecided with "one draw" when there is a single seed per cell (no
degrees of freedom: differences are not tested).  The claims are the comparisons the paper makes
(Tables 3-5): each component against its ablation, and each adjacent pair of its Table 4
ordering.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

from simprop import paper

LEVEL = 0.95
SUPPORTED, CONTRADICTED, UNDECIDED, NOT_RUN = "supported", "contradicted", "undecided", "not run"
VERDICT_CODE = {SUPPORTED: 1, UNDECIDED: 0, CONTRADICTED: -1}


@dataclass(frozen=True)
class Claim:
    """"``better`` scores higher than ``worse``" on ``measure`` (``shot1``, ``shot5`` or ``identical``)."""

    key: str
    text: str
    better: str
    worse: str
    measure: str
    source: str

    def paper_difference(self) -> float | None:
        """The paper's mean-column difference, better - worse."""
        rows = {
            "shot1": lambda v: paper.TABLE4.get(v) or paper.TABLE3.get((v, 1)),
            "shot5": lambda v: paper.TABLE3.get((v, 5)),
            "identical": lambda v: paper.TABLE5.get(v),
        }[self.measure]
        a, b = rows(self.better), rows(self.worse)
        return None if a is None or b is None else a.mean - b.mean


PAPER_CLAIMS: tuple[Claim, ...] = (
    Claim("dpr_vs_canet", "DPr improves CANet", "dpr", "canet", "shot1", "Table 4"),
    Claim("fbaf_vs_canet", "FBAF improves over CANet's fusion", "fbaf", "canet", "shot1", "Table 4"),
    Claim("dpr_fbaf_vs_fbaf", "DPr improves FBAF", "dpr_fbaf", "fbaf", "shot1", "Table 4"),
    Claim("dpr_fbaf_vs_dpr", "FBAF improves DPr (ordering: DPr + FBAF > DPr)", "dpr_fbaf", "dpr", "shot1", "Table 4"),
    Claim("dpr_vs_fbaf", "ordering: DPr > FBAF", "dpr", "fbaf", "shot1", "Table 4"),
    Claim("simpropnet_vs_dpr_fbaf", "ICA improves DPr + FBAF (ordering: SimPropNet > DPr + FBAF)",
          "simpropnet", "dpr_fbaf", "shot1", "Table 4"),  # fmt: skip
    Claim("simpropnet_vs_canet_1shot", "SimPropNet beats CANet, 1-shot", "simpropnet", "canet", "shot1", "Table 3"),
    Claim("simpropnet_vs_canet_5shot", "SimPropNet beats CANet, 5-shot", "simpropnet", "canet", "shot5", "Table 3"),
    Claim("simpropnet_vs_canet_identical", "SimPropNet beats CANet with the query as its own support",
          "simpropnet", "canet", "identical", "Table 5"),  # fmt: skip
)


@dataclass(frozen=True)
class Verdict:
    claim: Claim
    verdict: str
    mean: float | None = None
    low: float | None = None
    high: float | None = None
    dof: int = 0
    pairs: int = 0
    paper: float | None = None
    note: str = ""

    def as_dict(self) -> dict:
        return {
            "text": self.claim.text, "better": self.claim.better, "worse": self.claim.worse,
            "measure": self.claim.measure, "source": self.claim.source, "verdict": self.verdict,
            "mean": self.mean, "low": self.low, "high": self.high, "dof": self.dof, "pairs": self.pairs,
            "paper": self.paper, "note": self.note,
        }  # fmt: skip


def t_quantile(level: float, dof: int) -> float:
    """The two-sided ``level`` quantile of Student's t with ``dof`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, dof))


def seed_interval(diffs: Mapping[int, list[float]], level: float = LEVEL) -> tuple[float, float | None, int]:
    """``(mean, half width, dof)`` of the mean over folds of the per-fold mean paired difference.

    ``diffs``: per fold, the paired differences of its training seeds.  The seed-to-seed variance
    is pooled within folds; the half width is ``None`` without degrees of freedom (one seed).
    """
    folds = [f for f, d in diffs.items() if d]
    if not folds:
        raise ValueError("seed_interval: no paired differences")
    fold_means = {f: sum(diffs[f]) / len(diffs[f]) for f in folds}
    mean = sum(fold_means.values()) / len(folds)
    dof = sum(len(diffs[f]) - 1 for f in folds)
    if dof == 0:
        return mean, None, 0
    pooled = sum((x - fold_means[f]) ** 2 for f in folds for x in diffs[f]) / dof
    se = math.sqrt(pooled * sum(1.0 / len(diffs[f]) for f in folds)) / len(folds)
    return mean, t_quantile(level, dof) * se, dof


def judge(claim: Claim, value: Callable[[str, int, int], float | None], folds: list[int], seeds: list[int],
          level: float = LEVEL) -> Verdict:  # fmt: skip
    """The verdict on ``claim`` from ``value(variant, fold, seed)`` (``None`` = not run)."""
    diffs: dict[int, list[float]] = {}
    for fold in folds:
        for seed in seeds:
            a, b = value(claim.better, fold, seed), value(claim.worse, fold, seed)
            if a is None or b is None:
                return Verdict(claim, NOT_RUN, paper=claim.paper_difference(),
                               note=f"{claim.better} or {claim.worse} not run on fold {fold}, seed {seed}")  # fmt: skip
            diffs.setdefault(fold, []).append(a - b)
    if not diffs:
        return Verdict(claim, NOT_RUN, paper=claim.paper_difference(), note="no folds")
    mean, half, dof = seed_interval(diffs, level)
    pairs = sum(len(d) for d in diffs.values())
    if half is None:
        return Verdict(claim, UNDECIDED, mean, None, None, 0, pairs, claim.paper_difference(),
                       "one draw per cell: differences not tested")  # fmt: skip
    low, high = mean - half, mean + half
    verdict = SUPPORTED if low > 0 else CONTRADICTED if high < 0 else UNDECIDED
    return Verdict(claim, verdict, mean, low, high, dof, pairs, claim.paper_difference())


def judge_claims(value_for: Callable[[str], Callable[[str, int, int], float | None]], folds: list[int],
                 seeds: list[int], claims: tuple[Claim, ...] = PAPER_CLAIMS) -> list[Verdict]:  # fmt: skip
    """The verdict on each claim; ``value_for(measure)(variant, fold, seed)`` gives a replicate's value."""
    return [judge(c, value_for(c.measure), list(folds), list(seeds)) for c in claims]


def claims_lists(verdicts: list[Verdict]) -> dict[str, list[str]]:
    """``{"supported": [key, ...], "contradicted": [...], "undecided": [...], "not run": [...]}``."""
    out: dict[str, list[str]] = {SUPPORTED: [], CONTRADICTED: [], UNDECIDED: [], NOT_RUN: []}
    for v in verdicts:
        out[v.verdict].append(v.claim.key)
    return out
