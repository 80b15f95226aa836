"""What training, evaluation, the analyses and ``simprop segment`` share, over the model.

* :mod:`.features`  the frozen backbone's features of every image, computed once (``features`` stage)
* :mod:`.encoded`   a frozen projection's outputs of every cached image, computed once
* :mod:`.inference` the one inference path: margins, upsampling, scoring of episodes
* :mod:`.matcher`   the parameter-free prototype matcher (the control every evaluation carries)
* :mod:`.metrics`   mIoU, FB-IoU and per-class IoU pooled over episodes and test sets
* :mod:`.visualize` qualitative panels
"""
