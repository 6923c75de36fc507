"""medgpt.cpu: bf16 on a CPU only where its instruction set has it (the reference is the CPU's own flag list,
/proc/cpuinfo), a timing only confirming it; the measured speed cached per CPU, flags, kernel limits and torch
version, and measured again when one of them changes."""

from __future__ import annotations

import pytest
import torch

import medgpt.cpu
from medgpt.cpu import cpu_has_bf16, cpu_info, cpu_supports_bf16, isa_limits, matmul_speed
from medgpt.models import torch_dtype, training_precision

AVX2_ONLY = ("AMD EPYC", {"avx", "avx2", "fma", "avx512f"})  # no avx512_bf16, no amx_bf16


def test_a_cpu_without_bf16_instructions_never_gets_bf16_whatever_a_timing_says(monkeypatch):
    """A busy machine once measured bf16 faster on an AVX2 CPU and locked every later run into bf16 matmuls that
    are about 400x slower there: the flags decide, the timing is not even taken."""
    monkeypatch.setattr(medgpt.cpu, "cpu_info", lambda: AVX2_ONLY)
    monkeypatch.setattr(medgpt.cpu, "matmul_speed", lambda: {"fp32": 60.0, "bf16": 500.0})  # a noisy timing
    assert not cpu_has_bf16() and not cpu_supports_bf16()
    assert torch_dtype("auto") == torch.float32
    assert training_precision("lora", gpu=False).autocast is None


@pytest.mark.parametrize("flags, native", [({"avx512_bf16"}, True), ({"amx_bf16", "amx_tile"}, True),
                                           ({"fp", "asimd", "bf16"}, True), ({"avx2", "avx512f"}, False)])
def test_the_flags_name_the_bf16_instructions(monkeypatch, tmp_path, flags, native):
    """x86's AVX512-BF16 and AMX, and Arm's BF16 extension, as /proc/cpuinfo lists them (`flags` / `Features`)."""
    field = "Features" if "asimd" in flags else "flags"
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\n{field}\t\t: {' '.join(sorted(flags))}\n\n")
    monkeypatch.setattr(medgpt.cpu, "CPUINFO", cpuinfo)
    assert cpu_info() == ("Some CPU", flags)
    assert cpu_has_bf16() is native


def test_this_machines_speed_is_measured_once_and_agrees_with_its_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDGPT_CACHE", str(tmp_path))
    measured = matmul_speed()
    assert measured["fp32"] > 0 and measured["bf16"] > 0 and measured["seconds"] < 3
    assert len(list((tmp_path / "matmul_speed").glob("*.json"))) == 1
    if not cpu_has_bf16():  # emulated bf16 is far slower than fp32, and never chosen
        assert measured["bf16"] < measured["fp32"] and not cpu_supports_bf16()
    monkeypatch.setattr(medgpt.cpu, "measure_matmul", lambda *a, **k: pytest.fail("measured twice"))
    assert matmul_speed() == measured  # from the cache


def test_the_speed_is_measured_again_when_the_flags_the_kernel_limits_or_torch_change(monkeypatch, tmp_path):
    """`ONEDNN_MAX_CPU_ISA=AVX2` makes an AVX512-BF16 CPU's bf16 matmuls as slow as an AVX2 CPU's: a speed
    measured without the cap must not decide for a process run with it; nor one measured under other flags or
    another torch."""
    monkeypatch.setenv("MEDGPT_CACHE", str(tmp_path))
    for name in medgpt.cpu.ISA_LIMITS:
        monkeypatch.delenv(name, raising=False)
    runs = []
    monkeypatch.setattr(medgpt.cpu, "measure_matmul", lambda dtype, *a, **k: runs.append(dtype) or 100.0)
    monkeypatch.setattr(medgpt.cpu, "cpu_info", lambda: ("Some CPU", {"avx512_bf16"}))
    matmul_speed()
    matmul_speed()
    assert runs == ["fp32", "bf16"]  # measured once
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert isa_limits()["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    matmul_speed()
    monkeypatch.setattr(medgpt.cpu, "cpu_info", lambda: ("Some CPU", {"avx512_bf16", "amx_bf16"}))
    matmul_speed()
    monkeypatch.setattr(torch, "__version__", "99.0")
    matmul_speed()
    assert len(runs) == 8 and len(list((tmp_path / "matmul_speed").glob("*.json"))) == 4
