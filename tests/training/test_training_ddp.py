"""Distributed data parallel: 2 CPU processes (gloo) compute what 1 process computes with the same global batch.

What DDP must guarantee, checked in a way that holds on every CPU:

* the all-reduced gradient of an optimizer step equals the single-process gradient up to float
  rounding (per tensor, relative to its norm); the local gradient of one rank alone does not (the control:
  the check can tell a missing all-reduce);
* the reported loss and gradient norm agree to float rounding; the data stream positions agree exactly;
* a few optimizer steps stay close. Adam with its default epsilon is not a fair judge of that: it divides
  by sqrt(v), so a gradient component of ~1e-9 (e.g. of a zero-initialised output convolution) whose sign
  depends on the summation order becomes a step of a whole learning rate on one CPU and of minus one on
  another. With epsilon = 1e-3 the step lr * m / (sqrt(v) + eps) changes by at most lr * |dg| / eps when the
  gradient changes by dg, so rounding-sized gradient differences stay rounding-sized in the weights.

The two runs use different oneDNN instruction sets (the single process is limited to AVX2), so the claims are
checked across kernels, as they would be across machines.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusekit.io.weights import load_weights
from diffusekit.training.monitor import read_metrics

# `diffusekit train ARGS...` in-process, recording the gradients of the second optimizer step (at the first
# only the zero-initialised output convolution has one): the local one of this rank (before DDP's all-reduce,
# through a communication hook) and the one the optimizer sees
RUNNER = textwrap.dedent(
    """
    import sys
    import torch
    from safetensors.torch import save_file
    from diffusekit.cli.main import build_parser
    from diffusekit.cli.train import config_from_args
    from diffusekit.training.trainer import Trainer

    out = sys.argv[1]
    trainer = Trainer(config_from_args(build_parser().parse_args(sys.argv[2:])))
    names = {p: n for n, p in trainer.model.named_parameters()}
    local, seen, steps = {}, {}, [0]

    if trainer.ddp_model is not None:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def record_local(state, bucket):
            if steps[0] == 1:  # the bucket holds each gradient flat, in its parameter's memory layout
                buffer, offset = bucket.buffer(), 0
                for p in bucket.parameters():
                    g = buffer.as_strided(p.shape, p.stride(), buffer.storage_offset() + offset)
                    local["local." + names[p]] = g.detach().contiguous().clone()
                    offset += p.numel()
            return allreduce_hook(state, bucket)

        trainer.ddp_model.register_comm_hook(None, record_local)

    def record_step(optimizer, args, kwargs):
        steps[0] += 1
        if steps[0] == 2:
            seen.update({"grad." + names[p]: p.grad.detach().contiguous().clone() for p in trainer.model.parameters()})
            save_file({**seen, **local}, f"{out}-rank{trainer.env.rank}.safetensors")

    trainer.optimizer.register_step_pre_hook(record_step)
    trainer.fit()
    from diffusekit.training.distributed import shutdown

    shutdown(trainer.env)  # as the training commands do: exiting inside the group can abort in gloo's teardown
    """
)

GRAD_RTOL = 1e-5  # per tensor, ||g_2 - g_1|| / ||g_1||; measured 9.1e-7 (float32 rounding of two summation orders)
WEIGHT_ATOL = 1e-5  # after 4 steps of lr 1e-3 and Adam eps 1e-3; measured 1.5e-8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _relative_errors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str) -> dict[str, float]:
    """||a - b|| / ||b|| for every tensor named ``prefix...`` of ``b`` whose norm is not zero."""
    errors = {}
    for key, ref in b.items():
        if key.startswith(prefix) and float(ref.norm()) > 0:
            errors[key] = float((a[key] - ref).norm() / ref.norm())
    return errors


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_processes_compute_the_gradient_of_one_process_with_the_same_global_batch(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 40)
    images = rng.integers(0, 80, (40, 8, 8), dtype=np.uint8)
    images[np.arange(40), 2 * labels + 1] = 255
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    # float32 (the claim is about summation order; "auto" precision is bf16 on some CPUs and float32 on others);
    # no gradient clipping: the recorded gradients are the raw ones (the clipping factor comes from the
    # gradient norm, compared below); Adam's epsilon as explained in the module docstring
    (tmp_path / "cfg.json").write_text(
        json.dumps({"optim": {"eps": 1e-3, "grad_clip_norm": None}, "run": {"mixed_precision": "no"}})
    )
    (tmp_path / "runner.py").write_text(RUNNER)
    common = ["train", "--config", str(tmp_path / "cfg.json"), "--data", str(tmp_path / "d.npz"), "--preset",
              "test-tiny", "--steps", "4", "--grad-accum-steps", "2", "--min-snr-gamma", "5", "--random-flip",
              "--lr", "1e-3", "--warmup-steps", "1", "--checkpoint-every-steps", "4", "--log-every-steps", "1",
              "--no-progress", "--no-tensorboard", "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    runner = str(tmp_path / "runner.py")
    one = subprocess.Popen([sys.executable, runner, str(tmp_path / "one"), *common, "--batch-size", "6",
                            "--output-dir", str(tmp_path / "one")], env={**env, "ONEDNN_MAX_CPU_ISA": "AVX2"},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), runner,
                          str(tmp_path / "two"), *common, "--batch-size", "3", "--output-dir", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    out, err = one.communicate(timeout=300)
    assert one.returncode == 0, err
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es) = 12 per step" in two.stderr

    # the gradient of step 2: all-reduced over 2 processes == 1 process, to float rounding
    g1 = load_file(str(tmp_path / "one-rank0.safetensors"))
    g2 = [load_file(str(tmp_path / f"two-rank{r}.safetensors")) for r in (0, 1)]
    errors = _relative_errors(g2[0], g1, "grad.")
    assert len(errors) > 10 and max(errors.values()) < GRAD_RTOL, sorted(errors.items(), key=lambda kv: -kv[1])[:3]
    assert _relative_errors(g2[1], g1, "grad.") == pytest.approx(errors, abs=GRAD_RTOL)  # rank 1 has it too
    # control: the local gradient of one rank (half of the global batch) is far from it ...
    local = {"grad." + k.removeprefix("local."): v for k, v in g2[0].items() if k.startswith("local.")}
    assert local.keys() == {k for k in g1 if k.startswith("grad.")}
    assert np.median(list(_relative_errors(local, g1, "grad.").values())) > 1000 * GRAD_RTOL
    # ... and the mean of the two local ones is the all-reduced one
    mean = {k: (v + g2[1]["local." + k.removeprefix("grad.")]) / 2 for k, v in local.items()}
    assert max(_relative_errors(mean, g2[0], "grad.").values()) < GRAD_RTOL

    # what is reported and where the data stream stands
    ma, mb = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in mb] == [1, 2, 3, 4]  # rank 0 alone writes
    np.testing.assert_allclose(mb[0]["grad_norm"], ma[0]["grad_norm"], rtol=GRAD_RTOL)
    np.testing.assert_allclose([r["loss"] for r in mb], [r["loss"] for r in ma], rtol=1e-5)
    a = tmp_path / "one" / "checkpoints" / "step-00000004"
    b = tmp_path / "two" / "checkpoints" / "step-00000004"
    sa, sb = (json.loads((p / "state.json").read_text()) for p in (a, b))
    assert sa["data_position"] == sb["data_position"] == 4 * 2 * 6

    # a few steps later the weights are still the same to rounding (the bound: see the module docstring)
    for name in ("model.safetensors", "ema.safetensors"):
        ta, tb = load_weights(a / name), load_weights(b / name)
        assert ta.keys() == tb.keys()
        for k in ta:
            torch.testing.assert_close(tb[k], ta[k], rtol=0, atol=WEIGHT_ATOL, msg=f"{name}:{k}")
