"""What this CPU can do in bf16: its instruction-set flags and a measured matmul speed, cached per CPU, kernel
limits, torch version and thread count. `auto` precision on a CPU (`medgpt.models.torch_dtype`,
`training_precision`) asks `cpu_supports_bf16`: bf16 only where the CPU has the instructions for it and a
measurement confirms it pays. Heavy libraries are imported inside functions."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from medgpt.files import cache_dir, read_json, value_digest, write_json

log = logging.getLogger(__name__)


def cpu_supports_bf16() -> bool:
    """True where this CPU has bf16 instructions (`cpu_has_bf16`) and bf16 matmuls measurably outrun fp32 ones
    there (the cached `matmul_speed` check). A CPU without the instructions never gets bf16, however a noisy
    timing came out: torch emulates bf16 on it, hundreds of times slower than fp32."""
    if not cpu_has_bf16():
        return False
    speed = matmul_speed()
    return speed["bf16"] > BF16_PAYS * speed["fp32"]


BF16_PAYS = 1.2  # bf16 must beat fp32 by this factor to be chosen (its rounding costs accuracy)
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86's AVX512-BF16 and AMX; Arm's BF16 extension
CPUINFO = Path("/proc/cpuinfo")
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def cpu_info() -> tuple[str, set[str]]:
    """This CPU's model name and instruction-set flags (x86 `flags`, Arm `Features`) from /proc/cpuinfo; no
    flags where it cannot be read (then bf16 is never chosen on the CPU)."""
    import platform

    try:
        text = CPUINFO.read_text()
    except OSError:
        text = ""
    lines = text.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith(("model name", "Model"))),
                 platform.processor() or platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith(("flags", "Features"))), [])
    return model, set(flags)


def cpu_has_bf16() -> bool:
    return bool(cpu_info()[1] & set(CPU_BF16_FLAGS))


def isa_limits() -> dict:
    """The environment variables that cap the instruction sets of torch's CPU kernels (ATen, oneDNN, MKL), and
    torch's resulting CPU capability: `ONEDNN_MAX_CPU_ISA=AVX2` makes an AVX512-BF16 CPU's bf16 matmuls as slow as
    an AVX2 CPU's, so a measured speed holds only under the same limits."""
    import torch

    limits = {name: os.environ[name] for name in ISA_LIMITS if os.environ.get(name)}
    return {**limits, "capability": torch.backends.cpu.get_cpu_capability()}


def measure_matmul(dtype: str, size: int = 256, budget_s: float = 0.1) -> float:
    """GFLOP/s of `size` x `size` matmuls in `dtype` on this CPU, with the threads torch uses: the best of
    repeated runs after a warm-up, stopping once `budget_s` is spent."""
    import torch

    a = torch.randn(size, size).to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    b = torch.randn(size, size).to(a.dtype)
    torch.mm(a, b)  # warm-up: kernel selection, page faults
    best, spent = float("inf"), 0.0
    while spent < budget_s or best == float("inf"):
        start = time.perf_counter()
        torch.mm(a, b)
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
    return 2 * size**3 / best / 1e9


def matmul_speed() -> dict:
    """fp32 and bf16 matmul GFLOP/s of this CPU, measured once (about 0.3 s) and cached in the medgpt cache,
    keyed by CPU model, flags, the instruction-set limits of torch's kernels, torch version and thread count, so
    it is measured again when any of them changes; it confirms bf16 where the CPU has the instructions for it."""
    import torch

    model, flags = cpu_info()
    limits = isa_limits()
    key = value_digest([model, sorted(flags), limits, torch.__version__, torch.get_num_threads()])[:16]
    path = cache_dir() / "matmul_speed" / f"{key}.json"
    cached = read_json(path, {})
    if cached:
        return cached
    start = time.perf_counter()
    fp32 = measure_matmul("fp32")
    bf16 = measure_matmul("bf16", budget_s=0.05)
    result = {"cpu": model, "torch": torch.__version__, "threads": torch.get_num_threads(), "limits": limits,
              "fp32": round(fp32, 2), "bf16": round(bf16, 2), "seconds": round(time.perf_counter() - start, 3)}
    write_json(path, result)
    log.info("matmul speed of this CPU: fp32 %.1f, bf16 %.1f GFLOP/s (cached in %s)", fp32, bf16, path)
    return result
