"""The main job's defaults: the pixel demo trains with the EDM preconditioning and samples with Heun and
guidance 2; the classic target is one option away with its own defaults; options of the other kind are
refused by name."""

from __future__ import annotations

import argparse

import pytest

from diffusekit.cli import demo
from diffusekit.errors import ConfigError


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_parser(parser.add_subparsers())
    return demo.resolve_defaults(parser.parse_args(["demo", *argv]))


def test_the_main_job_is_edm_with_heun_and_guidance():
    args = parse()
    assert (args.preconditioning, args.sampler, args.sample_steps) == ("edm", "heun", 18)
    assert args.guidance == 2.0 and args.fid_guidance == 2.0
    assert args.guide_at == demo.GUIDE_AT > 0  # guided by an early EMA of the run (autoguidance)
    diffusion = demo.demo_config(args).diffusion
    assert diffusion.preconditioning == "edm" and diffusion.min_snr_gamma is None


def test_the_classic_target_keeps_its_former_defaults():
    args = parse("--preconditioning", "none")
    assert (args.sampler, args.sample_steps, args.guidance, args.fid_guidance) == ("ddim", 50, 1.0, 1.0)
    diffusion = demo.demo_config(args).diffusion
    assert diffusion.preconditioning == "none"
    assert (diffusion.prediction_type, diffusion.min_snr_gamma) == ("epsilon", 5.0)


@pytest.mark.parametrize("option", ["--min-snr-gamma", "--prediction-type"])
def test_classic_only_options_with_edm_name_the_option(option):
    value = "3" if option == "--min-snr-gamma" else "v_prediction"
    with pytest.raises(ConfigError, match=f"{option} applies to --preconditioning none only"):
        parse(option, value)


def test_explicit_sampler_and_guidance_win():
    args = parse("--sampler", "dpmpp_2m", "--guidance", "1.5", "--fid-guidance", "1")
    assert (args.sampler, args.sample_steps, args.guidance, args.fid_guidance) == ("dpmpp_2m", 50, 1.5, 1.0)


def test_the_latent_demo_keeps_ddim_and_refuses_another_sampler():
    args = parse("--latent")
    assert (args.preconditioning, args.sampler) == ("none", "ddim")
    with pytest.raises(ConfigError, match="--sampler applies to the pixel demo only"):
        parse("--latent", "--sampler", "heun")


def test_the_guide_option_belongs_to_the_pixel_demo():
    assert parse("--guide-at", "0").guide_at == 0.0  # classifier-free guidance
    with pytest.raises(ConfigError, match="--guide-at applies to the pixel demo only"):
        parse("--latent", "--guide-at", "0.2")


def test_the_guide_sees_no_class_by_default_and_the_option_belongs_to_autoguidance():
    assert parse().guide_labels == "none" == demo.DEMO_GUIDE_LABELS
    assert parse("--guide-labels", "class").guide_labels == "class"
    for argv in (["--guide-at", "0", "--guide-labels", "class"], ["--latent", "--guide-labels", "none"]):
        with pytest.raises(ConfigError, match="--guide-labels applies to autoguidance in the pixel demo"):
            parse(*argv)
