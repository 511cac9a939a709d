"""The choices and the numbers hold on CPUs without AVX-512, tried on any machine.

PyTorch reads ATEN_CPU_CAPABILITY (default, avx2, avx512) and oneDNN ONEDNN_MAX_CPU_ISA (AVX2, ...) when
torch is imported, and both then run the kernels of a CPU that has no more than that: the tests marked
`numerics` run again in such processes, and the precision chosen there must be fp32. The CPU's own flags
(torch.cpu._is_avx512_bf16_supported) do not follow the caps, so a choice made from them alone would train
in emulated bf16 there.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medqa import hardware

ROOT = Path(__file__).resolve().parent.parent
# ATen's kernels of an AVX2 CPU with oneDNN's of an AVX2 CPU (AMD Zen 3, Intel before Skylake-SP), and
# ATen's scalar kernels (no vector extension at all)
CAPS = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
        "default": {"ATEN_CPU_CAPABILITY": "default"}}


def capped(caps: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env={**os.environ, **caps}, capture_output=True,
                          text=True, timeout=1200)


@pytest.mark.parametrize("name", CAPS)
def test_a_cpu_held_below_avx512_trains_in_fp32(name):
    code = ("import torch; from medqa import hardware; "
            "print(torch.backends.cpu.get_cpu_capability(), hardware.Plan.default(torch.device('cpu')).precision)")
    done = capped(CAPS[name], "-c", code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [CAPS[name]["ATEN_CPU_CAPABILITY"].upper(), "fp32"]


# what torch reports on: this CPU, an AMD Zen 3, this CPU under each cap, an Intel Xeon with AMX
CPUS = {"avx512-bf16": (True, False, "AVX512", True, True), "zen3-avx2": (False, False, "AVX2", False, False),
        "avx512-bf16 capped to avx2": (True, False, "AVX2", False, False),
        "avx512-bf16, ATen capped to default": (True, False, "DEFAULT", True, False),
        "xeon-amx": (False, True, "AVX512", True, True)}


@pytest.mark.parametrize("cpu", CPUS)
def test_bf16_counts_as_native_where_the_cpu_has_it_and_the_kernels_may_use_it(cpu, monkeypatch):
    avx512_bf16, amx, capability, onednn_bf16, native = CPUS[cpu]
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn_bf16)
    caps = hardware.capabilities(torch.device("cpu"))
    assert caps.native_bf16 is native
    assert hardware.choose_precision(caps)[0] == ("bf16" if native else "fp32")


@pytest.mark.parametrize("name", CAPS)
def test_the_numerical_tests_pass_on_the_kernels_of_a_cpu_without_avx512(name):
    done = capped(CAPS[name], "-m", "pytest", "tests", "-m", "numerics", "-p", "no:randomly")
    assert done.returncode == 0, done.stdout[-4000:]
    assert f"ATen {CAPS[name]['ATEN_CPU_CAPABILITY'].upper()}" in done.stdout  # the cap took effect there
