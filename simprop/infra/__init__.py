"""Machinery with no knowledge of the experiment; it never imports data, model, engine, train,
evaluate, report, analysis or segment (tests/test_layers.py).

* :mod:`.stage`       what every stage script shares: its command line, params, errors, signals
* :mod:`.parallel`    a stage's folds side by side in spawned processes
* :mod:`.distributed` one training over several processes (torchrun, DDP)
* :mod:`.tracking`    MLflow: the store, run names and tags, one run per stage execution
* :mod:`.device`      the device rule and mixed precision
* :mod:`.atomic`      files written whole or not at all
* :mod:`.timing`      where a stage's time goes
"""
