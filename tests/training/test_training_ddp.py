"""Distributed data parallel: 2 CPU processes (gloo) == 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffusekit.io.weights import load_weights
from diffusekit.training.monitor import read_metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 40)
    images = rng.integers(0, 80, (40, 8, 8), dtype=np.uint8)
    images[np.arange(40), 2 * labels + 1] = 255
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    common = ["train", "--data", str(tmp_path / "d.npz"), "--preset", "test-tiny", "--steps", "4",
              "--grad-accum-steps", "2", "--min-snr-gamma", "5", "--random-flip", "--lr", "1e-3",
              "--warmup-steps", "1", "--checkpoint-every-steps", "4", "--log-every-steps", "1", "--no-progress",
              "--no-tensorboard", "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    one = subprocess.Popen([sys.executable, "-m", "diffusekit", *common, "--batch-size", "6", "--output-dir",
                            str(tmp_path / "one")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)  # fmt: skip
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "diffusekit",
                          *common, "--batch-size", "3", "--output-dir", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    out, err = one.communicate(timeout=300)
    assert one.returncode == 0, err
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es) = 12 per step" in two.stderr

    a = tmp_path / "one" / "checkpoints" / "step-00000004"
    b = tmp_path / "two" / "checkpoints" / "step-00000004"
    for name in ("model.safetensors", "ema.safetensors"):
        ta, tb = load_weights(a / name), load_weights(b / name)
        assert ta.keys() == tb.keys()
        for k in ta:
            torch.testing.assert_close(tb[k], ta[k], rtol=1e-4, atol=1e-5, msg=f"{name}:{k}")
    sa, sb = (json.loads((p / "state.json").read_text()) for p in (a, b))
    assert sa["data_position"] == sb["data_position"] == 4 * 2 * 6
    la = [r["loss"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl")]
    lb = [r["loss"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl")]
    assert len(lb) == 4  # rank 0 alone writes
    np.testing.assert_allclose(lb, la, rtol=1e-4)
