"""The ``evaluate`` stage: a (variant, fold)'s checkpoint on the fixed test sets.

* :mod:`.run`      the stage's job: every test set and shot count, the record, the MLflow run
* :mod:`.controls` the support-use controls and the gains they are read by
"""
