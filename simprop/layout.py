"""Where every output of one training replicate (variant, fold, seed) lives: the one owner of these paths.

Training, evaluation, the report, the analyses and ``simprop segment`` all ask a
:class:`RunLayout` instead of joining path parts themselves, so the layout below (also in
docs/architecture.md and declared in dvc.yaml) is written down once::

    models/<variant>/fold<i>/seed<s>/{best,last}.pt, state.json   the train stage's checkpoints
    metrics/train/<variant>/fold<i>/seed<s>.json                  training summary
    plots/train/{loss,val}/<variant>/fold<i>/seed<s>.csv          training curves (DVC plots)
    metrics/evaluate/<variant>/fold<i>/seed<s>.json               evaluation record
    outputs/evaluate/<variant>/fold<i>/seed<s>/qualitative.png    qualitative panels

``<s>`` is the training seed (one of ``train.seeds``).  Paths are relative to the repository
root given as ``root``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STATE_FILE = "state.json"


@dataclass(frozen=True)
class RunLayout:
    """The output paths of ``variant`` on ``fold``, training seed ``seed``, under the repository ``root``."""

    root: Path
    variant: str
    fold: int
    seed: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def model_dir(self) -> Path:
        return self.root / "models" / self.variant / f"fold{self.fold}" / f"seed{self.seed}"

    @property
    def best(self) -> Path:
        """The checkpoint selected on the validation episodes."""
        return self.model_dir / "best.pt"

    @property
    def last(self) -> Path:
        """The training state after the last completed epoch (resume)."""
        return self.model_dir / "last.pt"

    @property
    def state(self) -> Path:
        return self.model_dir / STATE_FILE

    @property
    def train_metrics(self) -> Path:
        return self.root / "metrics" / "train" / self.variant / f"fold{self.fold}" / f"seed{self.seed}.json"

    @property
    def loss_curve(self) -> Path:
        return self.root / "plots" / "train" / "loss" / self.variant / f"fold{self.fold}" / f"seed{self.seed}.csv"

    @property
    def val_curve(self) -> Path:
        return self.root / "plots" / "train" / "val" / self.variant / f"fold{self.fold}" / f"seed{self.seed}.csv"

    @property
    def evaluate_metrics(self) -> Path:
        return self.root / "metrics" / "evaluate" / self.variant / f"fold{self.fold}" / f"seed{self.seed}.json"

    @property
    def qualitative(self) -> Path:
        return self.root / "outputs" / "evaluate" / self.variant / f"fold{self.fold}" / f"seed{self.seed}" / "qualitative.png"
