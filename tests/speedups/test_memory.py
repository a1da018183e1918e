"""keep_freed_cpu_memory: freed tensors are reused without page faults (glibc only)."""

import os
import subprocess
import sys

import pytest

from smca_d2.speedups.memory import glibc_malloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocates and frees 4 x 32 MiB tensors per "step" (above glibc's largest mmap threshold) and
# counts the minor page faults of three steps after five warm-up steps.
SCRIPT = """
import resource, sys
import torch
sys.path.insert(0, {repo!r})
from smca_d2.speedups.memory import keep_freed_cpu_memory
applied = keep_freed_cpu_memory() if sys.argv[1] == "keep" else None

def step():
    tensors = [torch.ones(8 * 2**20) for _ in range(4)]
    return sum(float(t[-1]) for t in tensors)

for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

glibc_only = pytest.mark.skipif(not glibc_malloc(), reason="glibc malloc settings")


def _run(mode, **env):
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")
    }
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(repo=REPO), mode],
        capture_output=True,
        text=True,
        env={**clean, **env},
        check=True,
    ).stdout.split()
    return out[0], int(out[1])


@glibc_only
def test_freed_memory_is_reused_without_page_faults():
    applied, faults = _run("keep")
    _, default_faults = _run("default")
    assert applied == "True"
    # 3 steps x 128 MiB = 98,304 pages faulted in again by default; none once memory is kept.
    assert default_faults > 50_000
    assert faults < 1_000


@glibc_only
def test_malloc_settings_chosen_in_the_environment_are_left_alone():
    applied, faults = _run("keep", MALLOC_TOP_PAD_="131072")
    assert applied == "False"
    assert faults > 50_000
