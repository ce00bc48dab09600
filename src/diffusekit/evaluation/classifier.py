"""A small convolutional classifier of 28x28 grey images, for scoring class-conditional samples.

FID says how close the distribution of samples is to the data; it does not say whether the image drawn for
"class 7" shows a 7. The classification accuracy of generated samples under a classifier trained on real
data (the "classification accuracy score" idea of Ravuri & Vinyals 2019, used the other way round as in
conditional-GAN evaluations) does. The network is LeNet-like (LeCun et al. 1998): three 3x3 convolutions, two
of stride 2, and two linear layers, trained with AdamW on cross-entropy; on MNIST two epochs reach ~99% test
accuracy, on Fashion-MNIST ~90% (the data's own ceiling for so small a network).

Trained weights are cached in the user cache folder (``classifier/``), keyed by the dataset, its size and
the training settings, so a benchmark pays for the training once per machine.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusekit.errors import ConfigError, DiffusekitError
from diffusekit.io.atomic import write_text_atomic
from diffusekit.io.weights import load_weights, save_weights
from diffusekit.user_cache import cache_root

SIDE = 28
ARCHITECTURE = "lenet3x3-v1"  # part of the cache key: change it when the network changes


class DigitClassifier(nn.Module):
    """(N, 1, 28, 28) images in [0, 1] -> (N, num_classes) logits."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),  # 14x14
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),  # 7x7
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Dropout(0.25),
                                  nn.Linear(128, num_classes))  # fmt: skip

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(2 * images - 1))


def _check_images(images: Tensor) -> Tensor:
    if images.ndim != 4 or images.shape[1] != 1:
        raise ConfigError(f"the digit classifier takes (N, 1, H, W) grey images, got shape {tuple(images.shape)}")
    if images.shape[-2:] != (SIDE, SIDE):
        images = F.interpolate(images.float(), size=(SIDE, SIDE), mode="area")
    return images.float().clamp(0, 1)


def train_classifier(images: Tensor, labels: Tensor, *, epochs: int = 2, batch_size: int = 128,
                     lr: float = 2e-3, seed: int = 0) -> DigitClassifier:  # fmt: skip
    """Train on ``images`` (N, 1, 28, 28) in [0, 1] with integer ``labels`` (N,); returns the model in eval mode.
    The learning rate decays linearly to zero over the run."""
    images, labels = _check_images(images), labels.long()
    if len(images) != len(labels) or len(images) == 0:
        raise ConfigError(f"train_classifier: {len(images)} images and {len(labels)} labels")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier(int(labels.max()) + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    total = epochs * ((len(images) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / total)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=g)
        for i in range(0, len(images), batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def predict(model: DigitClassifier, images: Tensor, *, batch_size: int = 500) -> Tensor:
    """Predicted class of each image (N, 1, H, W) in [0, 1]; other sizes are resized to 28x28 (area)."""
    images = _check_images(images)
    return torch.cat([model(images[i : i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])


def accuracy(model: DigitClassifier, images: Tensor, labels: Tensor | Sequence[int]) -> float:
    """Fraction of ``images`` the classifier assigns to ``labels``."""
    labels = torch.as_tensor(labels).long()
    if len(labels) != len(images):
        raise ConfigError(f"accuracy: {len(images)} images and {len(labels)} labels")
    return float((predict(model, images) == labels).float().mean())


def dataset_arrays(
    source: str, split: str, *, data_root: str | None = None, limit: int | None = None
) -> tuple[Tensor, Tensor]:
    """All images (N, 1, 28, 28) in [0, 1] and labels of a labelled grey 28x28 dataset (``bundled``, ``mnist``,
    ``fashion-mnist``, or anything :func:`training.data.load_dataset` reads); ``limit``: the first N only."""
    from diffusekit.training.data import DataSpec, from_model_range, load_dataset

    ds = load_dataset(DataSpec(source=source, split=split, data_root=data_root, limit=limit))
    if ds.num_classes == 0:
        raise ConfigError(f"the digit classifier needs class labels; {source!r} ({split}) has none")
    if ds.channels != 1:
        raise ConfigError(f"the digit classifier takes grey images; {source!r} has {ds.channels} channels")
    x, y = ds.batch(range(len(ds)))
    return _check_images(from_model_range(x)), y


def classifier_for(source: str, *, epochs: int = 2, seed: int = 0, data_root: str | None = None,
                   cache: bool = True) -> tuple[DigitClassifier, float]:  # fmt: skip
    """The classifier of a dataset, trained on its train split (cached), and its accuracy on the test split."""
    x, y = dataset_arrays(source, "train", data_root=data_root)
    digest = hashlib.sha256(x[:: max(1, len(x) // 256)].numpy().tobytes()).hexdigest()[:16]
    key = f"{ARCHITECTURE}-{Path(source).name}-{len(x)}-e{epochs}-s{seed}-{digest}"
    path = cache_root() / "classifier" / f"{key}.safetensors"
    if cache and path.is_file():
        try:
            tensors = load_weights(path)
            meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
            model = DigitClassifier(int(meta["num_classes"]))
            model.load_state_dict(tensors)
            return model.eval(), float(meta["test_accuracy"])
        except (DiffusekitError, OSError, ValueError, KeyError, RuntimeError):
            pass  # a damaged cache entry is retrained and replaced
    model = train_classifier(x, y, epochs=epochs, seed=seed)
    tx, ty = dataset_arrays(source, "test", data_root=data_root)
    test_accuracy = accuracy(model, tx, ty)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_weights(model.state_dict(), path)
        meta = {"num_classes": int(y.max()) + 1, "test_accuracy": test_accuracy, "train_images": len(x)}
        write_text_atomic(path.with_suffix(".json"), json.dumps(meta))
    return model, test_accuracy
