"""Parity cases for whole pipelines (fixtures README section 6)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from diffusekit.io.models import load_unet
from diffusekit.io.scheduler_config import scheduler_from_diffusers
from diffusekit.io.text import text_encoder_from_diffusers_state_dict
from diffusekit.io.weights import load_weights, read_json
from diffusekit.parity.report import Comparison
from diffusekit.pipelines import lora
from diffusekit.pipelines.img2img import ImageToImage
from diffusekit.pipelines.inpaint import Inpaint
from diffusekit.pipelines.loading import load_pipeline
from diffusekit.pipelines.sdxl import ImageToImageXL, StableDiffusionXL, TextToImageXL
from diffusekit.pipelines.stable_diffusion import StableDiffusion
from diffusekit.pipelines.text_to_image import TextToImage
from diffusekit.pipelines.unconditional import UnconditionalPipeline
from diffusekit.pipelines.upscale import StableDiffusionUpscaler, Upscale
from diffusekit.samplers.common import StepInfo
from diffusekit.samplers.config import SamplerConfig

PIPELINE_TOL = {"rtol": 1e-3, "atol": 1e-3}


class Recorder(torch.nn.Module):
    """Wraps a network and records every call's inputs and output."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.config = net.config
        self.calls: list[tuple[Tensor, Tensor, Tensor]] = []
        self.conditioning: list[dict[str, Tensor]] = []  # each call's keyword tensors (context, pooled, ...)

    def forward(self, x: Tensor, t: Tensor, **kw) -> Tensor:
        out = self.net(x, t, **kw)
        full = torch.cat([x, kw["concat"]], dim=1) if kw.get("concat") is not None else x  # the whole input
        self.calls.append((full.clone(), torch.as_tensor(t).float().reshape(()), out.clone()))
        self.conditioning.append({k: v.clone() for k, v in kw.items() if isinstance(v, Tensor)})
        return out


def _stack_calls(rec: Recorder, i: int) -> Tensor:
    return torch.stack([c[i] for c in rec.calls])


def _sampler_config(case: Path, meta: dict) -> SamplerConfig:
    cfg = scheduler_from_diffusers(read_json(case / "scheduler_config.json"))
    if cfg.sampler == "ddim":
        cfg = cfg.with_sampler("ddim", eta=float(meta.get("eta") or 0.0))
    return cfg


def unconditional_case(case: Path, meta: dict) -> Comparison:
    """DDPMPipeline / DDIMPipeline: one generator draws the initial noise, then each step's noise."""
    ref = load_weights(case / "io.safetensors")
    unet = Recorder(load_unet((case / meta["pipeline_dir"]) / "unet"))
    pipe = UnconditionalPipeline(unet, _sampler_config(case, meta))
    steps: list[StepInfo] = []
    n, _, h, w = ref["initial_noise"].shape
    images = pipe(
        n, steps=int(meta["num_inference_steps"]), height=h, width=w,
        generator=torch.Generator().manual_seed(int(meta["generator_seed"])),
        callback=steps.append, show_progress=False,
    )  # fmt: skip
    cmp = Comparison(**PIPELINE_TOL)
    cmp.check("unet_sample_in[0] (initial noise)", unet.calls[0][0], ref["initial_noise"])
    cmp.check("unet_timestep", _stack_calls(unet, 1), ref["unet_timestep"].float())
    cmp.check("unet_sample_in", _stack_calls(unet, 0), ref["unet_sample_in"])
    cmp.check("unet_out", _stack_calls(unet, 2), ref["unet_out"])
    cmp.check("step_prev_sample", torch.stack([s.x for s in steps]), ref["step_prev_sample"])
    cmp.check("final_sample", steps[-1].x, ref["final_sample"])
    cmp.check("images", images.permute(0, 2, 3, 1), ref["images"])
    return cmp


def _load_loras(sd: StableDiffusion, case: Path, meta: dict) -> None:
    """The case's LoRA adapters (``meta.lora_adapters``, files relative to the case) with their weights and
    ``meta.lora_scale`` (fixtures README section 11)."""
    for adapter in meta.get("lora_adapters") or []:
        lora.load_lora(sd, case / adapter["file"], weight=float(adapter["adapter_weight"]),
                       name=adapter["adapter_name"])  # fmt: skip
    if meta.get("lora_adapters"):
        lora.set_lora_weights(sd, scale=float(meta.get("lora_scale", 1.0)))


def _sd(case: Path, meta: dict) -> tuple[StableDiffusion, Recorder]:
    sd = load_pipeline(case / meta["pipeline_dir"])
    _load_loras(sd, case, meta)
    sd.sampler_config = _sampler_config(case, meta)
    rec = Recorder(sd.unet)
    sd.unet = rec
    return sd, rec


def _negative(meta: dict):
    neg = meta.get("negative_prompt")
    return neg if neg is not None else None


def _check_sd_run(cmp: Comparison, sd: StableDiffusion, rec: Recorder, steps: list[StepInfo], out, ref: dict,
                  meta: dict) -> None:
    """What every Stable Diffusion case stores: text embeddings, every U-Net call, every step, the output."""
    prompts = meta["prompt"]
    cmp.check("prompt_input_ids", sd.tokenizer(prompts), ref["prompt_input_ids"], exact=True)
    cmp.check("prompt_embeds", sd.encode_text(prompts), ref["prompt_embeds"])
    if meta.get("classifier_free_guidance"):
        negatives = meta.get("negative_prompt") or [""] * len(prompts)
        if "negative_input_ids" in ref:
            cmp.check("negative_input_ids", sd.tokenizer(negatives), ref["negative_input_ids"], exact=True)
        if "negative_prompt_embeds" in ref:
            cmp.check("negative_prompt_embeds", _negative_embeds(sd, meta, negatives), ref["negative_prompt_embeds"])
    if len(rec.calls) != int(meta["num_unet_calls"]):
        cmp.failures.append(f"made {len(rec.calls)} U-Net calls, reference made {meta['num_unet_calls']}")
        return
    cmp.check("unet_timestep", _stack_calls(rec, 1), ref["unet_timestep"].float())
    cmp.check("unet_sample_in", _stack_calls(rec, 0), ref["unet_sample_in"])
    cmp.check("unet_out", _stack_calls(rec, 2), ref["unet_out"])
    prev = ref["step_prev_sample"]
    if len(steps) + 1 == prev.shape[0]:  # PNDM's extra first call (see parity.schedulers)
        prev = prev[1:]
    cmp.check("step_prev_sample", torch.stack([s.x for s in steps]), prev)
    cmp.check("final_latents", out.latents, ref["final_latents"])
    if "vae_decoded" in ref:
        cmp.check("vae_decoded", sd.codec.decode(out.latents), ref["vae_decoded"])
    cmp.check("images", out.images.permute(0, 2, 3, 1), ref["images"])


def _negative_embeds(sd: StableDiffusion, meta: dict, negatives: list[str]) -> Tensor:
    """The negative text states the pipeline uses: zeros for an SDXL model with force_zeros_for_empty_prompt and
    no negative prompt (fixtures README 13.1), else the encoded negatives."""
    context = sd.encode_text(negatives)
    xl_zeros = isinstance(sd, StableDiffusionXL) and sd.force_zeros_for_empty_prompt
    zeros = xl_zeros and meta.get("negative_prompt") is None
    return torch.zeros_like(context) if zeros else context


def text2img_case(case: Path, meta: dict) -> Comparison:
    """Text-to-image (section 6.1); with ``meta.lora_adapters`` the LoRA cases of section 11 (kind
    ``lora_text2img``); with ``meta.generator_seed`` the sampler's step noise comes from that generator (the
    LCM case of section 12, kind ``lcm_text2img``, which also stores every step's ``denoised``)."""
    ref = load_weights(case / "io.safetensors")
    sd, rec = _sd(case, meta)
    steps: list[StepInfo] = []
    seed = meta.get("generator_seed")
    out = TextToImage(sd)(
        meta["prompt"], negative_prompt=_negative(meta), height=int(meta["height"]), width=int(meta["width"]),
        steps=int(meta["num_inference_steps"]), guidance_scale=float(meta["guidance_scale"]),
        latents=ref["latents_in"], callback=steps.append, show_progress=False,
        generator=None if seed is None else torch.Generator().manual_seed(int(seed)),
    )  # fmt: skip
    cmp = Comparison(**PIPELINE_TOL)
    cmp.check("start latents", out.start, ref["latents_in"] * float(meta["init_noise_sigma"]))
    if "step_denoised" in ref and len(steps) == ref["step_denoised"].shape[0]:
        if any(s.x0 is None for s in steps):
            cmp.failures.append("the sampler reports no denoised estimate (StepInfo.x0) to compare with step_denoised")
        else:
            cmp.check("step_denoised", torch.stack([s.x0 for s in steps]), ref["step_denoised"])
    with torch.inference_mode():
        _check_sd_run(cmp, sd, rec, steps, out, ref, meta)
    return cmp


def img2img_case(case: Path, meta: dict) -> Comparison:
    ref = load_weights(case / "io.safetensors")
    sd, rec = _sd(case, meta)
    steps: list[StepInfo] = []
    out = ImageToImage(sd)(
        meta["prompt"], ref["image"], strength=float(meta["strength"]), negative_prompt=_negative(meta),
        steps=int(meta["num_inference_steps"]), guidance_scale=float(meta["guidance_scale"]),
        generator=torch.Generator().manual_seed(int(meta["generator_seed"])), callback=steps.append,
        show_progress=False,
    )  # fmt: skip
    cmp = Comparison(**PIPELINE_TOL)
    cmp.check("latents_start", out.start, ref["latents_start"])
    if "start_timestep" in meta:
        cmp.check("start timestep", rec.calls[0][1], torch.tensor(float(meta["start_timestep"])))
    with torch.inference_mode():
        _check_sd_run(cmp, sd, rec, steps, out, ref, meta)
    return cmp


def inpaint_case(case: Path, meta: dict) -> Comparison:
    ref = load_weights(case / "io.safetensors")
    sd, rec = _sd(case, meta)
    steps: list[StepInfo] = []
    out = Inpaint(sd)(
        meta["prompt"], ref["image"], ref["mask"], strength=float(meta.get("strength", 1.0)),
        negative_prompt=_negative(meta), steps=int(meta["num_inference_steps"]),
        guidance_scale=float(meta["guidance_scale"]), latents=ref.get("latents_in"),
        generator=torch.Generator().manual_seed(int(meta["generator_seed"])), callback=steps.append,
        show_progress=False,
    )  # fmt: skip
    cmp = Comparison(**PIPELINE_TOL)
    c = rec.net.config.in_channels
    if "mask_latent" in ref and c > 4:
        cmp.check("mask_latent", rec.calls[0][0][:, 4:5], torch.cat([ref["mask_latent"]] * 2)
                  if meta.get("classifier_free_guidance") else ref["mask_latent"])  # fmt: skip
    with torch.inference_mode():
        _check_sd_run(cmp, sd, rec, steps, out, ref, meta)
    return cmp


def _reference_param(parts: dict[str, torch.nn.Module], key: str) -> Tensor:
    """A copy of parameter ``<component>.<reference parameter name>`` of our networks."""
    component, param = key.split(".", 1)
    state = parts[component].state_dict()
    if component != "unet":  # the text encoder's reference names -> ours (io.text's key map)
        (param,) = text_encoder_from_diffusers_state_dict({param: torch.empty(0)})
    if param not in state:
        raise KeyError(f"{key}: no such parameter in our {component} (looked for {param!r})")
    return state[param].detach().clone()


def lora_fuse_case(case: Path, meta: dict) -> Comparison:
    """LoRA fused into the weights (section 11): ``fused.<component>.<param>`` after loading the adapters and
    fusing at ``meta.lora_scale``, ``original.*`` before; unfusing must give the originals back."""
    ref = load_weights(case / "io.safetensors")
    sd = load_pipeline(case / meta["pipeline_dir"], fast=False)
    parts = lora.components(sd)
    keys = [k.removeprefix("original.") for k in ref if k.startswith("original.")]
    cmp = Comparison(rtol=1e-5, atol=1e-5)
    for key in keys:
        cmp.check(f"original.{key}", _reference_param(parts, key), ref[f"original.{key}"])
    _load_loras(sd, case, meta)
    lora.fuse_lora(sd)
    for key in keys:
        cmp.check(f"fused.{key}", _reference_param(parts, key), ref[f"fused.{key}"])
    lora.unfuse_lora(sd)
    for key in keys:
        cmp.check(f"unfused.{key} (= original)", _reference_param(parts, key), ref[f"original.{key}"])
    return cmp


def upscale_case(case: Path, meta: dict) -> Comparison:
    """The x4 upscaler (section 10, kind ``upscale``): the low-res image noised to ``meta.noise_level`` by the
    low-res schedule and stacked on the latents, the noise level as class label, guidance, the x4 VAE."""
    ref = load_weights(case / "io.safetensors")
    sd, rec = _sd(case, meta)
    if not isinstance(sd, StableDiffusionUpscaler):
        raise ValueError(f"{meta['pipeline_dir']} did not load as an x4 upscaler (got {type(sd).__name__})")
    steps: list[StepInfo] = []
    out = Upscale(sd)(
        meta["prompt"], ref["image"], negative_prompt=_negative(meta), noise_level=int(meta["noise_level"]),
        steps=int(meta["num_inference_steps"]), guidance_scale=float(meta["guidance_scale"]),
        generator=torch.Generator().manual_seed(int(meta["generator_seed"])), callback=steps.append,
        show_progress=False,
    )  # fmt: skip
    cmp = Comparison(**PIPELINE_TOL)
    if "max_noise_level" in meta and sd.max_noise_level != int(meta["max_noise_level"]):
        cmp.failures.append(f"max_noise_level: loaded {sd.max_noise_level}, reference {meta['max_noise_level']}")
    if "low_res_alpha_cumprod" in meta:
        abar = sd.low_res_config.schedule().alphas_cumprod[int(meta["noise_level"])]
        cmp.check("low_res_alpha_cumprod", abar.float(), torch.tensor(float(meta["low_res_alpha_cumprod"])))
    cmp.check("start latents", out.start, ref["latents_in"] * float(meta["init_noise_sigma"]))
    if rec.calls:
        b = ref["image"].shape[0]
        latent = sd.codec.channels
        cmp.check("image_noised (U-Net input channels after the latents)", rec.calls[0][0][-b:, latent:],
                  ref["image_noised"])  # fmt: skip
    with torch.inference_mode():
        _check_sd_run(cmp, sd, rec, steps, out, ref, meta)
    return cmp


def _micro_conditioning(meta: dict) -> dict:
    """The case's micro-conditioning arguments (fixtures README 13.2), where it stores them."""
    keys = ("original_size", "crops_coords_top_left", "target_size")
    return {k: tuple(int(v) for v in meta[k]) for k in keys if meta.get(k) is not None}


def _check_sdxl_conditioning(cmp: Comparison, sd: StableDiffusionXL, rec: Recorder, ref: dict, meta: dict) -> None:
    """SDXL's second tokenizer and encoder, and what the U-Net received at its first call: the text states
    [negative; positive] (zeros under force_zeros_for_empty_prompt), the pooled embeddings and the time ids."""
    prompts = meta["prompt"]
    cmp.check("prompt_input_ids_2", sd.tokenizer_2(prompts), ref["prompt_input_ids_2"], exact=True)
    cmp.check("pooled_prompt_embeds", sd.encode(prompts).pooled, ref["pooled_prompt_embeds"])
    if "negative_input_ids_2" in ref:
        cmp.check("negative_input_ids_2", sd.tokenizer_2(meta["negative_prompt"]), ref["negative_input_ids_2"],
                  exact=True)  # fmt: skip
    if not rec.conditioning:
        cmp.failures.append("the U-Net was never called")
        return
    first = rec.conditioning[0]
    for ours, theirs in (("pooled", "add_text_embeds"), ("time_ids", "add_time_ids")):
        if ours not in first:
            cmp.failures.append(f"the U-Net received no {ours} (reference {theirs})")
        else:
            cmp.check(f"{theirs} (U-Net input)", first[ours], ref[theirs])
    if "negative_prompt_embeds" in ref:
        expected = torch.cat([ref["negative_prompt_embeds"], ref["prompt_embeds"]])
        cmp.check("encoder_hidden_states (U-Net input: negative; positive)", first["context"], expected)
        cmp.check("negative_pooled_prompt_embeds (U-Net input)", first["pooled"][: len(prompts)],
                  ref["negative_pooled_prompt_embeds"])  # fmt: skip


def _sdxl(case: Path, meta: dict) -> tuple[StableDiffusionXL, Recorder]:
    sd, rec = _sd(case, meta)
    if not isinstance(sd, StableDiffusionXL):
        raise ValueError(f"{meta['pipeline_dir']} did not load as an SDXL model (got {type(sd).__name__})")
    expected = meta.get("force_zeros_for_empty_prompt", sd.force_zeros_for_empty_prompt)
    if sd.force_zeros_for_empty_prompt != expected:
        raise ValueError(f"force_zeros_for_empty_prompt: loaded {sd.force_zeros_for_empty_prompt}, "
                         f"reference {meta['force_zeros_for_empty_prompt']}")  # fmt: skip
    return sd, rec


def sdxl_text2img_case(case: Path, meta: dict) -> Comparison:
    """SDXL text-to-image (section 13, kind ``sdxl_text2img``): both encoders, micro-conditioning, zero negative
    embeddings without a negative prompt, the Euler loop with guidance, the SDXL VAE scaling."""
    ref = load_weights(case / "io.safetensors")
    sd, rec = _sdxl(case, meta)
    steps: list[StepInfo] = []
    out = TextToImageXL(sd)(
        meta["prompt"], negative_prompt=_negative(meta), height=int(meta["height"]), width=int(meta["width"]),
        steps=int(meta["num_inference_steps"]), guidance_scale=float(meta["guidance_scale"]),
        latents=ref["latents_in"], callback=steps.append, show_progress=False, **_micro_conditioning(meta),
    )  # fmt: skip
    cmp = Comparison(**PIPELINE_TOL)
    cmp.check("start latents", out.start, ref["latents_in"] * float(meta["init_noise_sigma"]))
    with torch.inference_mode():
        _check_sdxl_conditioning(cmp, sd, rec, ref, meta)
        _check_sd_run(cmp, sd, rec, steps, out, ref, meta)
    return cmp


def sdxl_img2img_case(case: Path, meta: dict) -> Comparison:
    """SDXL image-to-image (section 13.5, kind ``sdxl_img2img``): the posterior draw, then the forward noise in
    Euler's sigma form (``x0 + sigma_start noise``), the last n steps of the N-step grid."""
    ref = load_weights(case / "io.safetensors")
    sd, rec = _sdxl(case, meta)
    steps: list[StepInfo] = []
    out = ImageToImageXL(sd)(
        meta["prompt"], ref["image"], strength=float(meta["strength"]), negative_prompt=_negative(meta),
        steps=int(meta["num_inference_steps"]), guidance_scale=float(meta["guidance_scale"]),
        generator=torch.Generator().manual_seed(int(meta["generator_seed"])), callback=steps.append,
        show_progress=False, **_micro_conditioning(meta),
    )  # fmt: skip
    cmp = Comparison(**PIPELINE_TOL)
    with torch.inference_mode():
        init = sd.codec.encode(2 * ref["image"] - 1, noise=ref["draw_00"])
    cmp.check("init_latents", init, ref["init_latents"])
    cmp.check("latents_start", out.start, ref["latents_start"])
    if "start_timestep" in meta and rec.calls:
        cmp.check("start timestep", rec.calls[0][1], torch.tensor(float(meta["start_timestep"])))
    with torch.inference_mode():
        _check_sdxl_conditioning(cmp, sd, rec, ref, meta)
        _check_sd_run(cmp, sd, rec, steps, out, ref, meta)
    return cmp
