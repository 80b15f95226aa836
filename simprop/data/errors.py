"""Errors of the data pipeline. Each message names the file and says what to do."""

from __future__ import annotations

from simprop.errors import DataError

__all__ = ["ArchiveError", "ChecksumError", "DataError", "DownloadError", "EpisodeError", "LabelError", "UnsafeArchiveError"]


class DownloadError(DataError):
    """A download failed or was interrupted (the partial file is kept for resuming)."""


class ChecksumError(DataError):
    """A downloaded file does not have the md5 given in params.yaml."""


class ArchiveError(DataError):
    """An archive is truncated, corrupt, or not the expected archive."""


class UnsafeArchiveError(ArchiveError):
    """An archive member would be written outside the extraction directory."""


class LabelError(DataError):
    """A label map or image is unreadable, empty, or holds values outside 0..20 and 255."""


class EpisodeError(DataError):
    """Episodes cannot be drawn (e.g. a class has fewer images than shots + 1)."""
