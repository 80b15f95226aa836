"""CANet's IOM in training: each training pair's last prediction is kept and fed back as the
history input the next time the pair is drawn (CaNet's train.py / dataset_mask_train.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from simprop.train.batches import IOMHistory
from simprop.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_iom_history_table_feeds_only_seen_and_drawn_pairs():
    history = IOMHistory(num_pairs=6)
    assert history.history([0, 1], [True, True], torch.device("cpu")) is None  # nothing predicted yet
    probs = torch.softmax(torch.randn(2, 2, 3, 3), dim=1)
    history.update(torch.tensor([1, 4]), probs)
    fed = history.history([1, 4, 2, 1], [True, False, True, True], torch.device("cpu"))
    assert fed.shape == (4, 2, 3, 3)
    torch.testing.assert_close(fed[0], probs[0].half().float())  # seen and drawn: its last prediction
    assert not fed[1].any()  # seen but not drawn this time: zeros
    assert not fed[2].any()  # drawn but never predicted: zeros
    torch.testing.assert_close(fed[3], fed[0])
    restored = IOMHistory(6)
    restored.load_state_dict(history.state_dict())
    torch.testing.assert_close(restored.history([4], [True], torch.device("cpu")), probs[1:2].half().float())


def trainer(data_pipeline, variant: str, iom_history_p: float, root=None, **train_params) -> Trainer:
    """A small CPU trainer on fold 0 of the shared tree; ``root`` (holding a link to the data)
    gives it its own models/ directory, for tests that write checkpoints."""
    layout, params, _ = data_pipeline
    model = dataclasses.replace(params.model, backbone_weights="none", channels=8, dropout=0.0)
    train = dataclasses.replace(params.train, image_size=33, batch_size=4, cache_backbone_features=False,
                                augment=False, iom_history_p=iom_history_p, device="cpu", **train_params)  # fmt: skip
    params = dataclasses.replace(params, model=model, train=train)
    return Trainer(params, variant, 0, root if root is not None else layout.root.parent)


def test_a_pairs_prediction_comes_back_as_its_history_the_next_time_it_is_drawn(data_pipeline):
    run = trainer(data_pipeline, "canet", iom_history_p=1.0)
    assert run.iom is not None
    pairs = [0, 3, 5, 7]
    first = run.batches.build(0, [0, 1, 2, 3], pairs, 0.0)
    assert first["query_history"] is None  # no prediction kept yet: the network sees zeros
    run._step(first)
    stored = run.iom.table[pairs].float()
    assert stored.shape == (4, 2, 5, 5)  # softmax at the feature size of a 33 px input
    torch.testing.assert_close(stored.sum(1), torch.ones(4, 5, 5), atol=2e-3, rtol=0)
    again = run.batches.build(1, [0, 1, 2, 3], pairs, 0.0)
    torch.testing.assert_close(again["query_history"], stored)
    assert run.iom.seen.sum() == 4


def test_history_is_zeros_when_never_drawn_and_absent_for_variants_without_iom(data_pipeline):
    run = trainer(data_pipeline, "canet", iom_history_p=0.0)
    batch = run.batches.build(0, [0, 1, 2, 3], [0, 1, 2, 3], 0.0)
    run._step(batch)
    again = run.batches.build(1, [0, 1, 2, 3], [0, 1, 2, 3], 0.0)
    assert not again["query_history"].any()
    assert trainer(data_pipeline, "simpropnet", iom_history_p=1.0).iom is None


def test_batch_targets_and_masks_come_from_the_labels_and_are_not_kept_without_the_feature_cache(data_pipeline):
    from simprop.data.datasets import binary_target

    run = trainer(data_pipeline, "dpr", iom_history_p=0.0)
    assert run.cache is None  # the paper setup's path: 321 px targets would be ~100 KB a pair
    pairs = [0, 1, 2, 3]
    batch = run.batches.build(0, [0, 1, 2, 3], pairs, 0.0)
    for row, pair in enumerate(pairs):
        query, cls = run.pairs[pair]
        torch.testing.assert_close(batch["query_labels"][row], binary_target(run.store.input_label(query), cls))
    support_targets = batch["support_labels"][:, 0]
    assert set(support_targets.unique().tolist()) <= {0, 1, 255}
    torch.testing.assert_close(batch["support_masks"][:, 0], (support_targets == 1).float())
    assert batch["support_masks"].dtype == torch.float32 and batch["query_labels"].dtype == torch.long
    assert run.batches._targets == {}


@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_the_projection_steps_at_train_projection_lr_scale_times_the_rate_of_the_rest(data_pipeline, tmp_path, scale):
    layout, params, _ = data_pipeline
    (tmp_path / params.data.root).symlink_to(layout.root)  # own models/ dir: the shared tree stays untouched
    run = trainer(data_pipeline, "canet", iom_history_p=params.train.iom_history_p, root=tmp_path, lr=0.5, momentum=0.0,
                  weight_decay=0.0, projection_lr_scale=scale, epochs=1, iterations_per_epoch=1)  # fmt: skip
    projection = {id(p) for p in run.model.projection.parameters()}
    groups = run.optimizer.param_groups
    assert len(groups) == (1 if scale == 1.0 else 2)  # scale 1: one group, the optimizer state as before
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in run.model.trainable_parameters()}
    before = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    grads = {}
    step = run._step

    def step_and_keep_grads(batch):
        loss = step(batch)
        grads.update({n: p.grad.detach().clone() for n, p in run.model.named_parameters() if p.grad is not None})
        return loss

    run._step = step_and_keep_grads
    run.run()  # one epoch of one step, through the trainer's own learning-rate assignment
    moved = [float((p.detach() - before[n]).abs().max()) for n, p in run.model.named_parameters() if id(p) in projection]
    assert min(moved) > 1e-5  # the projection did get a step, far above the tolerance below
    for name, p in run.model.named_parameters():
        if name in grads:  # plain SGD (no momentum, no decay): p_new = p_old - rate * grad
            rate = 0.5 * (scale if id(p) in projection else 1.0)
            torch.testing.assert_close(p.detach(), before[name] - rate * grads[name], rtol=0, atol=1e-7, msg=name)
