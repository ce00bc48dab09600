"""LoRA on a Stable Diffusion pipeline (diffusekit.pipelines.lora): load, weights between generations,
remove, fuse/unfuse, write, a failed load that changes nothing, the parity handler, and (with the bench
extra) our written files in the reference's loader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffusekit.errors import ConfigError, WeightsError
from diffusekit.pipelines import lora
from diffusekit.pipelines.loading import load_pipeline
from diffusekit.pipelines.text_to_image import TextToImage

PROMPTS = ["a photo of a cat", "a painting of a dog"]
LATENTS = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(34235))


@pytest.fixture(scope="module")
def fixture_root(fixtures_dir: Path) -> Path:
    return fixtures_dir / "pipelines"


@pytest.fixture()
def sd(fixture_root: Path):
    return load_pipeline(fixture_root / "stable_diffusion")


def _kohya(root: Path) -> Path:
    return root / "lora" / "kohya.safetensors"


def _peft(root: Path) -> Path:
    return root / "lora" / "peft" / "pytorch_lora_weights.safetensors"


def _images(sd, steps: int = 3) -> torch.Tensor:
    return TextToImage(sd)(PROMPTS, height=16, width=16, steps=steps, guidance_scale=7.5, sampler="ddim",
                           latents=LATENTS, show_progress=False).images  # fmt: skip


def _states(sd) -> dict[str, torch.Tensor]:
    out = {}
    for component, model in lora.components(sd).items():
        out.update({f"{component}.{k}": v.detach().clone() for k, v in model.state_dict().items()})
    return out


def test_weights_change_between_generations_and_removal_restores_the_base(sd, fixture_root):
    base = _images(sd)
    assert lora.load_lora(sd, _kohya(fixture_root), weight=0.8) == "kohya"
    assert lora.load_lora(sd, _peft(fixture_root), weight=0.5, name="peft") == "peft"
    assert lora.lora_weights(sd) == {"kohya": 0.8, "peft": 0.5}
    both = _images(sd)
    assert (both - base).abs().max() > 0.05  # the adapters change the images (README: up to 0.34 at 10 steps)
    lora.set_lora_weights(sd, {"kohya": 0.0, "peft": 0.0})
    assert torch.equal(_images(sd), base)  # weight 0: exactly the base model
    lora.set_lora_weights(sd, {"kohya": 0.8, "peft": 0.5})
    torch.testing.assert_close(_images(sd), both, atol=0, rtol=0)
    lora.set_lora_weights(sd, scale=0.5)
    half = _images(sd)
    assert not torch.allclose(half, both) and not torch.allclose(half, base)
    lora.remove_lora(sd, "peft")
    assert lora.lora_weights(sd) == {"kohya": 0.8}
    lora.remove_lora(sd)
    assert lora.lora_weights(sd) == {}
    assert torch.equal(_images(sd), base)
    with pytest.raises(ConfigError, match="no LoRA named 'kohya' is loaded; loaded: none"):
        lora.set_lora_weights(sd, {"kohya": 1.0})


def test_fused_generation_equals_unfused_and_unfuse_restores_the_weights(sd, fixture_root):
    original = _states(sd)
    lora.load_lora(sd, _kohya(fixture_root), weight=0.8)
    lora.load_lora(sd, _peft(fixture_root), weight=0.5)
    lora.set_lora_weights(sd, scale=0.7)
    unfused = _images(sd)
    lora.fuse_lora(sd)
    assert any(not torch.equal(v, original[k]) for k, v in _states(sd).items())
    # W + s*BA in one matrix vs W x + s*B(A x): other roundings, in kernels that differ between CPUs
    torch.testing.assert_close(_images(sd), unfused, atol=1e-4, rtol=0)
    lora.unfuse_lora(sd)
    for key, value in _states(sd).items():
        torch.testing.assert_close(value, original[key], atol=1e-6, rtol=0, msg=key)
    lora.fuse_lora(sd)
    lora.remove_lora(sd)  # removing fused adapters takes their updates out first
    for key, value in _states(sd).items():
        torch.testing.assert_close(value, original[key], atol=1e-6, rtol=0, msg=key)


def test_a_failed_load_leaves_the_pipeline_unchanged(sd, fixture_root, tmp_path):
    lora.load_lora(sd, _peft(fixture_root), weight=0.5)
    before, images = _states(sd), _images(sd, steps=2)
    # valid U-Net modules, then one text-encoder module whose shapes do not fit: found before anything changes
    good = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    bad = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    t = {f"{good}.lora_down.weight": torch.ones(4, 32), f"{good}.lora_up.weight": torch.ones(32, 4),
         f"{bad}.lora_down.weight": torch.ones(4, 32), f"{bad}.lora_up.weight": torch.ones(36, 4)}  # fmt: skip
    save_file(t, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError, match=rf"bad.safetensors: {bad}: shapes"):
        lora.load_lora(sd, tmp_path / "bad.safetensors")
    for path, match in [(tmp_path / "missing.safetensors", "LoRA file not found"),
                        (_peft(fixture_root), "a LoRA named 'pytorch_lora_weights' is already loaded")]:  # fmt: skip
        with pytest.raises((WeightsError, ConfigError), match=match):
            lora.load_lora(sd, path)
    with pytest.raises(ConfigError, match="weight must be a finite number"):
        lora.load_lora(sd, _kohya(fixture_root), weight=float("inf"))
    assert lora.lora_weights(sd) == {"pytorch_lora_weights": 0.5}
    after = _states(sd)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(_images(sd, steps=2), images)


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_a_written_adapter_loads_back_with_the_same_images(sd, fixture_root, tmp_path, fmt):
    lora.load_lora(sd, _kohya(fixture_root), weight=0.6)
    want = _images(sd, steps=2)
    lora.save_lora_file(sd, "kohya", tmp_path / "written.safetensors", format=fmt)
    lora.remove_lora(sd)
    lora.load_lora(sd, tmp_path / "written.safetensors", weight=0.6)
    torch.testing.assert_close(_images(sd, steps=2), want, atol=1e-6, rtol=0)


def _case_copy(fixture_root: Path, tmp_path: Path, case: str) -> Path:
    """The case under tmp_path/cases with the folders its meta points to (../../stable_diffusion, ../../lora)."""
    (tmp_path / "cases").mkdir()
    shutil.copytree(fixture_root / "cases" / case, tmp_path / "cases" / case)
    for name in ("stable_diffusion", "lora"):
        (tmp_path / name).symlink_to(fixture_root / name)
    return tmp_path / "cases" / case


def test_parity_handler_fails_a_case_whose_lora_scale_is_changed(fixture_root, tmp_path):
    from diffusekit.parity.__main__ import run

    case = _case_copy(fixture_root, tmp_path, "lora_kohya_r4_scale0.6")
    assert run(tmp_path / "cases") == (1, 0, 0)
    meta = json.loads((case / "meta.json").read_text())
    (case / "meta.json").write_text(json.dumps({**meta, "lora_scale": 0.65}))
    assert run(tmp_path / "cases") == (0, 1, 0)


def test_our_written_files_load_in_the_reference_loader_with_the_same_images(sd, fixture_root, tmp_path):
    """The reference pipeline (bench extra) loads the files we write and makes our images."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    lora.load_lora(sd, _kohya(fixture_root), weight=1.0)
    ours = _images(sd, steps=3).permute(0, 2, 3, 1)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(fixture_root / "stable_diffusion", safety_checker=None)
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    for fmt in ("kohya", "peft"):
        path = tmp_path / f"{fmt}.safetensors"
        lora.save_lora_file(sd, "kohya", path, format=fmt)
        ref.load_lora_weights(str(path), adapter_name=fmt)
        ref.set_adapters([fmt], [1.0])
        images = ref(PROMPTS, height=16, width=16, num_inference_steps=3, guidance_scale=7.5, latents=LATENTS,
                     output_type="np").images  # fmt: skip
        torch.testing.assert_close(torch.from_numpy(images), ours, atol=1e-4, rtol=0, msg=fmt)
        ref.delete_adapters(fmt)
