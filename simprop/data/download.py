"""The download stage: fetch, verify and install the raw VOC2012 + SBD trees.

* :func:`fetch` downloads one URL into ``<data.root>/downloads/`` through a ``.part`` file.
  An interrupted download resumes with an HTTP ``Range`` request; a server that ignores
  ``Range`` (answers 200) makes it restart cleanly from byte 0. A download that makes no
  progress (fewer than :data:`MIN_PROGRESS_BYTES` in ``data.stall_timeout_s`` seconds, e.g. a
  server trickling a byte now and then) is abandoned and retried, then given up on. The
  finished file must have the md5 from params.yaml, or it is moved aside to
  ``<name>.md5-mismatch`` and an error says why; once the md5 in params.yaml is corrected, that
  file is checked against it first and reused if it matches, not downloaded again.
* :func:`extract_archive` extracts a tar/tgz after checking every member: absolute paths, ``..``
  components, links pointing outside the extraction directory and device files are refused.
* :func:`install_tree` builds a tree in ``<target>.tmp-XXXX`` next to the target and renames it
  into place only when it is complete, so an interrupted or failed extraction never looks like a
  finished dataset.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import posixpath
import re
import shutil
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path

from simprop.data.errors import (
    ArchiveError,
    ChecksumError,
    DataError,
    DownloadError,
    UnsafeArchiveError,
)
from simprop.data.io import install_tree
from simprop.data.layout import SBD_SUBDIR, VOC_SUBDIR, DataLayout
from simprop.data.progress import progress_bar

CHUNK_SIZE = 1 << 20
MIN_PROGRESS_BYTES = 64 * 1024
"""A download makes progress while at least this many bytes arrive every ``data.stall_timeout_s``."""

VOC_MEMBERS = (
    f"{VOC_SUBDIR}/JPEGImages/",
    f"{VOC_SUBDIR}/SegmentationClass/",
    f"{VOC_SUBDIR}/ImageSets/Segmentation/",
)
"""The parts of the VOC2012 tar the pipeline reads (the rest, e.g. Annotations, is skipped)."""

SBD_MEMBERS = (
    f"{SBD_SUBDIR}/img/",
    f"{SBD_SUBDIR}/cls/",
    f"{SBD_SUBDIR}/train.txt",
    f"{SBD_SUBDIR}/val.txt",
)
"""The parts of SBD's benchmark.tgz the pipeline reads (``inst/`` is skipped)."""


class _Interrupted(Exception):
    """The connection ended before the announced number of bytes arrived."""


class _Stalled(_Interrupted):
    """Too few bytes arrived within the stall timeout (``data.stall_timeout_s``)."""


# ---------------------------------------------------------------------------- checksums


def md5sum(path: Path, *, progress: bool = False) -> str:
    """Hex md5 of a file, read in 1 MiB chunks."""
    digest = hashlib.md5()
    size = Path(path).stat().st_size
    with open(path, "rb") as fh, progress_bar(
        total=size, desc=f"md5 {Path(path).name}", unit="B", unit_scale=True, enabled=progress
    ) as bar:
        while chunk := fh.read(CHUNK_SIZE):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _check_md5(path: Path, expected: str, *, dest: Path, url: str, key: str, progress: bool) -> None:
    """Raise :class:`ChecksumError` (moving ``path`` to ``<dest>.md5-mismatch``) unless the md5 matches."""
    actual = md5sum(path, progress=progress)
    if actual == expected.lower():
        return
    aside = dest.with_name(dest.name + ".md5-mismatch")
    os.replace(path, aside)
    raise ChecksumError(
        f"{dest.name}: md5 is {actual}, expected {expected.lower()} (data.{key}_md5).\n"
        f"  downloaded from: {url} (data.{key}_url)\n"
        f"  The file is not the expected archive: fix data.{key}_url (mirror?) or data.{key}_md5 in "
        f"params.yaml. It was moved to {aside} for inspection. If the md5 in params.yaml was the "
        "mistake, the next run checks that file against the corrected md5 and uses it without "
        "downloading; otherwise it downloads the file afresh. No dataset tree was written."
    )


def _reuse_set_aside(dest: Path, md5: str, *, progress: bool) -> bool:
    """A file moved aside for a wrong md5 that has the (corrected) md5 now becomes ``dest``."""
    aside = dest.with_name(dest.name + ".md5-mismatch")
    if dest.exists() or not aside.is_file():
        return False
    if md5sum(aside, progress=progress) != md5.lower():
        return False
    os.replace(aside, dest)
    return True


# ---------------------------------------------------------------------------- download


def file_name_from_url(url: str, default: str) -> str:
    """The last path component of ``url`` (``benchmark.tgz``), or ``default`` when it has none."""
    name = posixpath.basename(urllib.parse.urlparse(url).path)
    return name if re.fullmatch(r"[A-Za-z0-9._-]+", name or "") else default


def fetch(
    url: str,
    dest: Path,
    md5: str,
    *,
    key: str = "file",
    retries: int = 3,
    timeout: float = 60.0,
    stall_timeout: float = 60.0,
    backoff: float = 2.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``), verify its md5, return ``dest``.

    An existing ``dest`` with the right md5 is reused without any network access, and so is a
    ``dest.md5-mismatch`` (set aside by an earlier run) that has the md5 now. ``key`` names the
    params (``data.<key>_url`` / ``data.<key>_md5``) in error messages. A connection that drops,
    or that makes no progress (fewer than :data:`MIN_PROGRESS_BYTES` in ``stall_timeout``
    seconds; ``timeout`` bounds each network wait), is retried ``retries`` times, each retry
    resuming where the last one stopped; after that :class:`DownloadError` is raised and the
    bytes received so far are kept in the ``.part`` file so that the next run resumes.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        _check_md5(dest, md5, dest=dest, url=url, key=key, progress=progress)
        return dest
    if _reuse_set_aside(dest, md5, progress=progress):
        return dest
    part = dest.with_name(dest.name + ".part")
    wait = min(timeout, stall_timeout)
    for attempt in range(retries + 1):
        try:
            _download_to_part(url, part, timeout=wait, stall_timeout=stall_timeout, progress=progress)
            break
        except (_Interrupted, urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as exc:
            if isinstance(exc, urllib.error.HTTPError):  # 4xx/5xx: retrying will not help
                raise DownloadError(
                    f"{url}: HTTP {exc.code} {exc.reason}; check data.{key}_url in params.yaml"
                ) from None
            have = part.stat().st_size if part.exists() else 0
            if attempt == retries:
                if part.exists() and not have:
                    part.unlink()  # an empty .part helps no one
                why = str(exc) if isinstance(exc, _Interrupted) else f"{type(exc).__name__}: {exc}"
                what = "stalled" if isinstance(exc, _Stalled) else "interrupted"
                kept = (
                    f"{have} bytes are kept in {part}. Run the stage again to resume."
                    if have else "nothing was received, so there is nothing to resume; run the stage again later."
                )
                hint = (
                    f" A slow mirror? Raise data.stall_timeout_s or set data.{key}_url to another mirror."
                    if isinstance(exc, _Stalled) else ""
                )
                raise DownloadError(
                    f"{url}: download {what} ({why}) after {retries + 1} attempts; {kept}{hint}"
                ) from None
            time.sleep(backoff * (attempt + 1))
    _check_md5(part, md5, dest=dest, url=url, key=key, progress=progress)
    os.replace(part, dest)
    return dest


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``(first byte, total size)`` of a ``Content-Range`` header (``bytes 100-199/1000``)."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not match:
        return None, None
    first = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return first, total


def _download_to_part(url: str, part: Path, *, timeout: float, stall_timeout: float = 60.0, progress: bool) -> None:
    """One HTTP request appending to (resume) or rewriting (restart) ``part``.

    Raises :class:`_Stalled` when fewer than :data:`MIN_PROGRESS_BYTES` arrive within
    ``stall_timeout`` seconds (``timeout`` bounds each single network wait).
    """
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "simprop-data/1", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # asked beyond the end: complete already, or a stale part file
            _, total = _content_range(exc.headers.get("Content-Range"))
            if total == have:
                return
            part.unlink()
            raise _Interrupted(f"partial file larger than the remote file ({have} > {total}); restarting")
        raise
    with response:
        first, total = _content_range(response.headers.get("Content-Range"))
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if response.status == 206 and first != have:  # a range we did not ask for: start afresh
            part.unlink(missing_ok=True)
            raise _Interrupted(f"server answered bytes from {first} to a request from {have}; restarting")
        if response.status == 206:
            mode, start = "ab", have
        else:  # 200: no partial file, or the server ignored Range; (re)start from byte 0
            mode, start, total = "wb", 0, length
        received = 0
        window_start, window_bytes = time.monotonic(), 0
        with open(part, mode) as fh, progress_bar(
            total=total, initial=start, desc=part.name.removesuffix(".part"), unit="B",
            unit_scale=True, enabled=progress,
        ) as bar:
            while True:
                try:
                    chunk = response.read1(CHUNK_SIZE)  # what has arrived, not a blocking full chunk
                except http.client.IncompleteRead as exc:
                    fh.write(exc.partial)
                    received += len(exc.partial)
                    raise _Interrupted(f"connection closed after {start + received} bytes") from None
                except TimeoutError:
                    raise _Stalled(
                        f"no data for {timeout:g} s after {start + received} bytes (data.stall_timeout_s = {stall_timeout:g})"
                    ) from None
                if not chunk:
                    break
                fh.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
                window_bytes += len(chunk)
                now = time.monotonic()
                if window_bytes >= MIN_PROGRESS_BYTES:
                    window_start, window_bytes = now, 0
                elif now - window_start > stall_timeout:
                    raise _Stalled(
                        f"only {window_bytes} bytes in {now - window_start:.1f} s after {start + received - window_bytes} "
                        f"bytes: no progress for data.stall_timeout_s = {stall_timeout:g} s"
                    )
    if length is not None and received < length:
        raise _Interrupted(f"connection closed after {start + received} of {start + length} bytes")


# ---------------------------------------------------------------------------- extraction


def check_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Refuse a member that could write outside the extraction directory."""
    name = member.name
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise UnsafeArchiveError(f"{archive}: refusing member {name!r}: absolute path")
    if ".." in re.split(r"[/\\]", name):
        raise UnsafeArchiveError(f"{archive}: refusing member {name!r}: '..' in its path")
    if member.issym() or member.islnk():
        link = member.linkname
        if link.startswith(("/", "\\")):
            raise UnsafeArchiveError(f"{archive}: refusing link {name!r} -> {link!r}: absolute target")
        base = posixpath.dirname(name) if member.issym() else ""
        target = posixpath.normpath(posixpath.join(base, link))
        if target == ".." or target.startswith("../"):
            raise UnsafeArchiveError(
                f"{archive}: refusing link {name!r} -> {link!r}: points outside the extraction directory"
            )
    if member.isdev() or member.isfifo():
        raise UnsafeArchiveError(f"{archive}: refusing member {name!r}: device or fifo")


def _selected(name: str, keep: Sequence[str]) -> bool:
    name = name.removeprefix("./")
    return any(name == k.rstrip("/") or (k.endswith("/") and name.startswith(k)) for k in keep)


def extract_archive(archive: Path, dest: Path, keep: Sequence[str] = (), *, progress: bool = True) -> int:
    """Extract the members of ``archive`` under ``keep`` prefixes (all when empty) into ``dest``.

    Every member is checked with :func:`check_member` before anything is written; extraction is
    meant to go into a fresh temporary directory (see :func:`install_tree`). Returns the number
    of files extracted. Raises :class:`ArchiveError` for a truncated or corrupt archive.
    """
    archive = Path(archive)
    count = 0
    try:
        with tarfile.open(archive, "r:*") as tar, progress_bar(
            desc=f"extract {archive.name}", unit=" files", enabled=progress
        ) as bar:
            for member in tar:
                check_member(member, archive)
                if keep and not _selected(member.name, keep):
                    continue
                tar.extract(member, dest, set_attrs=False, filter="data")
                if member.isfile():
                    count += 1
                    bar.update()
    except UnsafeArchiveError:
        raise
    except tarfile.FilterError as exc:
        raise UnsafeArchiveError(f"{archive}: refusing member: {exc}") from None
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise ArchiveError(
            f"{archive}: cannot be read completely ({type(exc).__name__}: {exc}); it is truncated or "
            "corrupt. Delete it and run the stage again to download it afresh."
        ) from None
    return count


def required_raw_paths(raw: Path) -> list[Path]:
    """What a complete raw tree must contain (used after extraction and generation)."""
    voc, sbd = raw / VOC_SUBDIR, raw / SBD_SUBDIR
    sets = voc / "ImageSets" / "Segmentation"
    return [
        voc / "JPEGImages", voc / "SegmentationClass",
        sets / "train.txt", sets / "val.txt", sets / "trainval.txt",
        sbd / "img", sbd / "cls", sbd / "train.txt", sbd / "val.txt",
        raw / "train_noval.txt",
    ]  # fmt: skip


def check_raw_tree(raw: Path, sources: str) -> None:
    """Raise :class:`ArchiveError` if a required path is missing from a freshly built raw tree."""
    missing = [p for p in required_raw_paths(raw) if not p.exists()]
    if missing:
        rel = ", ".join(str(p.relative_to(raw)) for p in missing[:4])
        raise ArchiveError(
            f"missing after extraction: {rel}; {sources} is truncated or not the expected archive. "
            "Delete it from the downloads folder and run the stage again."
        )


# ---------------------------------------------------------------------------- the stage


def prepare_voc(
    layout: DataLayout, data, *, progress: bool = True, retries: int = 3, timeout: float = 60.0, backoff: float = 2.0
) -> None:
    """Download (or reuse) the three official files and install ``<root>/raw`` from them.

    ``data`` is the ``data`` section of the params (:class:`simprop.params.DataParams`); its
    ``stall_timeout_s`` is the no-progress deadline of each attempt.
    """
    options = dict(retries=retries, timeout=timeout, stall_timeout=data.stall_timeout_s, backoff=backoff, progress=progress)
    voc_tar = fetch(
        data.voc_url, layout.downloads / file_name_from_url(data.voc_url, "VOCtrainval_11-May-2012.tar"),
        data.voc_md5, key="voc", **options,
    )
    sbd_tgz = fetch(
        data.sbd_url, layout.downloads / file_name_from_url(data.sbd_url, "benchmark.tgz"),
        data.sbd_md5, key="sbd", **options,
    )
    noval = fetch(
        data.train_noval_url, layout.downloads / file_name_from_url(data.train_noval_url, "train_noval.txt"),
        data.train_noval_md5, key="train_noval", **options,
    )

    def build(tmp: Path) -> None:
        extract_archive(voc_tar, tmp, VOC_MEMBERS, progress=progress)
        extract_archive(sbd_tgz, tmp, SBD_MEMBERS, progress=progress)
        shutil.copyfile(noval, tmp / "train_noval.txt")
        check_raw_tree(tmp, f"{voc_tar} or {sbd_tgz}")

    install_tree(layout.raw, build)


def prepare_raw(layout: DataLayout, data, *, workers: int = 1, progress: bool = True) -> None:
    """The download stage: ``data.source`` ``voc`` downloads, ``synthetic`` generates."""
    if data.source == "voc":
        prepare_voc(layout, data, progress=progress)
    elif data.source == "synthetic":
        from simprop.data.synthetic import write_synthetic_tree

        def build(tmp: Path) -> None:
            write_synthetic_tree(tmp, data.synthetic, workers=workers, progress=progress)
            check_raw_tree(tmp, "the generated tree")

        install_tree(layout.raw, build)
    else:  # params validation makes this unreachable
        raise DataError(f"data.source: unknown source {data.source!r}")
