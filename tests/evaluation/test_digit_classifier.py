"""The small digit classifier that scores class-conditional samples: it learns real digits (a classifier
that ignores its input or its labels stays near chance), its accuracy is that of the labels it is given, and
its cache survives damage."""

from __future__ import annotations

import pytest
import torch

from diffusekit.errors import ConfigError
from diffusekit.evaluation import classifier as clf


@pytest.fixture(scope="module")
def digits():
    x, y = clf.dataset_arrays("bundled", "train", limit=1000)
    tx, ty = clf.dataset_arrays("bundled", "test", limit=1000)
    return x, y, tx, ty


@pytest.fixture(scope="module")
def model(digits):
    x, y, _, _ = digits
    return clf.train_classifier(x, y, epochs=2, batch_size=64)


def test_a_short_training_on_real_digits_recognises_held_out_digits(model, digits):
    _, _, tx, ty = digits
    assert tx.min() >= 0 and tx.max() <= 1 and tx.shape[1:] == (1, 28, 28)
    assert clf.accuracy(model, tx, ty) > 0.7  # chance is 0.1
    assert clf.accuracy(model, tx, ty.roll(1)) < 0.3  # the same images under wrong labels


def test_blank_and_noise_images_are_not_scored_as_their_labels(model):
    labels = torch.arange(200) % 10
    blank = torch.zeros(200, 1, 28, 28)
    noise = torch.rand(200, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert clf.accuracy(model, blank, labels) <= 0.11  # one predicted class for all: at most one in ten right
    assert clf.accuracy(model, noise, labels) < 0.35


def test_other_sizes_are_resized_and_wrong_shapes_refused(model, digits):
    _, _, tx, ty = digits
    big = torch.nn.functional.interpolate(tx[:200], size=(56, 56), mode="nearest")
    assert torch.equal(clf.predict(model, big), clf.predict(model, tx[:200]))
    with pytest.raises(ConfigError, match="grey images"):
        clf.predict(model, torch.zeros(2, 3, 28, 28))
    with pytest.raises(ConfigError, match="labels"):
        clf.accuracy(model, tx[:10], ty[:9])


def test_the_cache_is_reused_and_a_damaged_entry_retrained(tmp_path, monkeypatch, digits):
    x, y, tx, ty = digits
    monkeypatch.setenv("DIFFUSEKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(clf, "dataset_arrays", lambda source, split, **kw: (x, y) if split == "train" else (tx, ty))
    trained = []
    real_train = clf.train_classifier

    def counting(*a, **kw):
        trained.append(1)
        return real_train(*a, **{**kw, "batch_size": 64})

    monkeypatch.setattr(clf, "train_classifier", counting)
    m1, acc1 = clf.classifier_for("bundled")
    m2, acc2 = clf.classifier_for("bundled")
    assert len(trained) == 1 and acc1 == acc2 and 0.5 < acc1 <= 1
    assert torch.equal(clf.predict(m1, tx[:100]), clf.predict(m2, tx[:100]))
    (weights,) = (tmp_path / "classifier").glob("*.safetensors")
    weights.write_bytes(b"not a safetensors file")
    _, acc3 = clf.classifier_for("bundled")
    assert len(trained) == 2 and acc3 == acc1  # retrained (deterministic seed) and written again
