"""`simprop segment`: the Python API, the CLI and every bad input named in issue 5.

An untrained model (random backbone) is enough: these tests check the plumbing - reading,
resizing, k-shot, batching, output files, errors - not segmentation quality.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simprop.cli import main
from simprop.model.checkpoint import save_checkpoint
from simprop.model.network import build_model
from simprop.params import ModelParams
from simprop.segment.api import segment
from simprop.segment.inputs import SegmentError, read_mask

IMAGE_SIZE = 65


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    torch.manual_seed(0)
    model = build_model("simpropnet", ModelParams(backbone_weights="none", backbone_seed=0))
    save_checkpoint(path, model, epoch=0, image_size=IMAGE_SIZE)
    return path


def _image(path: Path, w: int, h: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _mask(path: Path, w: int, h: int, value: int = 255, mode: str = "L") -> Path:
    m = np.zeros((h, w), dtype=np.uint8)
    m[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = value
    img = Image.fromarray(m, mode="L")
    if mode == "P":
        img = img.convert("P")
        img.putpalette([0, 0, 0, 128, 0, 0] + [200] * (254 * 3))
    img.save(path)
    return path


@pytest.fixture()
def inputs(tmp_path: Path) -> dict:
    d = tmp_path / "in"
    d.mkdir()
    queries = d / "queries"
    queries.mkdir()
    return {
        "supports": [
            (_image(d / "s1.jpg", 64, 48, 1), _mask(d / "s1.png", 64, 48)),
            (_image(d / "s2.png", 80, 60, 2), _mask(d / "s2_mask.png", 80, 60, value=1)),
        ],
        "queries": [_image(queries / "q1.jpg", 80, 60, 3), _image(queries / "q2.png", 64, 48, 4),
                    _image(queries / "q3.jpg", 50, 70, 5)],  # fmt: skip
        "folder": queries,
        "out": tmp_path / "out",
        "dir": d,
    }


def _run(checkpoint, inputs, **kw):
    args = dict(supports=inputs["supports"], queries=inputs["folder"], out_dir=inputs["out"], device="cpu",
                batch_size=2, progress=False)  # fmt: skip
    args.update(kw)
    return segment(checkpoint, **args)


# --------------------------------------------------------------------------- API


def test_api_writes_a_mask_and_an_overlay_per_query_at_its_size(checkpoint, inputs):
    results = _run(checkpoint, inputs)
    assert [r.query.name for r in results] == ["q1.jpg", "q2.png", "q3.jpg"]
    for r, (w, h) in zip(results, [(80, 60), (64, 48), (50, 70)]):
        mask = np.asarray(Image.open(r.mask))
        overlay = Image.open(r.overlay)
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
        assert overlay.size == (w, h) and overlay.mode == "RGB"
        assert (r.width, r.height) == (w, h)
        assert r.foreground_fraction == pytest.approx((mask == 255).mean())
    names = sorted(p.name for p in inputs["out"].iterdir())
    assert names == sorted(f"q{i}_{kind}.png" for i in (1, 2, 3) for kind in ("mask", "overlay"))


def test_api_is_deterministic_and_batch_size_does_not_matter(checkpoint, inputs, tmp_path):
    one = _run(checkpoint, inputs, batch_size=1, out_dir=tmp_path / "a")
    three = _run(checkpoint, inputs, batch_size=3, out_dir=tmp_path / "b")
    for a, b in zip(one, three):
        assert np.array_equal(np.asarray(Image.open(a.mask)), np.asarray(Image.open(b.mask)))


def test_single_query_path_one_shot_and_foreground_value(checkpoint, inputs):
    results = _run(checkpoint, inputs, supports=inputs["supports"][:1], queries=inputs["queries"][0],
                   foreground_value=1)  # fmt: skip
    assert len(results) == 1
    assert set(np.unique(np.asarray(Image.open(results[0].mask)))) <= {0, 1}


def test_voc_index_mask_needs_class_id(tmp_path, checkpoint, inputs):
    label = np.zeros((48, 64), dtype=np.uint8)
    label[5:30, 5:30] = 15  # person
    label[30:45, 40:60] = 12  # dog
    label[4, :] = 255  # void border
    voc = Image.fromarray(label, mode="L").convert("P")
    voc.putpalette(list(range(256)) * 3)
    path = tmp_path / "voc.png"
    voc.save(path)
    with pytest.raises(SegmentError, match="--class-id"):
        read_mask(path)
    person = read_mask(path, class_id=15)
    assert person.sum() == 25 * 25 and person[4].sum() == 0
    image = inputs["supports"][0][0]
    results = _run(checkpoint, inputs, supports=[(image, path)], class_id=12)
    assert len(results) == 3
    with pytest.raises(SegmentError, match="no class 7 pixels"):
        _run(checkpoint, inputs, supports=[(image, path)], class_id=7)


def test_binary_masks_in_all_accepted_encodings(tmp_path):
    for value, mode in [(255, "L"), (1, "L"), (1, "P"), (255, "P")]:
        path = _mask(tmp_path / f"m{value}{mode}.png", 20, 10, value=value, mode=mode)
        mask = read_mask(path)
        assert mask.dtype == np.uint8 and mask.sum() == 10 * 5, (value, mode)
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.stack([np.asarray(Image.open(tmp_path / "m255L.png"))] * 3, -1)).save(rgb)
    assert read_mask(rgb).sum() == 50


# --------------------------------------------------------------------------- CLI


def test_cli_segments_a_folder(checkpoint, inputs, capsys):
    (s1, m1), (s2, m2) = inputs["supports"]
    rc = main(["segment", "--checkpoint", str(checkpoint), "--support", str(s1), str(m1), "--support", str(s2),
               str(m2), "--query", str(inputs["folder"]), "--out", str(inputs["out"]), "--device", "cpu",
               "--variant", "simpropnet", "--quiet"])  # fmt: skip
    assert rc == 0
    assert "q1_mask.png" in capsys.readouterr().out
    assert len(list(inputs["out"].glob("*_overlay.png"))) == 3


def test_cli_reports_bad_input_without_traceback(checkpoint, inputs, capsys):
    (s1, _), _ = inputs["supports"]
    empty = _mask(inputs["dir"] / "empty.png", 64, 48, value=0)
    rc = main(["segment", "--checkpoint", str(checkpoint), "--support", str(s1), str(empty), "--query",
               str(inputs["queries"][0]), "--out", str(inputs["out"]), "--quiet"])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "empty.png" in err and "no foreground pixels" in err
    assert not inputs["out"].exists()


def test_params_subcommand_still_works(capsys):
    root = Path(__file__).resolve().parents[1]
    assert main(["params", "--params", str(root / "params.yaml")]) == 0
    assert "analysis.variant = simpropnet" in capsys.readouterr().out


# --------------------------------------------------------------------------- bad inputs


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists() or list(out.iterdir()) == []


def test_empty_support_mask(checkpoint, inputs):
    (s1, _), _ = inputs["supports"]
    empty = _mask(inputs["dir"] / "empty.png", 64, 48, value=0)
    with pytest.raises(SegmentError, match=r"empty\.png.*no foreground"):
        _run(checkpoint, inputs, supports=[(s1, empty)])
    _assert_nothing_written(inputs["out"])


def test_image_and_mask_of_different_sizes(checkpoint, inputs):
    (s1, _), (_, m2) = inputs["supports"]
    with pytest.raises(SegmentError, match=r"s2_mask\.png: the mask is 80x60 but its image .*s1\.jpg is 64x48"):
        _run(checkpoint, inputs, supports=[(s1, m2)])
    _assert_nothing_written(inputs["out"])


@pytest.mark.parametrize("which", ["support_image", "support_mask", "query"])
def test_unreadable_file(checkpoint, inputs, which):
    bad = inputs["dir"] / "broken.png"
    bad.write_bytes(b"this is not a PNG")
    (s1, m1), _ = inputs["supports"]
    kw = {
        "support_image": dict(supports=[(bad, m1)]),
        "support_mask": dict(supports=[(s1, bad)]),
        "query": dict(queries=[inputs["queries"][0], bad]),
    }[which]
    with pytest.raises(SegmentError, match=r"broken\.png: cannot read"):
        _run(checkpoint, inputs, **kw)
    _assert_nothing_written(inputs["out"])


def test_missing_files(checkpoint, inputs, tmp_path):
    with pytest.raises(SegmentError, match="nope.jpg: query image or folder not found"):
        _run(checkpoint, inputs, queries=[tmp_path / "nope.jpg"])
    with pytest.raises(SegmentError, match=r"missing\.pt: checkpoint not found"):
        _run(tmp_path / "missing.pt", inputs)
    _assert_nothing_written(inputs["out"])


def test_checkpoint_of_another_variant(checkpoint, inputs):
    with pytest.raises(SegmentError, match="holds a 'simpropnet' model, expected a 'canet' model"):
        _run(checkpoint, inputs, variant="canet")
    _assert_nothing_written(inputs["out"])


def test_corrupt_checkpoint(checkpoint, inputs, tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(checkpoint.read_bytes()[:5000])
    with pytest.raises(SegmentError, match="corrupt.pt is corrupt or truncated"):
        _run(corrupt, inputs)
    _assert_nothing_written(inputs["out"])


def test_queries_with_the_same_name_would_overwrite_each_other(checkpoint, inputs, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    dup = _image(other / "q1.png", 30, 30, 9)
    with pytest.raises(SegmentError, match="share the name 'q1'"):
        _run(checkpoint, inputs, queries=[inputs["folder"], dup])


def test_failure_mid_batch_leaves_the_output_folder_as_it_was(checkpoint, inputs, monkeypatch):
    out = inputs["out"]
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    import simprop.segment.api as seg

    calls = {"n": 0}
    real = seg.predict_masks

    def fail_on_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated out-of-memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(seg, "predict_masks", fail_on_second_batch)
    with pytest.raises(RuntimeError, match="simulated"):
        _run(checkpoint, inputs, batch_size=2)
    assert sorted(os.listdir(out)) == ["keep.txt"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_asking_for_a_gpu_without_one_is_a_clear_error(checkpoint, inputs):
    with pytest.raises(SegmentError, match="no CUDA GPU is available here; use --device cpu"):
        _run(checkpoint, inputs, device="cuda")
    _assert_nothing_written(inputs["out"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_gives_the_cpu_masks(checkpoint, inputs, tmp_path):
    cpu = _run(checkpoint, inputs, out_dir=tmp_path / "cpu")
    gpu = _run(checkpoint, inputs, out_dir=tmp_path / "gpu", device="cuda")
    for a, b in zip(cpu, gpu):
        agree = (np.asarray(Image.open(a.mask)) == np.asarray(Image.open(b.mask))).mean()
        assert agree > 0.99


# --------------------------------------------------------------------------- identity, --out, decoding order


@pytest.fixture(scope="module")
def fold0_checkpoint(tmp_path_factory) -> Path:
    from simprop.model.checkpoint import CheckpointIdentity

    path = tmp_path_factory.mktemp("ckpt_fold0") / "best.pt"
    torch.manual_seed(0)
    model = build_model("simpropnet", ModelParams(backbone_weights="none", backbone_seed=0))
    identity = CheckpointIdentity(variant="simpropnet", fold=0, protocol="oslsm",
                                  backbone_sha256=model.backbone.checksum(), splits_sha256="0" * 64)  # fmt: skip
    save_checkpoint(path, model, identity=identity, epoch=0, image_size=IMAGE_SIZE)
    return path


def _cli(checkpoint, inputs, *extra):
    (s1, m1), _ = inputs["supports"]
    return main(["segment", "--checkpoint", str(checkpoint), "--support", str(s1), str(m1), "--query",
                 str(inputs["folder"]), "--device", "cpu", "--quiet", *extra])  # fmt: skip


def test_the_held_out_classes_of_the_checkpoint_are_shown(fold0_checkpoint, checkpoint, inputs, capsys, tmp_path):
    assert _cli(fold0_checkpoint, inputs, "--out", str(inputs["out"]), "--fold", "0") == 0
    out = capsys.readouterr().out
    assert "simpropnet trained on PASCAL-5i fold 0, oslsm protocol" in out
    assert "held out of its training" in out and "1 aeroplane, 2 bicycle, 3 bird, 4 boat, 5 bottle" in out
    assert _cli(checkpoint, inputs, "--out", str(tmp_path / "o2")) == 0  # written without an identity
    assert "records no PASCAL-5i fold" in capsys.readouterr().out


def test_a_checkpoint_of_another_fold_is_refused(fold0_checkpoint, inputs, capsys):
    assert _cli(fold0_checkpoint, inputs, "--out", str(inputs["out"]), "--fold", "2") == 2
    err = capsys.readouterr().err
    assert str(fold0_checkpoint) in err and "holds a 'simpropnet' model of fold 0" in err and "expected a model of fold 2: fold 0 != expected 2" in err
    _assert_nothing_written(inputs["out"])


def _out_problems(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    a_file = tmp_path / "a_file.png"
    a_file.write_bytes(b"not a folder")
    return {
        "existing file": (a_file, "is an existing file, not a folder"),
        "below a file": (a_file / "out", "is a file, not a folder"),
        "name too long": (tmp_path / ("x" * 300) / "out", "impossible path"),
    }


@pytest.mark.parametrize("problem", ["existing file", "below a file", "name too long"])
def test_out_problems_exit_2_with_a_message(checkpoint, inputs, capsys, tmp_path, problem):
    out, phrase = _out_problems(tmp_path)[problem]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert _cli(checkpoint, inputs, "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("simprop segment: error: --out ") and phrase in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_read_only_out_folder_exits_2(checkpoint, inputs, capsys, tmp_path):
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
    elif os.path.isdir("/proc/sys") and not os.access("/proc/sys", os.W_OK):
        locked = Path("/proc/sys")  # root writes anywhere but on a read-only mount (containers)
    else:
        pytest.skip("running as root without a read-only folder to try")
    try:
        assert _cli(checkpoint, inputs, "--out", str(locked)) == 2
        assert "the folder is not writable" in capsys.readouterr().err
        assert _cli(checkpoint, inputs, "--out", str(locked / "new")) == 2
        assert f"cannot be created because {locked} is not writable" in capsys.readouterr().err
    finally:
        if locked.is_relative_to(tmp_path):
            locked.chmod(0o755)


def test_the_checkpoint_and_supports_are_checked_before_any_query_is_decoded(checkpoint, inputs, monkeypatch, tmp_path):
    import simprop.segment.api as seg

    queries = {Path(p) for p in inputs["queries"]}
    decoded = []
    real = seg.read_image

    def counting(path):
        if Path(path) in queries:
            decoded.append(Path(path))
        return real(path)

    monkeypatch.setattr(seg, "read_image", counting)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(checkpoint.read_bytes()[:5000])
    with pytest.raises(SegmentError, match="corrupt"):
        _run(corrupt, inputs)
    (s1, _), _ = inputs["supports"]
    empty = _mask(inputs["dir"] / "empty.png", 64, 48, value=0)
    with pytest.raises(SegmentError, match="no foreground"):
        _run(checkpoint, inputs, supports=[(s1, empty)])
    assert decoded == []


def test_queries_are_decoded_one_batch_at_a_time(checkpoint, inputs, monkeypatch):
    import simprop.segment.api as seg

    for i in range(4, 8):
        _image(inputs["folder"] / f"q{i}.png", 40, 30, i)
    events = []
    real_read, real_predict = seg.read_image, seg.predict_masks

    def read(path):
        if Path(path).parent == inputs["folder"]:
            events.append("decode")
        return real_read(path)

    def predict(*args, **kwargs):
        events.append("predict")
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(seg, "read_image", read)
    monkeypatch.setattr(seg, "predict_masks", predict)
    results = _run(checkpoint, inputs, batch_size=3)
    assert len(results) == 7
    assert "".join("d" if e == "decode" else "P" for e in events) == "dddPdddPdP"


def test_a_full_disk_is_one_error_and_leaves_no_empty_out_folder(checkpoint, inputs, tmp_path):
    """Issue 28: ``segment`` left an empty --out folder behind after a disk-full failure."""
    from test_disk_full import full_tmpfs

    with full_tmpfs(tmp_path / "disk", size_kb=128, leave_kb=4) as disk:
        out = disk / "new" / "out"
        with pytest.raises(SegmentError, match=r"--out .*out: no space left on its file system .* MB free"):
            _run(checkpoint, inputs, out_dir=out)
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # new/out/ and its staging are gone


# --------------------------------------------------------------------------- precision (--amp, issue 29)


def test_amp_auto_runs_bf16_only_where_it_is_native_and_bf16_masks_agree(checkpoint, inputs, tmp_path, monkeypatch):
    """``--amp auto`` on a CPU without native bf16 is float32 (the same masks); forced bf16
    autocast (true, what auto picks on an avx512_bf16 / AMX CPU) agrees with float32 on >= 98 % of pixels."""
    from simprop.infra import device as device_module

    fp32 = _run(checkpoint, inputs, out_dir=tmp_path / "fp32")
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: False)
    auto = _run(checkpoint, inputs, out_dir=tmp_path / "auto", amp="auto")
    for a, b in zip(fp32, auto):
        assert np.array_equal(np.asarray(Image.open(a.mask)), np.asarray(Image.open(b.mask)))
    bf16 = _run(checkpoint, inputs, out_dir=tmp_path / "bf16", amp=True)
    for a, b in zip(fp32, bf16):
        assert (np.asarray(Image.open(a.mask)) == np.asarray(Image.open(b.mask))).mean() >= 0.98


def test_a_bad_amp_value_is_a_clear_error(checkpoint, inputs, capsys):
    with pytest.raises(SegmentError, match="amp 'fast': use false, true or auto"):
        _run(checkpoint, inputs, amp="fast")
    _assert_nothing_written(inputs["out"])
    (s1, m1), _ = inputs["supports"]
    rc = main(["segment", "--checkpoint", str(checkpoint), "--support", str(s1), str(m1), "--query",
               str(inputs["queries"][0]), "--out", str(inputs["out"]), "--device", "cpu", "--amp", "auto", "--quiet"])  # fmt: skip
    assert rc == 0
