"""EDM training (Karras et al. 2022) as an option of the trainer: the loss falls on the bundled digits, a checkpoint
resumes bit for bit, and the exported folder samples through the EDM denoiser."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit.cli.main import main
from diffusekit.errors import ConfigError
from diffusekit.samplers.config import SamplerConfig
from diffusekit.training.config import TrainConfig
from diffusekit.training.export import load_for_sampling
from diffusekit.training.monitor import read_metrics
from diffusekit.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def edm_config(tmp_path, name: str, **run) -> TrainConfig:
    return TrainConfig().replace(
        data={"source": "bundled", "resolution": 8, "limit": 512},
        model={"preset": "test-tiny", "class_conditional": False},
        diffusion={"preconditioning": "edm"},
        optim={"batch_size": 32, "warmup_steps": 5, "lr": 2e-3},
        ema={"decay": 0.9},
        run={"output_dir": str(tmp_path / name), "max_steps": 60, "checkpoint_every": 1000, "log_every": 10,
             "progress": False, "tensorboard": False, "mixed_precision": "no", **run},
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("edm")
    result = Trainer(edm_config(tmp, "run")).fit()
    return tmp, result


def test_edm_training_lowers_the_loss(trained):
    tmp, result = trained
    losses = [r["loss"] for r in read_metrics(tmp / "run" / "metrics.jsonl")]
    # the effective target has unit variance (Karras et al. 2022, appendix B.6): an untrained network starts near 1
    assert 0.5 < losses[0] < 3.0, losses
    assert losses[-1] < 0.7 * losses[0], losses


def test_edm_export_records_the_preconditioning_and_sample_uses_it(trained, tmp_path):
    tmp, result = trained
    sched = json.loads((result.export_dir / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "EDMEulerScheduler" and sched["_diffusekit_sampler"] == "heun"
    pipe = load_for_sampling(result.export_dir)
    assert (pipe.sampler_config.preconditioning, pipe.sampler_config.sampler) == ("edm", "heun")
    ckpt_pipe = load_for_sampling(result.checkpoint)  # a checkpoint rebuilds the same sampler config
    assert ckpt_pipe.sampler_config == pipe.sampler_config
    singles = tmp_path / "singles"
    assert main(["sample", str(result.export_dir), "--n", "32", "--steps", "12", "--sampler", "heun", "--out",
                 str(tmp_path / "grid.png"), "--out-dir", str(singles), "--device", "cpu"]) == 0  # fmt: skip
    edm = np.stack([np.asarray(Image.open(p).convert("L"), dtype=np.float64) / 255 for p in singles.glob("*.png")])
    # the digits' statistics at 8x8: mostly dark background
    data = Trainer(edm_config(tmp_path, "probe", max_steps=1)).dataset
    pixels = np.concatenate([np.asarray(data[i][0]).ravel() for i in range(256)]) * 0.5 + 0.5
    assert abs(edm.mean() - pixels.mean()) < 0.12, (edm.mean(), pixels.mean())
    # the control: the same weights read as a plain eps-network on the same grid give garbage
    wrong = SamplerConfig(sampler="heun", karras_sigmas=True, clip_sample=1.0)
    pipe.sampler_config = wrong
    garbage = pipe(32, steps=12, generator=torch.Generator().manual_seed(0), show_progress=False)
    assert abs(float(garbage.mean()) - pixels.mean()) > 0.2 or float(garbage.std()) < 0.05, float(garbage.mean())


def test_edm_checkpoint_resumes_bit_for_bit(tmp_path):
    straight = Trainer(edm_config(tmp_path, "a", max_steps=4, log_every=1))
    straight.fit()
    first = Trainer(edm_config(tmp_path, "b", max_steps=2, log_every=1))
    first.fit()
    resumed = Trainer(edm_config(tmp_path, "b", max_steps=4, log_every=1), resume="latest")
    assert resumed.step == 2 and resumed.config.diffusion.preconditioning == "edm"
    resumed.fit()
    for k, v in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    a = [r["loss"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl")]
    b = [r["loss"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")]
    assert a == b


def test_edm_options_are_checked():
    with pytest.raises(ConfigError, match="min_snr_gamma"):
        TrainConfig().replace(diffusion={"preconditioning": "edm", "min_snr_gamma": 5.0})
    with pytest.raises(ConfigError, match="prediction_type"):
        TrainConfig().replace(diffusion={"preconditioning": "edm", "prediction_type": "v_prediction"})
    with pytest.raises(ConfigError, match="diffusion.preconditioning"):
        TrainConfig().replace(diffusion={"preconditioning": "karras"})
    with pytest.raises(ConfigError, match="diffusion.p_std"):
        TrainConfig().replace(diffusion={"preconditioning": "edm", "p_std": 0.0})
    assert TrainConfig().diffusion.preconditioning == "none"  # the classic path stays the default


def test_trainer_sample_passes_sampler_options_to_the_sampler(tmp_path):
    trainer = Trainer(edm_config(tmp_path, "opts"))
    plain = trainer.sample(4, steps=6, seed=3, sampler="heun")
    churned = trainer.sample(4, steps=6, seed=3, sampler="heun", sampler_options={"s_churn": 30.0, "s_tmax": 80.0})
    again = trainer.sample(4, steps=6, seed=3, sampler="heun", sampler_options={"s_churn": 30.0, "s_tmax": 80.0})
    torch.testing.assert_close(churned, again)  # seeded: the churn noise comes from the same generator
    assert (churned - plain).abs().max() > 1e-3  # the churn reached the sampler
    with pytest.raises(ConfigError, match="s_churn"):
        trainer.sample(4, steps=6, sampler="euler", sampler_options={"s_churn": 30.0})
