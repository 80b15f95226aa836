"""Where every file of the on-disk data contract lives (docs/architecture.md).

All paths hang off ``data.root``. The raw trees are laid out exactly as inside the official
archives, so the real data and the embedded generated data are read by the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

VOC_SUBDIR = Path("VOCdevkit/VOC2012")
SBD_SUBDIR = Path("benchmark_RELEASE/dataset")


@dataclass(frozen=True)
class DataLayout:
    """Paths of the data contract below one data root (``data.root``, default ``data``)."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    # ---------------------------------------------------------------- download stage
    @property
    def downloads(self) -> Path:
        """Archives being or having been downloaded; not a DVC output, so resuming survives a failed stage."""
        return self.root / "downloads"

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def voc(self) -> Path:
        return self.raw / VOC_SUBDIR

    @property
    def voc_images(self) -> Path:
        """Every image of the pipeline (SBD's images are a subset of VOC's JPEGs)."""
        return self.voc / "JPEGImages"

    @property
    def voc_masks(self) -> Path:
        return self.voc / "SegmentationClass"

    def voc_list(self, split: str) -> Path:
        """``ImageSets/Segmentation/{train,val,trainval}.txt``."""
        return self.voc / "ImageSets" / "Segmentation" / f"{split}.txt"

    @property
    def sbd(self) -> Path:
        return self.raw / SBD_SUBDIR

    @property
    def sbd_images(self) -> Path:
        return self.sbd / "img"

    @property
    def sbd_masks(self) -> Path:
        return self.sbd / "cls"

    def sbd_list(self, split: str) -> Path:
        """SBD's ``train.txt`` / ``val.txt``."""
        return self.sbd / f"{split}.txt"

    @property
    def train_noval(self) -> Path:
        """SBD train without the VOC2012 val images (the PFENet protocol's list)."""
        return self.raw / "train_noval.txt"

    # ---------------------------------------------------------------- later stages
    @property
    def aug(self) -> Path:
        return self.root / "SegmentationClassAug"

    @property
    def splits(self) -> Path:
        return self.root / "splits"

    def split_file(self, fold: int, name: str) -> Path:
        """``splits/fold<i>/{train,val,test}.csv``."""
        return self.splits / f"fold{fold}" / f"{name}.csv"

    @property
    def episodes(self) -> Path:
        return self.root / "episodes"

    def test_episode_file(self, fold: int, seed: int) -> Path:
        return self.episodes / f"fold{fold}" / f"test_seed{seed}.csv"

    @property
    def val_episodes(self) -> Path:
        """Validation episodes, a tree of their own: the train stages depend on it, not on the test sets."""
        return self.root / "val_episodes"

    def val_episode_file(self, fold: int) -> Path:
        return self.val_episodes / f"fold{fold}.csv"

    # ---------------------------------------------------------------- single files
    def image(self, image_id: str) -> Path:
        return self.voc_images / f"{image_id}.jpg"

    def label(self, image_id: str) -> Path:
        """The SegmentationClassAug label of an image (class ids 0..20, 255 = ignore)."""
        return self.aug / f"{image_id}.png"
