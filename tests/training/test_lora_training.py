"""LoRA fine-tuning (training.lora_*): a few steps on the tiny fixture pipelines lower the loss measured on fixed
draws, only the adapters change, checkpoints hold the adapters alone and resume bit for bit, gradient
checkpointing leaves the gradients as they were, the written file round-trips through both adapter layouts and
makes the images of the trained adapters, and bad input names its option."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit.errors import ConfigError
from diffusekit.io.lora import read_lora, resolve, save_lora
from diffusekit.io.weights import load_weights
from diffusekit.networks import lora as netlora
from diffusekit.pipelines import lora as pipelora
from diffusekit.pipelines.loading import load_pipeline
from diffusekit.pipelines.text_to_image import TextToImage
from diffusekit.training.captions import CaptionError
from diffusekit.training.checkpoint import list_checkpoints
from diffusekit.training.lora_adapters import LoraNetwork, plan_targets, unet_targets
from diffusekit.training.lora_config import LoraTrainConfig
from diffusekit.training.lora_data import crop_corner
from diffusekit.training.lora_trainer import LoraTrainer
from diffusekit.training.losses import noisy_inputs, weighted_mse
from diffusekit.training.resume import CHECKPOINTS_DIR

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sdxl_folder(fixtures_dir: Path) -> Path:
    return fixtures_dir / "pipelines" / "stable_diffusion_xl"


def _images(folder: Path, n: int = 4, captions: bool = True) -> Path:
    """n 32x32 RGB images (left half dark or light, one bright channel), each with a caption file."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = np.full((32, 32, 3), 30, np.uint8)
        a[:, :16] = 220 if i % 2 else 30
        a[..., i % 3] = 200
        Image.fromarray(a).save(folder / f"img{i}.png")
        if captions:
            (folder / f"img{i}.txt").write_text(f"a picture number {i}\n", encoding="utf-8")
    return folder


def _config(model: Path, folder: Path, tmp: Path, **sections: dict) -> LoraTrainConfig:
    d = {
        "lora": {"model": str(model), "output": str(tmp / "out.safetensors"), "rank": 4},
        "data": {"source": str(folder), "resolution": 32},
        "optim": {"lr": 1e-2, "batch_size": 2},
        "run": {"output_dir": str(tmp / "run"), "max_steps": 8, "log_every": 2, "checkpoint_every": 4,
                "progress": False, "tensorboard": False, "mixed_precision": "no"},
    }  # fmt: skip
    for name, values in sections.items():
        d[name] = {**d.get(name, {}), **values}
    return LoraTrainConfig.from_dict(d)


def _fixed_loss(trainer: LoraTrainer, draws: int = 4) -> float:
    """The training loss of every image at ``draws`` fixed (t, eps) pairs, posterior means, no dropout."""
    g = torch.Generator().manual_seed(1234)
    data = trainer.data
    z0 = data.cache.latents(torch.arange(len(data)))  # (N, C, h, w) posterior means
    losses = []
    with torch.no_grad():
        for _ in range(draws):
            t = torch.randint(0, trainer.schedule.num_train_timesteps, (len(data),), generator=g)
            eps = torch.randn(z0.shape, generator=g)
            z_t, target = noisy_inputs(trainer.schedule, z0, eps, t, trainer.prediction_type)
            out = trainer.model(z_t, t, data.captions, data.time_ids)
            losses.append(float(weighted_mse(out, target, torch.ones(len(data)))))
    return sum(losses) / len(losses)


def test_a_few_steps_lower_the_loss_and_train_only_the_adapters(sd_folder, tmp_path):
    data = _images(tmp_path / "data")
    sd = load_pipeline(sd_folder, fast=False)
    base = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    trainer = LoraTrainer(_config(sd_folder, data, tmp_path, run={"max_steps": 30}), sd=sd)
    before = _fixed_loss(trainer)
    result = trainer.fit()
    after = _fixed_loss(trainer)
    assert result.step == 30 and after < 0.9 * before, (before, after)
    for key, value in sd.unet.state_dict().items():  # the base weights are frozen
        assert torch.equal(value, base[key]), key
    ups = [t.up for _, _, t in netlora.terms(sd.unet)]
    assert ups and all(u.abs().sum() > 0 for u in ups)  # B starts at zero; every adapter moved
    # a checkpoint holds the adapters (and their EMA), never the base model
    ckpt = list_checkpoints(tmp_path / "run" / CHECKPOINTS_DIR)[-1]
    saved = load_weights(ckpt / "model.safetensors")
    assert len(saved) == 2 * len(ups) and all(k.endswith((".down", ".up")) for k in saved)
    trainer.close()
    assert not list(netlora.terms(sd.unet))  # the pipeline is the base model again


def test_training_starts_at_the_base_model(sd_folder, tmp_path):
    """B = 0 at initialisation: the adapted pipeline predicts exactly what the base model predicts."""
    sd = load_pipeline(sd_folder, fast=False)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    ctx = sd.encode_text(["a", "b"])
    with torch.no_grad():
        base = sd.unet(x, t, context=ctx)
        net = LoraNetwork(sd, plan_targets(sd, "transformer", True), rank=4, alpha=2.0, seed=0)
        adapted = net(x, t, ["a", "b"])
    assert torch.equal(base, adapted)
    assert all(p.requires_grad for p in net.parameters()) and not any(p.requires_grad for p in sd.unet.parameters())


def test_text_encoder_adapters_train_at_their_own_rate(sd_folder, tmp_path):
    """lora.text_encoder_lr scales the text-encoder group's scheduled rate: at 0 its adapters stay at their
    initial B = 0 while the U-Net's move; the rate survives a checkpoint."""
    data = _images(tmp_path / "data")
    sd = load_pipeline(sd_folder, fast=False)
    config = _config(sd_folder, data, tmp_path, lora={"train_text_encoder": True, "text_encoder_lr": 0.0},
                     run={"max_steps": 3, "checkpoint_every": 3})  # fmt: skip
    trainer = LoraTrainer(config, sd=sd)
    trainer.fit()
    text = [t.up for _, _, t in netlora.terms(sd.text_encoder)]
    assert len(text) == 2 * 6 and all(torch.count_nonzero(u) == 0 for u in text)
    assert all(torch.count_nonzero(t.up) > 0 for _, _, t in netlora.terms(sd.unet))
    assert [g["lr_scale"] for g in trainer.optimizer.param_groups] == [1.0, 0.0]
    trainer.close()
    resumed = LoraTrainer(config.__class__.from_dict({**config.to_dict(), "run": {**config.to_dict()["run"],
                          "max_steps": 4}}), sd=sd, resume="latest", overwrite=True)  # fmt: skip
    assert [g["lr_scale"] for g in resumed.optimizer.param_groups] == [1.0, 0.0]
    resumed.close()


def test_targets_follow_the_option(sd_folder):
    sd = load_pipeline(sd_folder, fast=False)
    attention = unet_targets(sd.unet, "attention")
    transformer = unet_targets(sd.unet, "transformer")
    assert len(attention) == 4 * 2 * 4  # 4 transformer layers x (attn1, attn2) x (q, k, v, out)
    assert all(m.split(".")[-1] in ("to_q", "to_k", "to_v", "0") for m in attention)
    assert set(attention) < set(transformer)
    assert {m.split(".")[-1] for m in set(transformer) - set(attention)} == {"proj_in", "proj_out", "proj", "2"}


def test_resume_is_bit_exact(sd_folder, tmp_path):
    data = _images(tmp_path / "data")
    straight = LoraTrainer(_config(sd_folder, data, tmp_path / "a", run={"max_steps": 6, "checkpoint_every": 3}),
                           sd=load_pipeline(sd_folder, fast=False))  # fmt: skip
    straight.fit()
    first = LoraTrainer(_config(sd_folder, data, tmp_path / "b", run={"max_steps": 3, "checkpoint_every": 3}),
                        sd=load_pipeline(sd_folder, fast=False))  # fmt: skip
    first.fit()
    resumed = LoraTrainer(_config(sd_folder, data, tmp_path / "b", run={"max_steps": 6, "checkpoint_every": 3}),
                          sd=load_pipeline(sd_folder, fast=False), resume="latest", overwrite=True)  # fmt: skip
    assert resumed.step == 3
    resumed.fit()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.optimizer.state_dict()["state"][0]["step"] == resumed.optimizer.state_dict()["state"][0]["step"]


def test_gradient_checkpointing_keeps_the_gradients(sd_folder):
    sd = load_pipeline(sd_folder, fast=False)
    net = LoraNetwork(sd, plan_targets(sd, "transformer", False), rank=2, alpha=2.0, seed=0)
    for p in net.parameters():  # B = 0 would leave A without gradient
        torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 700])

    calls = []
    next(iter(net.adapters["unet"].values())).register_forward_hook(lambda *_: calls.append(1))

    def grads() -> list[torch.Tensor]:
        net.zero_grad(set_to_none=True)
        calls.clear()
        net(x, t, ["a cat", "a dog"]).square().mean().backward()
        return [p.grad.clone() for p in net.parameters()]

    plain = grads()
    assert len(calls) == 1
    sd.unet.set_gradient_checkpointing(True)
    checkpointed = grads()
    assert len(calls) == 2  # the transformer ran again in the backward pass
    for g1, g2 in zip(plain, checkpointed):
        torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in plain)


def test_file_round_trips_both_layouts_and_makes_the_trained_images(sd_folder, tmp_path):
    data = _images(tmp_path / "data")
    sd = load_pipeline(sd_folder, fast=False)
    config = _config(sd_folder, data, tmp_path, lora={"train_text_encoder": True, "alpha": 2.0},
                     run={"max_steps": 4})  # fmt: skip
    trainer = LoraTrainer(config, sd=sd)
    trainer.fit()
    prompts = ["a picture number 1", "a picture number 2"]
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))  # VAE factor 2

    def images() -> torch.Tensor:
        return TextToImage(sd)(prompts, height=32, width=32, steps=3, latents=latents, show_progress=False).images

    trained_images = images()
    trained = trainer.model.updates()
    trainer.close()
    kohya = tmp_path / "out.safetensors"
    f = read_lora(kohya)
    assert f.format == "kohya" and {u.alpha for u in f.modules.values()} == {2.0}
    assert {m.stem.split("_")[1] for m in f.modules} == {"unet", "te"}
    # kohya file -> our updates -> PEFT file -> our updates: the same tensors and alphas
    peft = tmp_path / "peft.safetensors"
    from_kohya = resolve(f, pipelora.components(sd))
    save_lora(from_kohya, peft, format="peft")
    from_peft = resolve(read_lora(peft), pipelora.components(sd))
    for updates in (from_kohya, from_peft):
        assert updates.keys() == trained.keys()
        for component, modules in trained.items():
            assert updates[component].keys() == modules.keys()
            for module, u in modules.items():
                got = updates[component][module]
                assert torch.equal(got.down, u.down) and torch.equal(got.up, u.up) and got.alpha == u.alpha
    base_images = images()
    assert (base_images - trained_images).abs().max() > 1e-4  # the adapters change the images
    for path in (kohya, peft):  # loaded back, each file makes the images the trained adapters made
        pipelora.load_lora(sd, path, name="trained")
        torch.testing.assert_close(images(), trained_images, atol=1e-5, rtol=0)
        pipelora.remove_lora(sd)


def test_sdxl_trains_both_text_encoders_and_the_file_loads(sdxl_folder, tmp_path):
    data = _images(tmp_path / "data")
    sd = load_pipeline(sdxl_folder, fast=False)
    config = _config(sdxl_folder, data, tmp_path, lora={"train_text_encoder": True, "rank": 2},
                     data={"random_flip": True}, run={"max_steps": 2})  # fmt: skip
    trainer = LoraTrainer(config, sd=sd)
    assert tuple(trainer.data.time_ids[0].tolist()) == (32.0, 32.0, 0.0, 0.0, 32.0, 32.0)
    trainer.fit()
    trainer.close()
    f = read_lora(tmp_path / "out.safetensors")
    assert f.components == ["text_encoder", "text_encoder_2", "unet"]
    assert {m.stem.split("_")[1] for m in f.modules} == {"unet", "te1", "te2"}
    last = len(sd.text_encoder.blocks) - 1  # the first encoder's last layer is not read by SDXL: no adapter
    assert not any(m.target.startswith(f"text_model_encoder_layers_{last}_") for m in f.modules
                   if m.component == "text_encoder")  # fmt: skip
    assert pipelora.load_lora(sd, tmp_path / "out.safetensors") == "out"


def test_sdxl_micro_conditioning_of_a_cropped_image():
    """A 48x32 (w x h) image at 32 px: resized to 48x32 (no change), the centre crop starts 8 px from the left."""
    assert crop_corner((48, 32), 32) == (0, 8)
    assert crop_corner((32, 64), 16) == (8, 0)  # resized to 16x32 first
    assert crop_corner((32, 32), 32) == (0, 0)


def test_bad_input_is_refused_naming_the_option(sd_folder, tmp_path):
    sd = load_pipeline(sd_folder, fast=False)
    bare = _images(tmp_path / "bare", captions=False)
    with pytest.raises(CaptionError, match="--caption"):
        LoraTrainer(_config(sd_folder, bare, tmp_path / "a"), sd=sd)
    assert not list(netlora.terms(sd.unet))  # nothing was attached
    ok = LoraTrainer(_config(sd_folder, bare, tmp_path / "b", data={"caption": "a photo"}), sd=sd)
    assert ok.data.captions == ["a photo"] * 4 and ok.data.captions_from_files == 0
    ok.close()
    latin = _images(tmp_path / "latin")
    (latin / "img2.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CaptionError, match=r"img2\.txt.*not UTF-8"):
        LoraTrainer(_config(sd_folder, latin, tmp_path / "c"), sd=sd)
    with pytest.raises(ConfigError, match=r"lora\.rank must be an integer in \[1, "):
        _config(sd_folder, latin, tmp_path / "d", lora={"rank": 0})
    with pytest.raises(ConfigError, match=r"data\.resolution must be a multiple of 4"):
        LoraTrainer(_config(sd_folder, bare, tmp_path / "e", data={"resolution": 30, "caption": "x"}), sd=sd)
    (tmp_path / "taken.safetensors").write_bytes(b"keep me")
    with pytest.raises(ConfigError, match="the file exists; pass --overwrite"):
        LoraTrainer(_config(sd_folder, bare, tmp_path / "f", lora={"output": str(tmp_path / "taken.safetensors")},
                            data={"caption": "x"}), sd=sd)  # fmt: skip
    assert (tmp_path / "taken.safetensors").read_bytes() == b"keep me"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_processes_train_as_one_with_the_same_global_batch(sd_folder, tmp_path):
    """DDP (2 gloo processes, batch 1 each) against 1 process with batch 2: the same losses and all-reduced
    gradient norms to float rounding (a missing all-reduce would give each rank its own half-batch norm), the
    same data position, and adapters within what two summation orders can make of 3 tiny Adam steps."""
    import json
    import os
    import socket
    import subprocess
    import sys

    from diffusekit.training.monitor import read_metrics

    data = _images(tmp_path / "data")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["train-lora", str(sd_folder), str(data), "--resolution", "32", "--steps", "3", "--lr", "1e-6",
              "--log-every-steps", "1", "--mixed-precision", "no", "--no-progress", "--no-tensorboard",
              "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    one = subprocess.run([sys.executable, "-m", "diffusekit", *common, "--batch-size", "2", "--output",
                          str(tmp_path / "one.safetensors")], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "diffusekit", *common,
                          "--batch-size", "1", "--output", str(tmp_path / "two.safetensors")],
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert "1 x 1 accumulation x 2 process(es)" in two.stderr
    ma, mb = (read_metrics(tmp_path / f"{n}.run" / "metrics.jsonl") for n in ("one", "two"))
    assert [r["step"] for r in mb] == [1, 2, 3]
    np.testing.assert_allclose([r["loss"] for r in mb], [r["loss"] for r in ma], rtol=1e-4)
    np.testing.assert_allclose([r["grad_norm"] for r in mb], [r["grad_norm"] for r in ma], rtol=1e-4)
    states = [json.loads((tmp_path / f"{n}.run" / "checkpoints" / "step-00000003" / "state.json").read_text())
              for n in ("one", "two")]  # fmt: skip
    assert states[0]["data_position"] == states[1]["data_position"] == 3 * 2
    fa, fb = read_lora(tmp_path / "one.safetensors"), read_lora(tmp_path / "two.safetensors")
    assert fa.modules.keys() == fb.modules.keys()
    for m, u in fa.modules.items():  # each Adam step moves a weight by at most lr: 3 steps, 2 orders -> 6e-6
        torch.testing.assert_close(fb.modules[m].up, u.up, rtol=0, atol=6e-6)
        torch.testing.assert_close(fb.modules[m].down, u.down, rtol=0, atol=6e-6)


def test_the_power_ema_is_refused_before_anything_is_loaded_or_attached(sd_folder, tmp_path):
    """LoRA training keeps a classic EMA of the adapters only; the power-function EMA (EDM2) is refused as a config
    error naming ema.kind, when the config is read (a file, a checkpoint's config.json) and, for a config built
    without validation, when the trainer starts: before the latents are encoded or the pipeline is adapted."""
    import dataclasses

    data = _images(tmp_path / "data")
    with pytest.raises(ConfigError, match=r"ema\.kind='power' is not supported.*allowed values: 'classic'"):
        _config(sd_folder, data, tmp_path, ema={"kind": "power"})
    sd = load_pipeline(sd_folder, fast=False)
    good = _config(sd_folder, data, tmp_path)
    power = dataclasses.replace(good, ema=dataclasses.replace(good.ema, kind="power"))  # not validated
    with pytest.raises(ConfigError, match=r"ema\.kind"):
        LoraTrainer(power, sd=sd)
    assert not list(netlora.terms(sd.unet)) and not list(netlora.terms(sd.text_encoder))  # nothing attached
    assert not any(p.is_file() for p in (tmp_path / "run").rglob("*"))  # no latents were encoded
