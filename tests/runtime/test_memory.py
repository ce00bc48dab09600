"""runtime.memory: freed heap memory goes back to the operating system after a model's weights are converted."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from diffusekit.networks.unet import UNET_PRESETS, UNet
from diffusekit.runtime import memory, policy

# 256 MiB in 64-KiB tensors (below glibc's mmap threshold: they live on the heap), all freed but the last, which
# keeps the heap's top in use so that free() alone cannot shrink it; then the resident anonymous memory is read
# before and after release_freed_memory().
CHILD = """
import re, torch
from diffusekit.runtime.memory import release_freed_memory
def anon():
    return int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024
xs = [torch.ones(16384) for _ in range(4096)]
last = xs[-1]
del xs
before = anon()
ran = release_freed_memory()
print(ran, before, anon())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or memory._malloc_trim() is None, reason="needs glibc")
def test_freed_heap_memory_is_returned():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout.split()
    ran, before, after = out[0] == "True", int(out[1]), int(out[2])
    assert ran
    assert before - after > 150, (before, after)  # MiB: most of the 256 freed MiB leave the process


def test_prepare_releases_the_replaced_weights(monkeypatch):
    calls = []
    monkeypatch.setattr(policy, "release_freed_memory", lambda: calls.append(1))
    policy.prepare(UNet(UNET_PRESETS["tiny"]), policy.Plan(dtype=torch.float32))
    assert calls == [1]
