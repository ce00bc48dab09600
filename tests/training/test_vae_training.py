"""Autoencoder training: the loss terms against closed forms, presets, the scaling factor and the exported
folder, and the training run itself (loss goes down, bit-exact resume)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from training_checks import assert_same_checkpoint, kill_and_resume, quiet_env, runner_script  # tests/training

from diffusekit.errors import ConfigError
from diffusekit.io.models import load_vae
from diffusekit.io.weights import load_weights
from diffusekit.networks.vae import AutoencoderKL, DiagonalGaussian
from diffusekit.training.data import ArrayDataset
from diffusekit.training.monitor import read_metrics
from diffusekit.training.vae_adversarial import (
    ADAPTIVE_DELTA,
    PatchDiscriminator,
    adaptive_weight,
    discriminator_hinge_loss,
    generator_loss,
)
from diffusekit.training.vae_export import export_vae, latent_std, scaling_factor_from_std, scaling_subset
from diffusekit.training.vae_losses import reconstruction_loss, vae_loss
from diffusekit.training.vae_presets import build_vae_config
from diffusekit.training.vae_train_config import VAETrainConfig
from diffusekit.training.vae_trainer import VAETrainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def blob_images(n: int = 24, size: int = 8, seed: int = 0) -> np.ndarray:
    """(n, size, size) uint8 images: a bright square at a random place on a dark background."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, (n, size, size), dtype=np.uint8)
    for img in images:
        y, x = rng.integers(0, size - 3, 2)
        img[y : y + 3, x : x + 3] = 230
    return images


# ----------------------------------------------------------------------------------------------- losses
def test_kl_of_a_known_gaussian_matches_the_direct_computation():
    torch.manual_seed(0)
    mean, logvar = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4) * 0.5
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    q = torch.distributions.Normal(mean.double(), logvar.double().mul(0.5).exp())
    p = torch.distributions.Normal(torch.zeros(()).double(), torch.ones(()).double())
    direct = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3))  # (3,)
    torch.testing.assert_close(posterior.kl().double(), direct, rtol=1e-5, atol=1e-6)
    # by hand: N(1, 1) against N(0, 1) is 1/2 per element; N(0, e^2) is (e^2 - 1 - 2) / 2
    one = DiagonalGaussian(torch.cat([torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)], dim=1))
    assert one.kl().item() == pytest.approx(4 * 0.5)
    wide = DiagonalGaussian(torch.cat([torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), 2.0)], dim=1))
    assert wide.kl().item() == pytest.approx((math.e**2 - 1 - 2) / 2, rel=1e-6)


def test_vae_loss_is_the_per_pixel_reconstruction_plus_the_weighted_summed_kl():
    x = torch.zeros(2, 1, 2, 2)
    x_hat = torch.tensor([[1.0, -1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]]).view(2, 1, 2, 2)
    assert reconstruction_loss(x_hat, x, "l1").tolist() == [0.5, 0.5]  # (1 + 1) / 4, 2 / 4
    assert reconstruction_loss(x_hat, x, "l2").tolist() == [0.5, 1.0]  # (1 + 1) / 4, 4 / 4
    with pytest.raises(ConfigError, match="loss.reconstruction"):
        reconstruction_loss(x_hat, x, "l3")
    posterior = DiagonalGaussian(torch.cat([torch.ones(2, 1, 1, 1), torch.zeros(2, 1, 1, 1)], dim=1))  # KL 1/2
    loss, rec, kl = vae_loss(x_hat, x, posterior, kind="l2", kl_weight=0.1)
    assert rec.item() == pytest.approx(0.75)
    assert kl.item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx(0.75 + 0.1 * 0.5 / 4)  # the KL summed over z, divided by C*H*W = 4


def test_hinge_losses_and_the_adaptive_weight():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])
    # real: max(0, 1-2) = 0, max(0, 1-0) = 1 -> 0.5; fake: max(0, 1-2) = 0, max(0, 1+0.5) = 1.5 -> 0.75
    assert discriminator_hinge_loss(real, fake).item() == pytest.approx(0.5 * (0.5 + 0.75))
    assert generator_loss(fake).item() == pytest.approx(0.75)
    w = torch.randn(3, 4, requires_grad=True)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    rec, gan = (w * a).sum(), (w * b).sum()  # gradients a and b with respect to w
    lam = adaptive_weight(rec, gan, w)
    assert lam.item() == pytest.approx(a.norm().item() / (b.norm().item() + ADAPTIVE_DELTA), rel=1e-5)
    assert not lam.requires_grad
    rec.backward()  # the graph was kept for the real backward pass
    torch.testing.assert_close(w.grad, a)


def test_patch_discriminator_scores_patches():
    d = PatchDiscriminator(1, channels=8, layers=2, norm_groups=4)
    out = d(torch.randn(2, 1, 28, 28))  # 28 -> 14 -> 7 -> 6 (stride 1) -> 5
    assert out.shape == (2, 1, 5, 5)
    # GroupNorm, not BatchNorm: an image's score does not depend on the rest of its batch
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(d(x)[:1], d(x[:1]))


# ----------------------------------------------------------------------------------------------- presets
def test_presets_give_the_factor_and_latent_channels_asked_for():
    c = build_vae_config("mnist-f4", {}, channels=1, resolution=28)
    assert (c.downsample_factor, c.latent_channels, c.in_channels, c.out_channels) == (4, 4, 1, 1)
    assert c.sample_size == 28 and c.scaling_factor == 1.0
    z = AutoencoderKL(c).encode(torch.zeros(1, 1, 28, 28)).mean
    assert z.shape == (1, 4, 7, 7)
    c8 = build_vae_config("kl-f8", {}, channels=3, resolution=256)
    assert (c8.downsample_factor, c8.latent_channels) == (8, 4)
    more = build_vae_config("mnist-f4", {}, channels=1, resolution=32, downsample_factor=8, latent_channels=2)
    assert (more.channels, more.latent_channels) == ((32, 64, 64, 64), 2)
    fewer = build_vae_config("mnist-f4", {"layers_per_block": 2}, channels=3, resolution=28, downsample_factor=2)
    assert (fewer.channels, fewer.layers_per_block) == ((32, 64), 2)


def test_a_resolution_not_a_multiple_of_the_factor_names_the_option():
    with pytest.raises(ConfigError, match=r"data.resolution .*multiple of 8.*\(e\.g\. 32\)"):
        build_vae_config("kl-f8", {}, channels=3, resolution=28)
    with pytest.raises(ConfigError, match="vae.downsample_factor must be a power of two"):
        build_vae_config("mnist-f4", {}, channels=1, resolution=28, downsample_factor=3)
    with pytest.raises(ConfigError, match="vae.preset='nope' is not known; allowed: .*mnist-f4"):
        build_vae_config("nope", {}, channels=1, resolution=28)


# ----------------------------------------------------------------------------------------------- export
def test_exported_folder_loads_back_with_a_scaling_factor_that_whitens_the_latents(tmp_path):
    data = ArrayDataset(blob_images(40))
    torch.manual_seed(0)
    vae = AutoencoderKL(build_vae_config("test-tiny", {}, channels=1, resolution=8))
    std = latent_std(vae, data, examples=40)
    factor = scaling_factor_from_std(std)
    folder = export_vae(vae, tmp_path / "vae", factor)
    loaded = load_vae(folder)
    assert loaded.config.scaling_factor == pytest.approx(factor)
    for k, v in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k  # the weights round-trip exactly
    # on the data: scaled posterior samples of the loaded VAE have unit standard deviation
    x, _ = data.batch(list(range(len(data))))
    with torch.no_grad():
        z = loaded.encode(x).sample(generator=torch.Generator().manual_seed(1))
    assert float(z.std()) * loaded.config.scaling_factor == pytest.approx(1.0, abs=0.1)
    assert sorted(scaling_subset(40, 100)) == list(range(40))  # a smaller dataset is used whole
    assert scaling_subset(1000, 5) == scaling_subset(1000, 5)  # the subset is fixed


def test_constant_latents_have_no_scaling_factor():
    with pytest.raises(ConfigError, match="standard deviation is 0.0"):
        scaling_factor_from_std(0.0)


# ----------------------------------------------------------------------------------------------- training
def tiny_trainer(tmp_path, n: int = 32, **sections) -> VAETrainer:
    run = {"output_dir": str(tmp_path / "run"), "max_steps": 30, "checkpoint_every": 100, "log_every": 5,
           "progress": False, "tensorboard": False, "device": "cpu", **sections.pop("run", {})}  # fmt: skip
    config = VAETrainConfig().replace(
        vae={"preset": "test-tiny", "scaling_examples": n},
        optim={"batch_size": 8, "warmup_steps": 0, "lr": 3e-3},
        run=run,
        **sections,
    )
    return VAETrainer(config, dataset=ArrayDataset(blob_images(n)))


def test_a_few_steps_lower_the_reconstruction_loss(tmp_path):
    trainer = tiny_trainer(tmp_path)
    x = trainer.preview_images(32)
    before = reconstruction_loss(trainer.reconstruct(x, use_ema=False), x, "l1").mean().item()
    result = trainer.fit()
    after = reconstruction_loss(trainer.reconstruct(x, use_ema=False), x, "l1").mean().item()
    assert result.step == 30 and result.export_dir == tmp_path / "run" / "vae"
    assert after < 0.6 * before, (before, after)  # measured: ~1.0 -> ~0.25 in 30 steps
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["rec_loss"] < records[0]["rec_loss"] and records[-1]["kl"] > 0  # the terms are logged
    std, factor = trainer.last_scaling
    assert factor == pytest.approx(1 / std) and load_vae(result.export_dir).config.scaling_factor == pytest.approx(
        factor
    )
    # the export holds the EMA weights
    exported = load_vae(result.export_dir).state_dict()
    for k, v in trainer.ema.vae.state_dict().items():
        assert torch.equal(exported[k], v.float()), k


def test_the_discriminator_trains_only_after_its_start_and_only_on_its_own_loss(tmp_path):
    trainer = tiny_trainer(
        tmp_path,
        loss={"adversarial": True, "adversarial_start": 3, "discriminator_layers": 1, "discriminator_channels": 8},
        run={"max_steps": 2},
    )
    d0 = {k: v.clone() for k, v in trainer.model.discriminator.state_dict().items()}
    plain = tiny_trainer(tmp_path / "plain").model.vae.state_dict()  # the same initial autoencoder as without
    assert all(torch.equal(v, plain[k]) for k, v in trainer.model.vae.state_dict().items())
    trainer.fit()
    for k, v in trainer.model.discriminator.state_dict().items():
        assert torch.equal(v, d0[k]), f"{k} moved before the adversarial start"
    # one micro-batch after the start: the generator term reaches the autoencoder, the hinge term the
    # discriminator; with the discriminator's loss removed, its weights get no gradient at all
    model = trainer.model
    x = trainer.preview_images(8)
    out = model(x, None, reconstruction="l1", kl_weight=1e-6, adversarial_weight=0.5)
    assert out["adaptive"].item() > 0
    (out["total"] - out["disc"]).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.discriminator.parameters())
    assert model.vae.decoder.conv_out.weight.grad.abs().sum() > 0


def test_sigkill_and_resume_is_bit_identical(tmp_path):
    """Posterior noise, flips, the adversarial start (step 3) and the discriminator's state all resume exactly."""
    np.savez(tmp_path / "d.npz", images=blob_images(20))
    common = ["train-vae", str(tmp_path / "d.npz"), "--preset", "test-tiny", "--batch-size", "5", "--lr", "1e-3",
              "--warmup-steps", "2", "--random-flip", "--adversarial", "--adversarial-start-steps", "3",
              "--discriminator-layers", "1", "--scaling-examples", "20", "--steps", "7",
              "--checkpoint-every-steps", "2", "--keep-checkpoints", "10", "--log-every-steps", "1", "--no-progress",
              "--no-tensorboard", "--device", "cpu"]  # fmt: skip
    runner = runner_script("train_vae", "vae_trainer.VAETrainer")
    full, cut = kill_and_resume(tmp_path, common, runner, kill_after=5, checkpoints=["step-00000002", "step-00000004"])
    a, b = full / "checkpoints" / "step-00000007", cut / "checkpoints" / "step-00000007"
    assert_same_checkpoint(a, b)
    assert any(k.startswith("discriminator.") for k in load_weights(a / "model.safetensors"))
    va, vb = (load_weights(p / "vae" / "diffusion_pytorch_model.safetensors") for p in (full, cut))
    assert va.keys() == vb.keys() and all(torch.equal(va[k], vb[k]) for k in va)
    ca, cb = (json.loads((p / "vae" / "config.json").read_text()) for p in (full, cut))
    assert ca["scaling_factor"] == cb["scaling_factor"]
    keys = ("step", "loss", "grad_norm", "rec_loss", "kl", "gan_loss", "disc_loss", "adaptive_weight")
    ma = [tuple(r[k] for k in keys) for r in read_metrics(full / "metrics.jsonl")]
    mb = [tuple(r[k] for k in keys) for r in read_metrics(cut / "metrics.jsonl")]
    assert ma == mb and len(ma) == 7
    assert [r[-1] > 0 for r in ma] == [False] * 3 + [True] * 4  # the adaptive weight from step 3 (0-based) on


def test_two_processes_see_what_one_process_sees(tmp_path):
    """DDP (2 gloo CPU processes, batch 4 each) against one process with batch 8: the posterior noise, flips
    and data are sliced from one global draw, so the loss of the first step (the same initial weights) agrees to
    float rounding, and the adversarial variant (autograd.grad inside the forward, the discriminator under DDP)
    runs; the data positions agree exactly."""
    import socket

    np.savez(tmp_path / "d.npz", images=blob_images(16))
    common = ["train-vae", str(tmp_path / "d.npz"), "--preset", "test-tiny", "--random-flip", "--adversarial",
              "--adversarial-start-steps", "1", "--discriminator-layers", "1", "--steps", "2",
              "--log-every-steps", "1", "--mixed-precision", "no", "--no-progress", "--no-tensorboard",
              "--device", "cpu", "--scaling-examples", "8"]  # fmt: skip
    env = quiet_env()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    one = subprocess.Popen([sys.executable, "-m", "diffusekit", *common, "--batch-size", "8", "--output-dir",
                            str(tmp_path / "one")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)  # fmt: skip
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "diffusekit", *common,
                          "--batch-size", "4", "--output-dir", str(tmp_path / "two")], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    _, err = one.communicate(timeout=300)
    assert one.returncode == 0, err
    ra, rb = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("one", "two"))
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [1, 2]
    assert rb[0]["loss"] == pytest.approx(ra[0]["loss"], rel=1e-5)
    sa, sb = (json.loads((tmp_path / n / "checkpoints" / "step-00000002" / "state.json").read_text()) for n in
              ("one", "two"))  # fmt: skip
    assert sa["data_position"] == sb["data_position"] == 16 and sb["world_size"] == 2
    assert (tmp_path / "two" / "vae" / "config.json").is_file()
