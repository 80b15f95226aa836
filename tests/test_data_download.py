"""The download stage: md5 checks, resumable HTTP downloads, safe and atomic extraction.

Downloads go to a real HTTP server on 127.0.0.1 (tests/conftest.py) serving archives built
from a generated tree, with and without Range support.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile
import time
from pathlib import Path

import pytest

from simprop.data.download import extract_archive, fetch, prepare_voc
from simprop.data.errors import (
    ArchiveError,
    ChecksumError,
    DownloadError,
    UnsafeArchiveError,
)
from simprop.data.io import install_tree
from simprop.data.layout import DataLayout


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def tar_bytes(root: Path, members: list[str], mode: str = "w", extra: dict[str, bytes] | None = None) -> bytes:
    """An archive of ``root/<member>`` paths (recursively), plus ``extra`` in-memory files."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for member in members:
            tar.add(root / member, arcname=member)
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, bytes]:
    """VOC tar, SBD tgz and train_noval.txt built from a small generated raw tree."""
    from simprop.data.synthetic import write_synthetic_tree
    from simprop.params import SyntheticParams

    raw = tmp_path_factory.mktemp("source") / "raw"
    write_synthetic_tree(raw, SyntheticParams(num_sbd_images=30, num_voc_images=20, width=96, height=96))
    return {
        "raw": raw,  # type: ignore[dict-item]
        "VOCtrainval_11-May-2012.tar": tar_bytes(
            raw, ["VOCdevkit"], extra={"VOCdevkit/VOC2012/Annotations/skipped.xml": b"<annotation/>"}
        ),
        "benchmark.tgz": tar_bytes(raw, ["benchmark_RELEASE"], mode="w:gz"),
        "train_noval.txt": (raw / "train_noval.txt").read_bytes(),
    }


def data_params(server, archives, **overrides):
    from simprop.params import DataParams

    fields = dict(
        source="voc",
        voc_url=server.url("VOCtrainval_11-May-2012.tar"),
        voc_md5=md5(archives["VOCtrainval_11-May-2012.tar"]),
        sbd_url=server.url("benchmark.tgz"),
        sbd_md5=md5(archives["benchmark.tgz"]),
        train_noval_url=server.url("train_noval.txt"),
        train_noval_md5=md5(archives["train_noval.txt"]),
    )
    fields.update(overrides)
    return dataclasses.replace(DataParams(), **fields)


def served(archives) -> dict[str, bytes]:
    return {k: v for k, v in archives.items() if isinstance(v, bytes)}


def relative_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------- whole stage


def test_prepare_voc_installs_the_archive_layout(tmp_path, serve_files, archives):
    server = serve_files(served(archives))
    layout = DataLayout(tmp_path / "data")
    prepare_voc(layout, data_params(server, archives), progress=False, backoff=0)
    assert relative_files(layout.raw) == relative_files(archives["raw"])  # Annotations/ skipped
    some = sorted(layout.sbd_masks.iterdir())[0]
    assert some.read_bytes() == (archives["raw"] / some.relative_to(layout.raw)).read_bytes()
    assert not list(layout.root.glob("raw.tmp-*"))
    # a second run reuses the verified downloads without touching the network
    before = len(server.requests)
    prepare_voc(layout, data_params(server, archives), progress=False, backoff=0)
    assert len(server.requests) == before


def test_md5_mismatch_is_a_clear_error_and_leaves_no_tree(tmp_path, serve_files, archives):
    server = serve_files(served(archives))
    layout = DataLayout(tmp_path / "data")
    wrong = "0" * 32
    with pytest.raises(ChecksumError) as info:
        prepare_voc(layout, data_params(server, archives, sbd_md5=wrong), progress=False, backoff=0)
    message = str(info.value)
    assert "benchmark.tgz" in message and wrong in message and md5(archives["benchmark.tgz"]) in message
    assert "data.sbd_url" in message and "data.sbd_md5" in message
    assert not layout.raw.exists() and not list(layout.root.glob("raw.tmp-*"))
    assert (layout.downloads / "benchmark.tgz.md5-mismatch").exists()  # kept aside for inspection
    assert not (layout.downloads / "benchmark.tgz").exists()  # so the next run downloads afresh


def test_http_error_names_the_url_param(tmp_path, serve_files, archives):
    server = serve_files(served(archives))
    with pytest.raises(DownloadError, match="HTTP 404.*data.voc_url"):
        fetch(server.url("missing.tar"), tmp_path / "x.tar", "0" * 32, key="voc", progress=False, backoff=0)


def test_failed_extraction_leaves_the_previous_tree_and_no_temporaries(tmp_path, serve_files, archives):
    layout = DataLayout(tmp_path / "data")
    server = serve_files(served(archives))
    prepare_voc(layout, data_params(server, archives), progress=False, backoff=0)
    before = relative_files(layout.raw)
    broken = archives["benchmark.tgz"][: len(archives["benchmark.tgz"]) // 2]
    server.files["broken.tgz"] = broken
    params = data_params(server, archives, sbd_url=server.url("broken.tgz"), sbd_md5=md5(broken))
    with pytest.raises(ArchiveError, match="truncated or corrupt"):
        prepare_voc(layout, params, progress=False, backoff=0)
    assert relative_files(layout.raw) == before
    assert not list(layout.root.glob("raw.tmp-*"))


# ---------------------------------------------------------------------------- resuming


@pytest.mark.parametrize("range_support", [True, False], ids=["range", "no-range"])
def test_interrupted_download_resumes_on_the_next_run(tmp_path, serve_files, archives, range_support):
    data = archives["benchmark.tgz"]
    server = serve_files({"benchmark.tgz": data}, range_support=range_support)
    dest = tmp_path / "benchmark.tgz"
    cut = len(data) // 3
    server.interrupt_after = cut
    with pytest.raises(DownloadError, match="interrupted.*Run the stage again to resume"):
        fetch(server.url("benchmark.tgz"), dest, md5(data), retries=0, progress=False, backoff=0)
    part = dest.with_name("benchmark.tgz.part")
    assert part.stat().st_size == cut and not dest.exists()

    fetch(server.url("benchmark.tgz"), dest, md5(data), retries=0, progress=False, backoff=0)
    assert dest.read_bytes() == data and not part.exists()
    assert server.requests[-1] == ("benchmark.tgz", f"bytes={cut}-")
    if range_support:  # only the missing bytes travelled
        assert server.bytes_sent == len(data)
    else:  # the server ignored Range: a clean restart from byte 0
        assert server.bytes_sent == cut + len(data)


def test_dropped_connection_is_retried_within_one_run(tmp_path, serve_files, archives):
    data = archives["VOCtrainval_11-May-2012.tar"]
    server = serve_files({"voc.tar": data})
    server.interrupt_after = 1000
    dest = fetch(server.url("voc.tar"), tmp_path / "voc.tar", md5(data), retries=2, progress=False, backoff=0)
    assert dest.read_bytes() == data
    assert [r for _, r in server.requests] == [None, "bytes=1000-"]


def test_part_file_longer_than_remote_file_restarts(tmp_path, serve_files, archives):
    data = archives["train_noval.txt"]
    server = serve_files({"list.txt": data})
    dest = tmp_path / "list.txt"
    dest.with_name("list.txt.part").write_bytes(b"x" * (len(data) + 10))  # stale junk
    fetch(server.url("list.txt"), dest, md5(data), retries=1, progress=False, backoff=0)
    assert dest.read_bytes() == data


# ---------------------------------------------------------------------------- archives


def test_truncated_archives_are_clear_errors(tmp_path, archives):
    for name in ("benchmark.tgz", "VOCtrainval_11-May-2012.tar"):
        data = archives[name]
        broken = tmp_path / name
        broken.write_bytes(data[: len(data) // 2 + 100])
        with pytest.raises(ArchiveError, match=f"{name}.*truncated or corrupt"):
            extract_archive(broken, tmp_path / f"out-{name}", progress=False)


def unsafe_archive(path: Path, kind: str) -> Path:
    with tarfile.open(path, "w") as tar:
        ok = tarfile.TarInfo("dataset/fine.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        bad = tarfile.TarInfo({"absolute": "/tmp/simprop-evil.txt", "dotdot": "dataset/../../evil.txt",
                               "symlink": "dataset/link", "hardlink": "dataset/hard", "device": "dataset/dev",
                               "fifo": "dataset/fifo"}[kind])  # fmt: skip
        if kind == "symlink":
            bad.type, bad.linkname = tarfile.SYMTYPE, "../../outside"
        elif kind == "hardlink":
            bad.type, bad.linkname = tarfile.LNKTYPE, "../outside.txt"
        elif kind == "device":
            bad.type, bad.devmajor, bad.devminor = tarfile.CHRTYPE, 1, 3
        elif kind == "fifo":
            bad.type = tarfile.FIFOTYPE
        else:
            bad.size = 4
        tar.addfile(bad, io.BytesIO(b"evil") if bad.isfile() else None)
    return path


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink", "hardlink", "device", "fifo"])
def test_unsafe_archive_member_is_rejected(tmp_path, kind):
    archive = unsafe_archive(tmp_path / "evil.tar", kind)
    target = tmp_path / "work" / "raw"
    with pytest.raises(UnsafeArchiveError, match="refusing"):
        install_tree(target, lambda tmp: extract_archive(archive, tmp, progress=False))
    assert not target.exists() and not list(target.parent.glob("raw.tmp-*"))
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/simprop-evil.txt").exists()


def test_links_inside_the_tree_are_allowed(tmp_path):
    archive = tmp_path / "ok.tar"
    with tarfile.open(archive, "w") as tar:
        f = tarfile.TarInfo("dataset/a.txt")
        f.size = 1
        tar.addfile(f, io.BytesIO(b"a"))
        link = tarfile.TarInfo("dataset/sub/b.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "../a.txt"
        tar.addfile(link)
    extract_archive(archive, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "dataset" / "sub" / "b.txt").read_text() == "a"


def test_install_tree_replaces_only_on_success(tmp_path):
    target = tmp_path / "raw"
    install_tree(target, lambda tmp: (tmp / "v1").write_text("1"))
    with pytest.raises(RuntimeError):
        install_tree(target, lambda tmp: ((tmp / "v2").write_text("2"), (_ for _ in ()).throw(RuntimeError())))
    assert sorted(p.name for p in target.iterdir()) == ["v1"]
    (tmp_path / "raw.tmp-stale").mkdir()  # left by a killed run
    install_tree(target, lambda tmp: (tmp / "v3").write_text("3"))
    assert sorted(p.name for p in target.iterdir()) == ["v3"]
    assert not list(tmp_path.glob("raw.tmp-*"))


# ---------------------------------------------------------------------------- stalls and set-aside files


def test_a_trickling_server_is_given_up_on_in_bounded_time(tmp_path, serve_files, archives):
    """A server that sends a byte now and then never times a socket read out; the download
    gives each attempt data.stall_timeout_s to make progress, retries (resuming), then fails
    with a message that says what is kept."""
    data = archives["benchmark.tgz"]
    server = serve_files({"benchmark.tgz": data})
    server.trickle_interval, server.trickle_limit = 0.1, 8.0
    dest = tmp_path / "benchmark.tgz"
    started = time.monotonic()
    with pytest.raises(DownloadError) as info:
        fetch(server.url("benchmark.tgz"), dest, md5(data), key="sbd", retries=1, timeout=1.0,
              stall_timeout=1.0, progress=False, backoff=0)  # fmt: skip
    assert time.monotonic() - started < 5.0, "the stall deadline must end the download"
    message = str(info.value)
    part = dest.with_name("benchmark.tgz.part")
    assert "stalled" in message and "data.stall_timeout_s" in message and "after 2 attempts" in message
    kept = part.stat().st_size
    assert 0 < kept < len(data) and f"{kept} bytes are kept in {part}" in message
    assert [r for _, r in server.requests][1].startswith("bytes="), "the retry resumes"
    assert not dest.exists()


def test_a_silent_server_is_given_up_on_without_mentioning_a_part_file(tmp_path, serve_files, archives):
    data = archives["train_noval.txt"]
    server = serve_files({"list.txt": data})
    server.trickle_interval, server.trickle_delay, server.trickle_limit = 0.1, 8.0, 8.0  # headers, then nothing
    dest = tmp_path / "list.txt"
    started = time.monotonic()
    with pytest.raises(DownloadError) as info:
        fetch(server.url("list.txt"), dest, md5(data), key="train_noval", retries=1, timeout=60.0,
              stall_timeout=0.5, progress=False, backoff=0)  # fmt: skip
    assert time.monotonic() - started < 5.0
    message = str(info.value)
    assert "nothing was received" in message and ".part" not in message
    assert not dest.with_name("list.txt.part").exists()


def test_a_file_set_aside_for_a_wrong_md5_is_reused_once_the_md5_is_fixed(tmp_path, serve_files, archives):
    data = archives["train_noval.txt"]
    server = serve_files({"list.txt": data})
    dest = tmp_path / "list.txt"
    aside = tmp_path / "list.txt.md5-mismatch"
    with pytest.raises(ChecksumError, match="checks that file against the corrected md5"):
        fetch(server.url("list.txt"), dest, "0" * 32, key="train_noval", progress=False, backoff=0)
    assert aside.read_bytes() == data
    requests = len(server.requests)

    assert fetch(server.url("list.txt"), dest, md5(data), key="train_noval", progress=False, backoff=0) == dest
    assert dest.read_bytes() == data and not aside.exists()
    assert len(server.requests) == requests, "the corrected md5 matched the file set aside: no download"

    # a file set aside that does not match the corrected md5 either stays for inspection
    dest.unlink()
    aside.write_bytes(b"something else")
    fetch(server.url("list.txt"), dest, md5(data), key="train_noval", progress=False, backoff=0)
    assert dest.read_bytes() == data and aside.read_bytes() == b"something else"
    assert len(server.requests) == requests + 1


def test_the_stage_uses_the_stall_timeout_param(tmp_path, serve_files, archives):
    server = serve_files(served(archives))
    server.trickle_interval, server.trickle_limit = 0.05, 8.0
    layout = DataLayout(tmp_path / "data")
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"data\.stall_timeout_s = 0\.3"):
        prepare_voc(layout, data_params(server, archives, stall_timeout_s=0.3), progress=False, backoff=0)
    assert time.monotonic() - started < 6.0
    assert not layout.raw.exists()
