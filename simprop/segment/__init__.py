"""Segment your own images from a few examples (``simprop segment``; docs/segment.md).

* :mod:`.api`     :func:`~.api.segment`, the Python API behind the command
* :mod:`.inputs`  supports, masks, queries and the output folder, checked before anything is written
* :mod:`.predict` the checkpoint and the prediction (the evaluate stage's inference path)
* :mod:`.outputs` the mask and overlay PNGs
"""
