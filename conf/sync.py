"""Rewrite conf/config.yaml from params.yaml (the default setup's composed values).

With DVC's Hydra composition enabled, `dvc exp run` composes params.yaml from
conf/config.yaml plus the chosen conf/setup/<name>.yaml.  After editing
params.yaml by hand, run `python3 conf/sync.py` so both stay identical
(tests/test_setups.py checks it).
"""

from pathlib import Path

HEADER = """\
# Hydra base config: `dvc exp run` composes params.yaml from this file and conf/setup/<setup>.yaml.
# Keep it identical to params.yaml (python3 conf/sync.py rewrites it; tests/test_setups.py checks).
defaults:
  - _self_
  - setup: default

"""

root = Path(__file__).resolve().parents[1]
(root / "conf" / "config.yaml").write_text(HEADER + (root / "params.yaml").read_text())
print("conf/config.yaml rewritten from params.yaml")
