"""Episodic training of one variant on one fold (paper §3.6, protocol.md §6).

* :mod:`.fold`          the ``train`` stage's job: a fold's variants in turn, one MLflow run each
* :mod:`.trainer`       :class:`~.trainer.Trainer`: set-up, one step, validation, the loop
* :mod:`.batches`       the samples of an epoch, seeded per sample; CANet's IOM history
* :mod:`.checkpointing` ``best.pt`` / ``last.pt``, resume, and what a resumed run must share
* :mod:`.shared`        what the trainings of one fold compute once
* :mod:`.optim`         SGD, parameter groups and the learning-rate schedule
"""
