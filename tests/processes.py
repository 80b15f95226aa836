"""Helpers for tests that start a stage as a child process and signal it."""

from __future__ import annotations

import signal


def default_sigint() -> None:
    """``preexec_fn`` of a child a test will send SIGINT: SIGINT at its default, as under a terminal.

    A shell that runs pytest in the background (``cmd &`` without job control, as CI launchers may)
    hands every child SIGINT *ignored*; Python then installs no KeyboardInterrupt handler, and the
    stage would run to its end (one CI run: the SLURM stage exited 0 after 244 s) instead of
    showing how it handles Ctrl-C.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
