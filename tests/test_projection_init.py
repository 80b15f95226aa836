"""train.projection_init = "pca": the encoder conv starts as a whitened +/- view of the training
features' leading principal components (simprop.model.pca.pca_projection_init)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from simprop.errors import ParamsError
from simprop.model.encoder import FeatureProjection
from simprop.model.pca import feature_moments, pca_projection_init
from simprop.params import TrainParams
from simprop.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _known_features(rows: int = 4000, channels: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Features with a non-zero mean and two principal directions of standard deviation 3 and 2
    (plus noise of 0.01): the answer the initialisation must find."""
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(channels, channels, generator=g, dtype=torch.float64))
    d1, d2 = basis[:, 0], basis[:, 1]
    coeffs = torch.randn(rows, 2, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(coeffs - coeffs.mean(0))  # centred, uncorrelated, unit variance in the sample
    coeffs = q * (rows - 1) ** 0.5
    mean = torch.linspace(0.2, 1.0, channels, dtype=torch.float64)
    noise = 0.01 * torch.randn(rows, channels, generator=g, dtype=torch.float64)
    x = mean + 3.0 * coeffs[:, :1] * d1 + 2.0 * coeffs[:, 1:] * d2 + noise
    return x.float(), torch.stack([d1, d2])


def _signed(direction: torch.Tensor) -> torch.Tensor:
    return direction * torch.sign(direction[direction.abs().argmax()])


def test_pca_init_reads_the_leading_components_whitened_as_plus_minus_pairs():
    x, directions = _known_features()
    projection = FeatureProjection(in_channels=12, out_channels=5, dilation=2)
    pca_projection_init(projection, *feature_moments([x[:1000], x[1000:2500], x[2500:]]))
    conv = projection[0]
    centre = conv.weight[:, :, 1, 1].detach().double()
    expected = torch.stack([
        _signed(directions[0]) / 3, -_signed(directions[0]) / 3,
        _signed(directions[1]) / 2, -_signed(directions[1]) / 2,
    ])  # fmt: skip
    torch.testing.assert_close(centre[:4], expected, atol=2e-3, rtol=0)
    assert centre[4].norm() > 10 * centre[:4].norm(dim=1).max()  # third component: only noise of 0.01, whitened
    off_centre = conv.weight.detach().clone()
    off_centre[:, :, 1, 1] = 0
    assert not off_centre.any()  # the eight other taps start at zero
    # every unit's pre-activation on the sample: mean 0, standard deviation 1
    pre = x @ conv.weight[:, :, 1, 1].detach().T + conv.bias.detach()
    torch.testing.assert_close(pre.mean(0), torch.zeros(5), atol=1e-4, rtol=0)
    torch.testing.assert_close(pre.std(0), torch.ones(5), atol=1e-3, rtol=0)
    # the conv itself (zero padding aside) computes that on a map of these features
    fmap = x[:81].T.reshape(1, 12, 9, 9)
    out = conv(fmap)[0, :, 4, 4]  # the centre pixel: no padding in its receptive field
    torch.testing.assert_close(out, pre[40], atol=1e-4, rtol=0)


def test_pca_init_is_deterministic_whatever_the_global_random_state():
    x, _ = _known_features()
    weights = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        projection = FeatureProjection(in_channels=12, out_channels=4)
        pca_projection_init(projection, *feature_moments([x]))
        weights.append((projection[0].weight.detach().clone(), projection[0].bias.detach().clone()))
    assert torch.equal(weights[0][0], weights[1][0]) and torch.equal(weights[0][1], weights[1][1])


def test_feature_moments_accumulated_by_chunks_equal_the_whole_sample():
    x, _ = _known_features()
    mean, covariance = feature_moments(x[i : i + 700] for i in range(0, len(x), 700))
    torch.testing.assert_close(mean, x.double().mean(0), atol=1e-12, rtol=0)
    torch.testing.assert_close(covariance, torch.cov(x.double().T), atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="two feature vectors"):
        feature_moments([x[:1]])


def test_projection_init_is_validated():
    with pytest.raises(ParamsError, match="projection_init"):
        TrainParams(projection_init="xavier").validate("train")


@pytest.mark.parametrize("cached", [True, False])  # the feature cache, or the backbone on the images
def test_trainer_starts_from_the_pca_view_of_its_folds_training_features(feature_cache_tree, cached):
    params, root, _ = feature_cache_tree(
        model={"channels": 8},
        train={"image_size": 33, "batch_size": 4, "augment": False, "device": "cpu", "projection_init": "pca"},
    )
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, cache_backbone_features=cached))
    trainer = Trainer(params, "canet", 0, root)
    assert (trainer.cache is not None) == cached
    conv = trainer.model.projection[0]
    sample = torch.cat(list(trainer._feature_rows()))
    assert sample.shape[1] == conv.weight.shape[1]
    # thinned by a stride over all the images' pixels, whatever the chunks
    thinned = torch.cat(list(trainer._feature_rows(pixels=len(sample) // 3, chunk_size=5)))
    assert torch.equal(thinned, sample[:: -(-len(sample) // (len(sample) // 3))])
    pre = sample @ conv.weight[:, :, 1, 1].detach().T + conv.bias.detach()
    torch.testing.assert_close(pre.mean(0), torch.zeros(8), atol=1e-3, rtol=0)
    torch.testing.assert_close(pre.std(0), torch.ones(8), atol=1e-2, rtol=0)
    # the default keeps nn.Conv2d's seeded initialisation
    default = dataclasses.replace(params, train=dataclasses.replace(params.train, projection_init="default"))
    assert Trainer(default, "canet", 0, root).model.projection[0].weight[:, :, 0, 0].abs().sum() > 0


def test_the_trainings_of_a_fold_share_its_pca_and_encoded_features_and_train_the_same(feature_cache_tree):
    """The train stage trains a fold's variants in turn in one process, computing the PCA
    initialisation and the frozen projection's outputs once (FoldShared): each training must
    start and run exactly as it does on its own."""
    from simprop.train.shared import FoldShared

    params, root, _ = feature_cache_tree(
        model={"channels": 8},
        train={"image_size": 33, "batch_size": 4, "augment": False, "device": "cpu", "projection_init": "pca",
               "projection_lr_scale": 0.0, "epochs": 1, "iterations_per_epoch": 2, "val_every": 1},  # fmt: skip
    )
    shared = FoldShared(gray=True)
    calls = []
    original = shared.memo

    def counting_memo(key, compute):
        calls.append(key)
        return original(key, compute)

    shared.memo = counting_memo
    computed = []
    for variant in ("canet", "simpropnet"):  # simpropnet reads the channel-averaged (ICA) maps too
        alone = Trainer(params, variant, 0, root)
        with_shared = Trainer(params, variant, 0, root, shared=shared)
        for a, b in zip(alone.model.projection.parameters(), with_shared.model.projection.parameters()):
            assert torch.equal(a, b)
        assert torch.equal(alone.encoded.color, with_shared.encoded.color)
        if variant == "simpropnet":
            assert torch.equal(alone.encoded.gray, with_shared.encoded.gray)
        computed.append(with_shared.encoded)
        batch_alone = alone.batches.build(0, [0, 1, 2, 3], [0, 1, 2, 3], 0.0)
        batch_shared = with_shared.batches.build(0, [0, 1, 2, 3], [0, 1, 2, 3], 0.0)
        torch.manual_seed(0)
        loss_alone = alone._step(batch_alone)
        torch.manual_seed(0)
        assert with_shared._step(batch_shared) == loss_alone
    assert computed[0] is computed[1], "the second variant reuses the first one's encoded features"
    assert len(calls) == 2 and calls[0] == calls[1], "one key for the fold's PCA, asked for by both"
    # encoded features of another projection are never handed out
    other = Trainer(params, "canet", 0, root)
    with torch.no_grad():
        other.model.projection[0].bias.add_(1.0)
    assert shared.encoded(other.model.projection, other.cache, other.device, gray=False) is not computed[0]


def test_the_replicates_of_a_fold_train_as_they_would_alone(feature_cache_tree):
    """Issue 26: the train stage trains a fold's training seeds (``train.seeds``) in turn in one
    process, sharing what they compute alike (FoldShared): each replicate starts, draws its samples
    and steps exactly as a lone training of its seed, and two seeds are two different trainings."""
    from simprop.train.batches import dropout_seed, epoch_order
    from simprop.train.shared import FoldShared

    params, root, _ = feature_cache_tree(
        model={"channels": 8},
        train={"image_size": 33, "batch_size": 4, "augment": False, "device": "cpu", "projection_init": "pca",
               "projection_lr_scale": 0.0, "epochs": 1, "iterations_per_epoch": 2, "val_every": 1,
               "seeds": (0, 1)},  # fmt: skip
    )
    shared = FoldShared(gray=True)
    first = {}
    for seed in params.train.seeds:
        replicate = params.for_seed(seed)
        alone = Trainer(replicate, "simpropnet", 0, root)
        together = Trainer(replicate, "simpropnet", 0, root, shared=shared)
        assert together.paths.best.parent.name == f"seed{seed}"
        assert together.checkpoints.identity.train_seed == seed
        for (name, a), b in zip(alone.model.state_dict().items(), together.model.state_dict().values()):
            assert torch.equal(a, b), name
        assert torch.equal(alone.encoded.color, together.encoded.color)
        pairs = [int(i) for i in epoch_order(seed, 0, len(alone.pairs), 4)]
        batch_alone = alone.batches.build(0, [0, 1, 2, 3], pairs, 0.25)
        batch_together = together.batches.build(0, [0, 1, 2, 3], pairs, 0.25)
        for key, value in batch_alone.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, batch_together[key]), key
        torch.manual_seed(dropout_seed(seed, 0, 0))
        loss_alone = alone._step(batch_alone)
        torch.manual_seed(dropout_seed(seed, 0, 0))
        assert together._step(batch_together) == loss_alone
        first[seed] = (together.model.decoder.classifier.weight.detach().clone(), pairs, loss_alone)
    # another seed: another initialisation, another sample order, another first loss
    assert not torch.equal(first[0][0], first[1][0])
    assert first[0][1] != first[1][1] and first[0][2] != first[1][2]
