"""Backbone weight loading (local file, clear failures) and checkpoints (atomic, guarded)."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from simprop.errors import BackboneWeightsError, CheckpointError
from simprop.model import encoder as encoder_module
from simprop.model.checkpoint import load_checkpoint, save_checkpoint
from simprop.model.encoder import build_backbone
from simprop.model.network import build_model
from simprop.params import ModelParams

NARROW = 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory) -> Path:
    torch.manual_seed(123)
    state = torchvision.models.resnet50(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    torch.save(state, path)
    return path


def test_backbone_weights_from_a_local_file(resnet_file):
    backbone = build_backbone(str(resnet_file))
    state = torch.load(resnet_file, weights_only=True)
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert "fc.weight" in state and "layer4.0.conv1.weight" in state  # unused layers are ignored
    assert backbone.checksum() != build_backbone("none").checksum()


def test_backbone_computes_what_torchvision_resnet50_computes(resnet_file):
    """simprop.model.resnet re-declares ResNet-50 (to spare every stage torchvision's import):
    same keys and shapes as torchvision's trunk, and the same layer2 / dilated layer3 output."""
    net = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, False])
    for block in net.layer3:  # CANet / DeepLab: every block of layer3 dilated
        block.conv2.dilation, block.conv2.padding = (2, 2), (2, 2)
    net.load_state_dict(torch.load(resnet_file, weights_only=True))
    net.eval()
    ours = build_backbone(str(resnet_file))
    theirs = {k: v.shape for k, v in net.state_dict().items() if k.split(".")[0] in ("conv1", "bn1", "layer1", "layer2", "layer3")}
    assert {k: v.shape for k, v in ours.state_dict().items()} == theirs
    images = torch.randn(2, 3, 65, 65, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
        f2 = net.layer2(net.layer1(x))
        expected = torch.cat([f2, net.layer3(f2)], dim=1)
        got = ours(images)
    assert got.shape == (2, 1536, 9, 9)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_random_backbone_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    a = build_backbone("none", seed=1)
    got = torch.rand(3)
    assert torch.equal(got, expected)
    assert a.checksum() == build_backbone("none", seed=1).checksum()
    assert a.checksum() != build_backbone("none", seed=2).checksum()


def test_backbone_file_errors_name_the_file(tmp_path, resnet_file):
    with pytest.raises(BackboneWeightsError, match="no such file"):
        build_backbone(str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(BackboneWeightsError, match="bad.pth"):
        build_backbone(str(bad))
    partial = {k: v for k, v in torch.load(resnet_file, weights_only=True).items() if not k.startswith("layer3")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(BackboneWeightsError, match=r"partial\.pth.*missing keys"):
        build_backbone(str(tmp_path / "partial.pth"))
    resnet18 = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(resnet18, tmp_path / "r18.pth")
    with pytest.raises(BackboneWeightsError, match="not a torchvision ResNet-50"):
        build_backbone(str(tmp_path / "r18.pth"))


def test_imagenet_unreachable_fails_clearly(tmp_path, monkeypatch):
    """No random fallback: an error that names the param and says how to give a local file."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache: torchvision must download

    def unreachable(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    with pytest.raises(BackboneWeightsError) as info:
        build_model("canet", ModelParams(backbone_weights="imagenet"))
    message = str(info.value)
    assert "model.backbone_weights" in message
    assert "path" in message and "none" in message
    assert str(tmp_path) in message  # where torchvision's cache would be


def _offline() -> bool:
    try:
        socket.getaddrinfo("download.pytorch.org", 443)
        return False
    except OSError:
        return True


@pytest.mark.skipif(not _offline(), reason="has internet: the real download would succeed (100 MB)")
def test_imagenet_real_download_fails_clearly_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(encoder_module, "DOWNLOAD_TIMEOUT_S", 3.0)
    with pytest.raises(BackboneWeightsError, match="model.backbone_weights=imagenet"):
        build_backbone("imagenet")


def _small_model(variant="simpropnet", **kw):
    torch.manual_seed(0)
    return build_model(variant, ModelParams(channels=NARROW, **kw))


def test_checkpoint_round_trip(tmp_path):
    model = _small_model(iom_iterations=1)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.01)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1, momentum=0.9)
    path = save_checkpoint(
        tmp_path / "models" / "best.pt", model, epoch=3, val_miou=np.float64(41.5), optimizer=opt.state_dict(), image_size=321
    )
    assert path.is_file() and not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    payload = torch.load(path, weights_only=True)
    assert not any(k.startswith("backbone.") for k in payload["state_dict"])  # frozen weights not stored
    loaded, meta = load_checkpoint(path, variant="simpropnet")
    assert meta["epoch"] == 3 and meta["val_miou"] == 41.5 and meta["image_size"] == 321
    assert "state" in meta["optimizer"]
    assert not loaded.training and loaded.params == model.params
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    q, s, m = torch.randn(1, 3, 33, 33), torch.randn(1, 1, 3, 33, 33), torch.ones(1, 1, 33, 33)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(q, s, m)["query"], model(q, s, m)["query"])


def test_checkpoint_from_a_weights_file(tmp_path, resnet_file):
    model = build_model("canet", ModelParams(channels=NARROW, backbone_weights=str(resnet_file)))
    save_checkpoint(tmp_path / "c.pt", model)
    loaded, _ = load_checkpoint(tmp_path / "c.pt", expected_variant="canet")
    assert loaded.backbone.checksum() == model.backbone.checksum()


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    model = _small_model()
    path = tmp_path / "last.pt"
    save_checkpoint(path, model, epoch=1)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # killed while writing

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, epoch=2)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]  # no temp file left behind


def test_checkpoint_errors_are_clear(tmp_path):
    model = _small_model("dpr")
    path = save_checkpoint(tmp_path / "best.pt", model, epoch=1)

    with pytest.raises(CheckpointError, match=r"missing\.pt does not exist"):
        load_checkpoint(tmp_path / "missing.pt")

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pt is corrupt or truncated"):
        load_checkpoint(truncated)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(garbage)

    foreign = tmp_path / "foreign.pt"
    torch.save(model.state_dict(), foreign)
    with pytest.raises(CheckpointError, match=r"foreign\.pt is not a simprop checkpoint"):
        load_checkpoint(foreign)

    with pytest.raises(CheckpointError, match=r"holds a 'dpr' model, expected a 'fbaf' model: variant 'dpr' != expected 'fbaf'"):
        load_checkpoint(path, variant="fbaf")
    with pytest.raises(CheckpointError, match="expected 'canet'"):
        load_checkpoint(path, expected_variant="canet")

    payload = torch.load(path, weights_only=True)
    payload["model_params"]["backbone_seed"] = 99  # a different random backbone
    torch.save(payload, tmp_path / "other_backbone.pt")
    with pytest.raises(CheckpointError, match=r"other_backbone\.pt: the backbone .* differs"):
        load_checkpoint(tmp_path / "other_backbone.pt")


# --------------------------------------------------------------------------- identity and safe loading

from simprop.model.checkpoint import (  # noqa: E402  # noqa: E402
    CheckpointIdentity,
    UnsafeCheckpointError,
    load_training_state,
    save_training_state,
    splits_digest,
)

IDENTITY = CheckpointIdentity(variant="canet", fold=1, protocol="oslsm", backbone_sha256="ab" * 32, splits_sha256="cd" * 32,
                              train_seed=0)  # fmt: skip


def test_a_checkpoint_of_another_fold_names_the_file_what_it_holds_and_what_was_expected(tmp_path):
    model = _small_model("canet")
    path = save_checkpoint(tmp_path / "fold0" / "best.pt", model, identity=IDENTITY, epoch=1, image_size=33)
    _, meta = load_checkpoint(path, expected=IDENTITY)
    assert meta["identity"] == IDENTITY.to_dict()
    expected = dataclasses.replace(IDENTITY, fold=0)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, expected=expected)
    message = str(info.value)
    assert str(path) in message
    assert "holds a 'canet' model of fold 1, training seed 0 (protocol oslsm" in message
    assert "expected a 'canet' model of fold 0" in message
    assert "1 aeroplane" in message  # fold 0's test classes, seen by a fold-1 model in training
    assert "(dvc repro train, or python3 stages/train.py --variant canet --fold 0)" in message


@pytest.mark.parametrize(
    "field, value, phrase",
    [
        ("protocol", "pfenet", "protocol 'oslsm' != expected 'pfenet'"),
        ("backbone_sha256", "ef" * 32, "frozen backbone 'abababababab' != expected 'efefefefefef'"),
        ("splits_sha256", "01" * 32, "fold's split lists"),
        ("variant", "dpr", "variant 'canet' != expected 'dpr'"),
        ("train_seed", 2, "training seed 0 != expected 2"),  # another replicate of the same (variant, fold)
    ],
)
def test_every_part_of_the_identity_is_checked(tmp_path, field, value, phrase):
    path = save_checkpoint(tmp_path / "best.pt", _small_model("canet"), identity=IDENTITY, image_size=33)
    with pytest.raises(CheckpointError, match=re.escape(phrase)):
        load_checkpoint(path, expected=dataclasses.replace(IDENTITY, **{field: value}))


def test_a_checkpoint_without_identity_cannot_pass_for_a_fold(tmp_path):
    path = save_checkpoint(tmp_path / "best.pt", _small_model("canet"), image_size=33)
    load_checkpoint(path, variant="canet")  # the variant is always recorded
    with pytest.raises(CheckpointError, match=r"best\.pt records no training identity"):
        load_checkpoint(path, expected=CheckpointIdentity(variant="canet", fold=0))


def test_splits_digest_covers_the_lists_training_read(tmp_path):
    fold = tmp_path / "data" / "splits" / "fold2"
    fold.mkdir(parents=True)
    (fold / "train.csv").write_text("image,class\na,6\n")
    (fold / "val.csv").write_text("image,class\nb,11\n")
    (fold / "test.csv").write_text("image,class\nc,11\n")
    first = splits_digest(tmp_path / "data", 2)
    (fold / "test.csv").write_text("image,class\nd,12\n")  # never read by training
    assert splits_digest(tmp_path / "data", 2) == first
    (fold / "val.csv").write_text("image,class\nb,11\nc,12\n")
    assert splits_digest(tmp_path / "data", 2) != first
    with pytest.raises(CheckpointError, match=r"fold3/train\.csv: cannot read .* `dvc repro splits`"):
        splits_digest(tmp_path / "data", 3)


class _RunsCode:
    """A pickle that, when unpickled without ``weights_only``, creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["best.pt", "last.pt"])
def test_a_crafted_pickle_is_refused_and_nothing_in_it_runs(tmp_path, name):
    marker = tmp_path / "code-ran"
    path = tmp_path / "models" / "canet" / "fold0" / name
    path.parent.mkdir(parents=True)
    real = _small_model("canet")
    torch.save({"format": "simprop-checkpoint", "state_dict": real.trainable_state_dict(), "hook": _RunsCode(marker)}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        if name == "best.pt":
            load_checkpoint(path, variant="canet")
        else:
            load_training_state(path, CheckpointIdentity(variant="canet", fold=0))
    message = str(info.value)
    assert str(path) in message and "is not a safe checkpoint" in message
    assert "system" in message and "Nothing in it was run" in message
    assert not marker.exists()


def test_training_state_is_plain_and_loads_with_weights_only(tmp_path):
    model = _small_model("dpr")
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1, momentum=0.9)
    loss = model(torch.randn(2, 3, 33, 33), torch.randn(2, 1, 3, 33, 33), torch.ones(2, 1, 33, 33))["query"].mean()
    loss.backward()
    opt.step()
    history = {"loss": [(0, np.float32(0.7))], "val": [(1, np.float64(41.5))], "best_val_miou": np.float64(41.5),
               "best_epoch": 1, "resumed_from": None}  # fmt: skip
    identity = dataclasses.replace(IDENTITY, variant="dpr", fold=0)
    path = save_training_state(tmp_path / "last.pt", identity=identity, fingerprint="f" * 16, epoch=0,
                               model_state=model.trainable_state_dict(), optimizer_state=opt.state_dict(),
                               history=history, run_id="0123abcd",
                               iom_history={"table": torch.zeros(3, 2, 4, 4, dtype=torch.float16),
                                            "seen": torch.zeros(3, dtype=torch.bool)})  # fmt: skip
    raw = torch.load(path, weights_only=True)  # tensors and plain containers only
    assert raw["run_id"] == "0123abcd" and raw["history"]["val"] == [(1, 41.5)]
    assert raw["iom_history"]["table"].shape == (3, 2, 4, 4)  # extra state to resume travels too
    state = load_training_state(path, CheckpointIdentity(variant="dpr", fold=0))
    assert state["fingerprint"] == "f" * 16 and "momentum_buffer" in next(iter(state["optimizer"]["state"].values()))
    with pytest.raises(CheckpointError, match=r"last\.pt holds a 'dpr' model of fold 0, .* expected a 'dpr' model of fold 2"):
        load_training_state(path, CheckpointIdentity(variant="dpr", fold=2))
    torch.save({"epoch": 3, "fingerprint": "old"}, tmp_path / "old.pt")  # an older simprop's last.pt
    assert load_training_state(tmp_path / "old.pt", CheckpointIdentity(variant="dpr", fold=0)) is None


def test_a_truncated_last_pt_is_moved_aside_loudly_not_replaced(tmp_path, capsys):
    """Issue 28: an unreadable last.pt used to be ignored with a line on stdout and overwritten by
    the next epoch.  Now it is renamed to last.pt.corrupt (.1, ... when taken), a warning on
    stderr names both paths, and the training starts from scratch."""
    from simprop.layout import RunLayout
    from simprop.model.checkpoint import CheckpointIdentity
    from simprop.train.checkpointing import TrainingCheckpoints

    layout = RunLayout(tmp_path, "dpr", 0, 0)
    layout.model_dir.mkdir(parents=True)
    checkpoints = TrainingCheckpoints(layout, CheckpointIdentity(variant="dpr", fold=0), "fingerprint", epochs=3)
    for attempt, aside in enumerate(["last.pt.corrupt", "last.pt.corrupt.1"]):
        layout.last.write_bytes(b"PK\x03\x04 truncated zip " + bytes([attempt]))
        epoch, history = checkpoints.resume(model=None, optimizer=None, iom=None)
        assert (epoch, history["best_epoch"]) == (0, -1)  # from scratch
        assert not layout.last.exists() and (layout.model_dir / aside).read_bytes().endswith(bytes([attempt]))
        err = capsys.readouterr().err
        assert f"{layout.last} is corrupt or truncated" in err and str(layout.model_dir / aside) in err
        assert "weights_only" not in err
