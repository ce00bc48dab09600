"""Latent diffusion training on the tiny fixture VAE: the loss falls (class labels and captions), the export
loads and samples at the data's size, resume is exact and refuses another VAE, bad input is named."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit.errors import CheckpointError, ConfigError
from diffusekit.io.models import load_vae, save_vae
from diffusekit.networks.vae import AutoencoderKL
from diffusekit.pipelines.loading import load_pipeline
from diffusekit.pipelines.text_to_image import TextToImage
from diffusekit.training.captions import CaptionError
from diffusekit.training.data import ArrayDataset
from diffusekit.training.export import load_for_sampling
from diffusekit.training.latent_config import LatentTrainConfig
from diffusekit.training.latent_trainer import LatentTrainer
from diffusekit.training.losses import loss_inputs, weighted_mse

pytestmark = pytest.mark.usefixtures("one_thread")


def two_patterns(n: int = 8, size: int = 16) -> tuple[np.ndarray, list[int]]:
    """Class 0: a bright left half; class 1: a bright top half (RGB, uint8)."""
    images = np.zeros((n, size, size, 3), np.uint8)
    labels = [i % 2 for i in range(n)]
    for i, y in enumerate(labels):
        if y == 0:
            images[i, :, : size // 2] = 255
        else:
            images[i, : size // 2] = 255
    return images, labels


def config(tmp_path, vae_dir, steps=3, **latent) -> LatentTrainConfig:
    return LatentTrainConfig().replace(
        model={"preset": "latent-tiny"},
        optim={"batch_size": 4, "lr": 2e-3, "warmup_steps": 0},
        run={
            "output_dir": str(tmp_path / "run"),
            "max_steps": steps,
            "device": "cpu",
            "progress": False,
            "tensorboard": False,
            "checkpoint_every": 2,
            "log_every": 1,
            "seed": 1,
        },
        latent={"vae": str(vae_dir), **latent},
    )


def fixed_loss(trainer: LatentTrainer) -> float:
    """The model's loss on fixed latents, timesteps, noise and conditioning (no dropout)."""
    g = torch.Generator().manual_seed(123)
    n = len(trainer.cache)
    idx = torch.arange(n).repeat(4)
    z0 = trainer.cache.latents(idx)
    noise = torch.randn(z0.shape, generator=g)
    t = torch.randint(0, trainer.schedule.num_train_timesteps, (len(idx),), generator=g)
    x_t, t, target, w = loss_inputs(trainer.schedule, trainer.config.diffusion, z0, noise, t, torch.zeros(len(idx)))
    cond = trainer._conditioning(idx, torch.zeros(len(idx), dtype=torch.bool))
    with torch.no_grad():
        return float(weighted_mse(trainer.model(x_t, t, **cond), target, w))


@pytest.fixture(scope="module")
def vae_dir(sd_folder):
    return sd_folder / "vae"


def test_class_conditional_training_lowers_the_loss_and_exports(tmp_path, vae_dir):
    images, labels = two_patterns()
    trainer = LatentTrainer(
        config(tmp_path, vae_dir, steps=40, conditioning="class"), dataset=ArrayDataset(images, labels)
    )
    assert trainer.mode == "class" and trainer.unet_config.in_channels == 4 and trainer.unet_config.sample_size == 8
    before = fixed_loss(trainer)
    result = trainer.fit()
    after = fixed_loss(trainer)
    assert after < 0.8 * before, (before, after)
    pipe = load_for_sampling(result.export_dir)
    out = pipe(2, steps=2, class_labels=[0, 1], show_progress=False, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 16, 16)


def test_text_training_from_scratch_lowers_the_loss_and_exports(tmp_path, vae_dir):
    for i, (image, label) in enumerate(zip(*two_patterns(), strict=True)):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(["bright left half", "bright top half"][label])
    (tmp_path / "run").mkdir()
    cfg = config(tmp_path, vae_dir, steps=40).replace(data={"source": str(tmp_path), "random_flip": False})
    trainer = LatentTrainer(cfg)
    assert trainer.mode == "text" and trainer.model.text_encoder is not None
    assert trainer.tokenizer.tokenize("bright left half")[1:-1] == ["bright</w>", "left</w>", "half</w>"]
    before = fixed_loss(trainer)
    result = trainer.fit()
    assert fixed_loss(trainer) < 0.8 * before
    sd = load_pipeline(result.export_dir)
    assert sd.tokenizer.vocab == trainer.tokenizer.vocab
    out = TextToImage(sd)(
        ["bright left half"],
        height=16,
        width=16,
        steps=2,
        guidance_scale=2.0,
        show_progress=False,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 3, 16, 16)


def test_pretrained_text_encoder_stays_frozen(tmp_path, vae_dir, sd_folder):
    images, labels = two_patterns(4)
    cfg = config(tmp_path, vae_dir, steps=2, text_encoder=str(sd_folder), class_captions=["a cat", "a dog"])
    trainer = LatentTrainer(cfg, dataset=ArrayDataset(images, labels))
    assert trainer.model.text_encoder is None and trainer.frozen_text_encoder is not None
    frozen = {k: v.clone() for k, v in trainer.frozen_text_encoder.state_dict().items()}
    assert trainer.unet_config.cross_attention_dim == trainer.frozen_text_encoder.config.hidden_size
    result = trainer.fit()
    for k, v in trainer.frozen_text_encoder.state_dict().items():
        torch.testing.assert_close(v, frozen[k], rtol=0, atol=0)
    exported = load_pipeline(result.export_dir).text_encoder.state_dict()
    for k, v in frozen.items():
        torch.testing.assert_close(exported[k], v, rtol=0, atol=0)


def test_resume_is_exact(tmp_path, vae_dir):
    images, labels = two_patterns()
    straight = LatentTrainer(config(tmp_path / "a", vae_dir, steps=4), dataset=ArrayDataset(images, labels))
    straight.fit()
    first = LatentTrainer(config(tmp_path / "b", vae_dir, steps=2), dataset=ArrayDataset(images, labels))
    first.fit()
    resumed = LatentTrainer(
        config(tmp_path / "b", vae_dir, steps=4), dataset=ArrayDataset(images, labels), resume="latest"
    )
    resumed.fit()
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_resume_after_the_vae_changed_is_refused(tmp_path, vae_dir):
    images, labels = two_patterns()
    vae = load_vae(vae_dir)
    save_vae(vae, tmp_path / "vae")
    LatentTrainer(config(tmp_path, tmp_path / "vae", steps=2), dataset=ArrayDataset(images, labels)).fit()
    with torch.no_grad():
        vae.encoder.conv_in.bias.add_(0.1)
    save_vae(vae, tmp_path / "vae")  # the checkpoint names the same folder; its weights are others now
    with pytest.raises(CheckpointError, match="latents of another VAE"):
        LatentTrainer(
            config(tmp_path, tmp_path / "vae", steps=4), dataset=ArrayDataset(images, labels), resume="latest"
        )
    save_vae(load_vae(vae_dir), tmp_path / "vae")  # the same VAE again, but other images
    with pytest.raises(CheckpointError, match="other data"):
        LatentTrainer(
            config(tmp_path, tmp_path / "vae", steps=4), dataset=ArrayDataset(255 - images, labels), resume="latest"
        )
    # a VAE of other latent channels there: refused the same way, before any U-Net is built
    save_vae(AutoencoderKL(dataclasses.replace(vae.config, latent_channels=3)), tmp_path / "vae")
    with pytest.raises(CheckpointError, match="latents of another VAE"):
        LatentTrainer(
            config(tmp_path, tmp_path / "vae", steps=4), dataset=ArrayDataset(images, labels), resume="latest"
        )


def test_bad_input_is_named(tmp_path, vae_dir):
    images, labels = two_patterns(4)
    with pytest.raises(ConfigError, match="data.channels"):
        LatentTrainer(config(tmp_path, vae_dir), dataset=ArrayDataset(images[..., 0], labels))
    with pytest.raises(ConfigError, match="latent.vae"):
        LatentTrainer(
            dataclasses.replace(
                config(tmp_path, vae_dir), latent=dataclasses.replace(config(tmp_path, vae_dir).latent, vae=None)
            ),
            dataset=ArrayDataset(images, labels),
        )
    folder = tmp_path / "captioned"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(images[i]).save(folder / f"{i}.png")
    (folder / "0.txt").write_bytes(b"caf\xe9")
    (folder / "1.txt").write_text("fine")
    cfg = config(tmp_path, vae_dir).replace(data={"source": str(folder)})
    with pytest.raises(CaptionError, match=r"0\.txt: the caption file is not UTF-8"):
        LatentTrainer(cfg)
    trainer = LatentTrainer(cfg.replace(data={"skip_bad_images": True}))
    assert trainer.texts == ["fine"] and len(trainer.cache) == 1


def test_sizes_are_named_in_image_pixels(tmp_path, vae_dir):
    images, labels = two_patterns(4, size=12)  # 6x6 latents; the 3-level U-Net needs multiples of 4, so 8 px
    with pytest.raises(
        ConfigError, match=r"data resolution 12 \(6 px latents of a 2x downsampling VAE\).* multiple of 8 \(e.g. 16\)"
    ):
        LatentTrainer(
            config(tmp_path, vae_dir).replace(model={"preset": "latent-small"}), dataset=ArrayDataset(images, labels)
        )
    folder = tmp_path / "mixed"  # images of two sizes: as for pixel training, the size must be chosen
    folder.mkdir()
    Image.fromarray(images[0]).save(folder / "a.png")
    Image.fromarray(two_patterns(1, size=16)[0][0]).save(folder / "b.png")
    with pytest.raises(ConfigError, match="different sizes.*data.resolution"):
        LatentTrainer(config(tmp_path, vae_dir).replace(data={"source": str(folder)}, latent={"caption": "x"}))
    trainer = LatentTrainer(
        config(tmp_path, vae_dir).replace(data={"source": str(folder), "resolution": 16}, latent={"caption": "x"})
    )
    assert trainer.cache.latent_shape == (4, 8, 8) and trainer.texts == ["x", "x"]


def test_posterior_mean_or_sample(tmp_path, vae_dir):
    images, labels = two_patterns(4)
    trainer = LatentTrainer(config(tmp_path, vae_dir, posterior="mean"), dataset=ArrayDataset(images, labels))
    seen = []
    real = trainer.cache.latents
    trainer.cache.latents = lambda idx, **kw: seen.append(kw["noise"]) or real(idx, **kw)
    trainer._accumulate(trainer.model, torch.arange(4), 0, last=True, amp=contextlib.nullcontext())
    assert seen == [None]
    trainer.config.latent.posterior = "sample"
    trainer._accumulate(trainer.model, torch.arange(4), 0, last=True, amp=contextlib.nullcontext())
    assert seen[1].shape == (4, 4, 8, 8)
