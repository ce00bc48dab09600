"""The power-function EMA (EDM2) as the trainer's ema.kind 'power': snapshots on disk, the tracked averages in
checkpoints (resume stays exact), and ``diffusekit ema-reconstruct`` writing a model folder that samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffusekit.cli.main import main
from diffusekit.errors import ConfigError
from diffusekit.io.weights import load_weights
from diffusekit.training.checkpoint import load_checkpoint, resolve_checkpoint
from diffusekit.training.config import TrainConfig
from diffusekit.training.export import load_for_sampling
from diffusekit.training.monitor import read_metrics
from diffusekit.training.power_ema import SNAPSHOT_DIR, TRACKED_PREFIX, gamma_of_sigma_rel, list_snapshots, power_beta
from diffusekit.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def power_config(tmp_path, name: str, **run) -> TrainConfig:
    return TrainConfig().replace(
        data={"source": "bundled", "resolution": 8, "limit": 256},
        model={"preset": "test-tiny", "class_conditional": False},
        optim={"batch_size": 16, "warmup_steps": 2, "lr": 2e-3},
        ema={"kind": "power", "sigma_rels": [0.05, 0.10], "snapshot_every": 10},
        run={"output_dir": str(tmp_path / name), "max_steps": 30, "checkpoint_every": 25, "log_every": 5,
             "progress": False, "tensorboard": False, "mixed_precision": "no", **run},
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("power_ema_run")
    trainer = Trainer(power_config(tmp, "run"))
    result = trainer.fit()
    return tmp, trainer, result


def test_snapshots_are_written_every_snapshot_every_steps_and_at_checkpoints(trained):
    tmp, trainer, result = trained
    snapshots = list_snapshots(result.run_dir / SNAPSHOT_DIR)
    assert [s.step for s in snapshots] == [10, 20, 25, 30]  # 25: the checkpoint of step 25
    assert all(s.sigma_rels == (0.05, 0.10) for s in snapshots)
    last = load_weights(snapshots[-1].path)
    for k, average in enumerate(trainer.power_ema.averages):
        for name, v in average.state_dict().items():
            assert torch.equal(last[f"{k}/{name}"], v.float().cpu()), name


def test_the_checkpoint_holds_every_tracked_average_and_the_export_is_the_first(trained):
    tmp, trainer, result = trained
    ckpt = load_checkpoint(resolve_checkpoint(result.run_dir))
    first, second = (avg.state_dict() for avg in trainer.power_ema.averages)
    for name, v in first.items():
        assert torch.equal(ckpt.ema[name], v.cpu()), name
        assert torch.equal(ckpt.ema[f"{TRACKED_PREFIX}1/{name}"], second[name].cpu()), name
    assert any(not torch.equal(first[n], second[n]) for n in first)  # two different averages
    # the logged decay is the first profile's beta_t
    record = read_metrics(result.run_dir / "metrics.jsonl")[-1]
    assert record["ema_decay"] == pytest.approx(power_beta(30, gamma_of_sigma_rel(0.05)))
    # a checkpoint samples with its first average, as the export does
    from_ckpt = load_for_sampling(result.checkpoint)
    for name, v in from_ckpt.unet.state_dict().items():
        assert torch.equal(v, first[name].cpu()), name
    exported = load_for_sampling(result.export_dir)
    for name, v in exported.unet.state_dict().items():
        assert torch.equal(v, first[name].cpu()), name


def test_resume_restores_every_tracked_average_bit_for_bit(tmp_path):
    straight = Trainer(power_config(tmp_path, "a", max_steps=14, checkpoint_every=7))
    straight.fit()
    first = Trainer(power_config(tmp_path, "b", max_steps=7, checkpoint_every=7))
    first.fit()
    resumed = Trainer(power_config(tmp_path, "b", max_steps=14, checkpoint_every=7), resume="latest")
    assert resumed.step == 7
    resumed.fit()
    for a, b in zip(straight.power_ema.averages, resumed.power_ema.averages):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name


def test_ema_reconstruct_writes_a_model_folder_that_samples(trained, tmp_path, capsys):
    tmp, trainer, result = trained
    out = tmp_path / "ema010"
    assert main(["ema-reconstruct", str(result.run_dir), "--sigma-rel", "0.10", "--out", str(out)]) == 0
    assert "profile error 0.00 %" in capsys.readouterr().out
    # a tracked sigma_rel comes back as the tracked average (float32 snapshots: within rounding)
    net = load_for_sampling(out).unet
    second = trainer.power_ema.averages[1].state_dict()
    for name, v in net.state_dict().items():
        torch.testing.assert_close(v, second[name].cpu(), rtol=1e-5, atol=1e-6)
    # an intermediate one samples images like the export's
    mid = tmp_path / "ema007"
    assert main(["ema-reconstruct", str(result.run_dir), "--sigma-rel", "0.07", "--out", str(mid)]) == 0
    pipe = load_for_sampling(mid)
    images = pipe(4, steps=4, generator=torch.Generator().manual_seed(0), show_progress=False)
    assert images.shape == (4, 1, 8, 8) and np.isfinite(images.numpy()).all()


def test_ema_reconstruct_names_the_option_at_fault(trained, tmp_path, capsys):
    tmp, trainer, result = trained
    run = str(result.run_dir)
    cases = [
        (["--sigma-rel", "0.5", "--out", str(tmp_path / "x")], "--sigma-rel"),
        (["--sigma-rel", "0.07", "--step", "5", "--out", str(tmp_path / "x")], "--step"),
    ]
    for extra, option in cases:
        assert main(["ema-reconstruct", run, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("diffusekit ema-reconstruct: error:") and option in err, err
    classic = tmp_path / "classic"
    classic.mkdir()
    assert main(["ema-reconstruct", str(classic), "--sigma-rel", "0.07", "--out", str(tmp_path / "x")]) == 2
    assert "ema.kind" in capsys.readouterr().err


def test_power_ema_options_are_checked():
    with pytest.raises(ConfigError, match="ema.kind"):
        TrainConfig().replace(ema={"kind": "karras"})
    with pytest.raises(ConfigError, match=r"ema.sigma_rels\[1\]"):
        TrainConfig().replace(ema={"kind": "power", "sigma_rels": [0.05, 0.4]})
    with pytest.raises(ConfigError, match="ema.snapshot_every"):
        TrainConfig().replace(ema={"kind": "power", "snapshot_every": 0})
    assert TrainConfig().ema.kind == "classic"  # the classic EMA stays the default


def test_the_train_command_takes_the_power_ema_options(tmp_path, capsys):
    base = ["train", "--data", "bundled", "--output-dir", str(tmp_path / "run"), "--print-config"]
    assert main([*base, "--ema-kind", "power", "--ema-sigma-rels", "0.04", "0.12", "--ema-snapshot-every-steps",
                 "50"]) == 0  # fmt: skip
    ema = json.loads(capsys.readouterr().out)["ema"]
    assert (ema["kind"], ema["sigma_rels"], ema["snapshot_every"]) == ("power", [0.04, 0.12], 50)
    assert main([*base, "--ema-kind", "power", "--ema-sigma-rels", "0.05", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffusekit train: error:") and "--ema-sigma-rels" in err and "0.28" in err, err
