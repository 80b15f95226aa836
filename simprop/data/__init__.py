"""The data pipeline: VOC2012 + SBD (or the embedded generated tree) to PASCAL-5i episodes.

Modules, in pipeline order:

* :mod:`simprop.data.layout`    where every file of the on-disk contract lives
* :mod:`simprop.data.download`  resumable, md5-checked downloads and safe atomic extraction
* :mod:`simprop.data.synthetic` the embedded generated miniature VOC2012 + SBD tree
* :mod:`simprop.data.augment`   SegmentationClassAug (SBD ``cls/*.mat`` overwritten by VOC masks)
* :mod:`simprop.data.splits`    PASCAL-5i (image, class) pair lists and the small-object filter
* :mod:`simprop.data.episodes`  fixed, seeded test and validation episode files
* :mod:`simprop.data.io`        readers and writers shared by the above and by training/evaluation
* :mod:`simprop.data.datasets`  images and labels as tensors for the networks (``ImageStore``)

Class names and folds live in :mod:`simprop.voc`.

Importing this package has no side effects and pulls in neither torch nor mlflow.
"""

from simprop.data.errors import DataError
from simprop.data.layout import DataLayout

__all__ = ["DataError", "DataLayout"]
