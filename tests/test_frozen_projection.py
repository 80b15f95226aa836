"""train.projection_lr_scale = 0: the encoder conv stays at its seeded initialisation, and the
trainer feeds the network the conv's cached outputs instead of running it on every batch."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from simprop.model.network import build_model
from simprop.train.optim import parameter_groups
from simprop.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_scale_zero_takes_the_projection_out_of_the_optimizer():
    from simprop.params import ModelParams

    model = build_model("dpr", ModelParams(backbone_weights="none", channels=8), init_seed=0)
    groups = parameter_groups(model, 0.0)
    projection = {id(p) for p in model.projection.parameters()}
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert len(groups) == 1 and not in_groups & projection  # no weight decay on it either
    assert in_groups == {id(p) for p in model.trainable_parameters()} - projection
    assert not any(p.requires_grad for p in model.projection.parameters())
    counts = model.parameter_counts()
    assert counts["trainable"] == sum(p.numel() for g in groups for p in g["params"])


@pytest.fixture
def cached_root(feature_cache_tree):
    params, root, _ = feature_cache_tree(
        model={"channels": 8, "dropout": 0.5},
        train={"image_size": 33, "batch_size": 4, "augment": False, "device": "cpu", "projection_lr_scale": 0.0,
               "lr": 0.05},  # fmt: skip
    )
    return params, root


def _train_steps(trainer: Trainer, steps: int) -> list[float]:
    torch.manual_seed(123)  # the projection's Dropout2d draws from the global generator
    trainer.model.train()
    losses = []
    for i in range(steps):
        pairs = [(4 * i + j) % len(trainer.pairs) for j in range(4)]
        losses.append(trainer._step(trainer.batches.build(0, [4 * i + j for j in range(4)], pairs, 0.5)))
    return losses


@pytest.mark.parametrize("variant", ["simpropnet", "canet"])  # ICA's gray features; the IOM's history
def test_cached_encoder_outputs_train_exactly_like_the_conv_they_replace(cached_root, variant):
    params, root = cached_root
    fast = Trainer(params, variant, 0, root)
    assert fast.encoded is not None and (fast.encoded.gray is not None) == (variant == "simpropnet")
    batch = fast.batches.build(0, [0, 1, 2, 3], [0, 1, 2, 3], 0.5)
    assert "query_encoded" in batch and "query_feats" not in batch
    slow = Trainer(params, variant, 0, root)
    slow.encoded = slow.batches.encoded = None  # the backbone features through the (frozen) conv on every step
    assert "query_feats" in slow.batches.build(0, [0, 1, 2, 3], [0, 1, 2, 3], 0.5)
    projection = {n: p.detach().clone() for n, p in fast.model.projection.named_parameters()}

    fast_losses, slow_losses = _train_steps(fast, 4), _train_steps(slow, 4)

    # same dropout channels, same ICA and IOM inputs: the same losses and weights up to float order
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(slow_losses), rtol=0, atol=1e-5)
    assert len(set(fast_losses)) == 4  # the head did learn: the losses are not one repeated value
    for (name, a), b in zip(fast.model.named_parameters(), slow.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)
    for name, p in fast.model.projection.named_parameters():
        assert torch.equal(p, projection[name]), f"frozen projection {name} moved"
    assert not any(p.grad is not None for p in fast.model.projection.parameters())


def test_without_the_feature_cache_a_frozen_projection_runs_the_conv(cached_root):
    params, root = cached_root
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, cache_backbone_features=False))
    trainer = Trainer(params, "dpr", 0, root)
    assert trainer.encoded is None and trainer.cache is None
    before = {n: p.detach().clone() for n, p in trainer.model.projection.named_parameters()}
    _train_steps(trainer, 2)
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.projection.named_parameters())


def test_validation_reads_the_cached_encoder_outputs_and_scores_like_the_conv(cached_root):
    """Trainer.validate hands its EpisodeRunner the precomputed encoder outputs of a frozen
    projection: every validation then runs no 1536-channel conv, and scores what the conv gives."""
    from simprop.engine.inference import EpisodeRunner

    params, root = cached_root
    trainer = Trainer(params, "fbaf", 0, root)
    _train_steps(trainer, 3)
    trainer.model.eval()
    episodes = trainer.val_episodes
    kwargs = dict(batch_size=params.evaluate.batch_size, cache=trainer.cache)
    read = EpisodeRunner(trainer.model, trainer.store, trainer.device, encoded=trainer.encoded, **kwargs)
    conv = EpisodeRunner(trainer.model, trainer.store, trainer.device, **kwargs)
    ids = sorted({e.query for e in episodes} | {s for e in episodes for s in e.supports})
    torch.testing.assert_close(read.features(ids), conv.features(ids), rtol=0, atol=2e-3)  # both rounded to fp16
    assert read.evaluate(episodes).miou() == pytest.approx(conv.evaluate(episodes).miou(), abs=1e-3)
    calls = []
    original = trainer.model.encode
    trainer.model.encode = lambda x: calls.append(x.shape) or original(x)
    try:
        assert trainer.validate() == pytest.approx(conv.evaluate(episodes).miou() * 100, abs=0.1)
    finally:
        trainer.model.encode = original
    assert not calls, "validation ran the encoder conv although its outputs were cached"
