"""The errors a stage expects, in one leaf module (it imports nothing from simprop).

Every expected failure derives from :class:`StageError`: its message names the file or params
key at fault and says what to do.  A stage script (:func:`simprop.infra.stage.run_stage`) turns
one into a single line on stderr and exit status 2; anything else is a bug and keeps its
traceback.  Each family also derives from the built-in class its callers catch (``ValueError``
for bad params, ``RuntimeError`` for the rest), so code that caught those before still does.

Sub-families live beside the code that raises them (``simprop.data.errors`` for downloads,
archives, labels and episodes; ``simprop.model.checkpoint`` for unsafe and corrupt checkpoints).
"""

from __future__ import annotations

import signal


class StageError(Exception):
    """An expected failure of a stage: the message names the file or key and what to do."""


class ParamsError(StageError, ValueError):
    """A params.yaml value is missing, misspelt or invalid."""


class DeviceUnavailable(ParamsError, RuntimeError):
    """A device named in params (or on the command line) that this machine does not have.

    A :class:`ParamsError`, so a stage reports it as one line and exits 2."""


class DataError(StageError, RuntimeError):
    """A data file is missing, corrupt or inconsistent; the message names it."""


class CheckpointError(StageError, RuntimeError):
    """A checkpoint is missing, unreadable, unsafe, or not the one the caller expects."""


class BackboneWeightsError(StageError, RuntimeError):
    """``model.backbone_weights`` cannot be honoured (unreachable download, bad file)."""


class TrainingDiverged(StageError, RuntimeError):
    """The loss became NaN or infinite."""


class AnalysisError(StageError, RuntimeError):
    """An analysis input is missing or unusable; the message says which file and what to do."""


class TrackingError(StageError, RuntimeError):
    """The MLflow store cannot be opened or used; the message names it and what to do."""


class FoldFailed(StageError, RuntimeError):
    """One fold of a per-variant stage failed with an expected error; the message names the fold."""


class DiskFullError(StageError, OSError):
    """The file system holding an output is full: the message names the output, the free space
    and at least how much more the write needed; the previous version of the file is intact."""


class StageTerminated(BaseException):
    """SIGTERM arrived while a stage run was open (raised so the run is closed as KILLED)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


EXPECTED_ERRORS: tuple[type[BaseException], ...] = (StageError, FileNotFoundError)
"""What a stage reports as one line and exit status 2 (a missing input file is expected too)."""
