"""Parity cases for single networks and tokenizers (fixtures README section 5)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from diffusekit.io.models import load_unet, load_vae
from diffusekit.io.text import load_text_encoder, load_tokenizer
from diffusekit.io.weights import load_weights
from diffusekit.parity.report import Comparison, Skip

MODEL_TOL = {"rtol": 0.0, "atol": 1e-4}


def model_case(case: Path, meta: dict) -> Comparison:
    """One forward pass of a tiny network; dispatch on ``model_class``."""
    cls = meta.get("model_class")
    io = load_weights(case / "io.safetensors")
    cmp = Comparison(**MODEL_TOL)
    with torch.inference_mode():
        if cls in ("UNet2DModel", "UNet2DConditionModel"):
            _unet(case, io, cmp)
        elif cls == "AutoencoderKL":
            _vae(case, io, cmp)
        elif cls == "CLIPTextModel":
            _text_encoder(case, io, cmp)
        else:
            raise Skip(f"model_class {cls!r} is not implemented")
    return cmp


def _unet(case: Path, io: dict, cmp: Comparison) -> None:
    unet = load_unet(case / "model")
    kw = {}
    if "class_labels" in io:
        kw["class_labels"] = io["class_labels"]
    if "encoder_hidden_states" in io:
        kw["context"] = io["encoder_hidden_states"]
    cmp.check("out", unet(io["sample"], io["timestep"], **kw), io["out"])
    if "out_timestep_scalar" in io:
        cmp.check("out_timestep_scalar", unet(io["sample"], io["timestep_scalar"], **kw), io["out_timestep_scalar"])
    if "out_nonsquare" in io:
        out = unet(io["sample_nonsquare"], io["timestep_nonsquare"], context=io["encoder_hidden_states_nonsquare"])
        cmp.check("out_nonsquare", out, io["out_nonsquare"])


def _vae(case: Path, io: dict, cmp: Comparison) -> None:
    vae = load_vae(case / "model")
    posterior = vae.encode(io["image"])
    cmp.check("posterior_parameters", posterior.parameters, io["posterior_parameters"])
    cmp.check("latent_mean", posterior.mean, io["latent_mean"])
    cmp.check("latent_logvar", posterior.logvar, io["latent_logvar"])
    cmp.check("latent_std", posterior.std, io["latent_std"])
    cmp.check("latent_sample", posterior.sample(noise=io["posterior_noise"]), io["latent_sample"])
    cmp.check("decoded", vae.decode(io["z"]), io["decoded"])
    cmp.check("reconstruction_from_mean", vae.decode(posterior.mean), io["reconstruction_from_mean"])


def _text_encoder(case: Path, io: dict, cmp: Comparison) -> None:
    enc = load_text_encoder(case / "model")
    out = enc(io["input_ids"])
    cmp.check("last_hidden_state", out.last_hidden_state, io["last_hidden_state"])
    cmp.check("pooler_output", out.pooled, io["pooler_output"])
    if "hidden_states" in io:
        cmp.check("hidden_states", out.hidden_states, io["hidden_states"])
    if "input_ids_random" in io:
        out = enc(io["input_ids_random"])
        cmp.check("last_hidden_state_random", out.last_hidden_state, io["last_hidden_state_random"])
        cmp.check("pooler_output_random", out.pooled, io["pooler_output_random"])


def tokenizer_case(case: Path, meta: dict) -> Comparison:
    """Token ids of ``meta.prompts``, padded to 77 (exact) and unpadded."""
    tok = load_tokenizer(case / "tokenizer")
    io = load_weights(case / "io.safetensors")
    cmp = Comparison(rtol=0.0, atol=0.0)
    max_length = int(meta.get("model_max_length", 77))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long prompt warns about truncation, as it should
        cmp.check("input_ids", tok(meta["prompts"], max_length=max_length), io["input_ids"], exact=True)
        for i, (prompt, ids) in enumerate(zip(meta["prompts"], meta.get("input_ids_unpadded", []))):
            ours = torch.tensor(tok.encode_unpadded(prompt, max_length=max_length))
            cmp.check(f"input_ids_unpadded[{i}]", ours, torch.tensor(ids), exact=True)
    return cmp


def tokenizer_expected_ids_case(case: Path, meta: dict) -> Comparison:
    """A tokenizer folder with ``expected_ids.json``: padded/truncated and untruncated ids, exact."""
    tok = load_tokenizer(case)
    expected = json.loads((case / "expected_ids.json").read_text(encoding="utf-8"))
    cmp = Comparison(rtol=0.0, atol=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, item in enumerate(expected["cases"]):
            prompt = item["prompt"]
            if "input_ids_padded_77" in item:
                cmp.check(f"case {i} padded", tok([prompt])[0], torch.tensor(item["input_ids_padded_77"]), exact=True)
            if "input_ids_unpadded_untruncated" in item:
                ours = torch.tensor(tok.encode_unpadded(prompt))
                cmp.check(f"case {i} unpadded", ours, torch.tensor(item["input_ids_unpadded_untruncated"]), exact=True)
    return cmp
