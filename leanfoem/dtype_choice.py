"""The dtype the block forwards compute in: `--dtype {auto,float32,bfloat16}` (issue 17).

Why it exists: a CPU that executes bf16 matmuls natively (Intel AMX-BF16 or AVX512-BF16; the BF16 extension of
Arm) runs the forwards several times faster in bf16 than in fp32, at a quality cost within calibration noise
(docs/BENCHMARKS.md, "bf16 forwards on the CPU"). A CPU without it has torch emulate bf16, and there one bf16
matmul costs ~30× an fp32 one (measured on the project's AMD EPYC). So `auto` takes bf16 on the CPU only when the
CPU's flags say native *and* a short timing probe finds bf16 faster; on an accelerator it keeps the checkpoint's
half type (`pipeline.compute_dtype`).

What must stay true:
- the choice is made once per run, before its fingerprint, and the resolved dtype goes into the fingerprint
  ("compute": {"dtype"}): a resume whose choice differs is refused by the journal, naming the `--dtype` that
  resumes it, so one checkpoint never mixes dtypes;
- only the forwards (and the activation files they read and write) use it: Hessians are accumulated in fp32
  (`hessian.HessianAccumulator` converts each chunk), the factorisation runs in fp64 and the column loop in fp32;
- `decide()` is a pure function of the flags and the timings, so the choice is tested without the machine;
- the probe runs only where the flags say native (an emulated bf16 probe would take a second for nothing) and
  takes well under a second.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

CHOICES = ("auto", "float32", "bfloat16")
# x86 flags in /proc/cpuinfo; "bf16" is the aarch64 "Features" entry of the Arm BF16 extension.
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16", "bf16"})
# bf16 must beat fp32 by this much to be chosen: a bf16 forward also converts its inputs and outputs, and a
# probe this short is noisy. AMX-BF16 runs the probe's matmul several times faster; emulation ~30× slower.
FASTER_BY = 1.3
PROBE_SHAPE = (256, 1024, 1024)  # [tokens, in] @ [in, out]: ~0.5 GFLOP, a few ms in fp32 on two cores
PROBE_REPEATS = 5


@dataclass(frozen=True)
class Choice:
    dtype: torch.dtype
    reason: str  # one line for the run log: why this dtype

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def choose(requested: str, device: torch.device, default: torch.dtype) -> Choice:
    """The forward dtype for `--dtype requested` on `device`; `default` is the device's dtype without detection
    (fp32 on the CPU, the checkpoint's half type on an accelerator)."""
    if requested not in CHOICES:
        raise ValueError(f"--dtype {requested}: choose one of {', '.join(CHOICES)}")
    if requested != "auto":
        return Choice(getattr(torch, requested), f"--dtype {requested}")
    if device.type != "cpu":
        return Choice(default, f"auto: the checkpoint's half type on {device.type}")
    flags = cpu_flags()
    return decide(flags, probe_matmul() if flags & NATIVE_BF16_FLAGS else None)


def decide(flags: set[str] | frozenset[str], timings: tuple[float, float] | None) -> Choice:
    """bf16 when the CPU has a native bf16 flag and the probe's bf16 matmul took at most 1/FASTER_BY of the fp32
    one's time; fp32 otherwise. `timings` is (fp32 seconds, bf16 seconds), None when the probe did not run."""
    native = sorted(set(flags) & NATIVE_BF16_FLAGS)
    if not native:
        return Choice(torch.float32, "auto: this CPU has no native bf16 (no amx_bf16, avx512_bf16 or bf16 flag)")
    if timings is None:
        return Choice(torch.float32, f"auto: this CPU has {', '.join(native)} but bf16 was not timed")
    fp32_seconds, bf16_seconds = timings
    speedup = fp32_seconds / bf16_seconds if bf16_seconds > 0 else float("inf")
    if speedup < FASTER_BY:
        return Choice(torch.float32, f"auto: this CPU has {', '.join(native)} but a bf16 matmul ran only "
                                     f"{speedup:.2f}x as fast as fp32")
    return Choice(torch.bfloat16, f"auto: this CPU has {', '.join(native)} and a bf16 matmul ran {speedup:.1f}x "
                                  "as fast as fp32")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags: /proc/cpuinfo's "flags" (x86) or "Features" (aarch64) line, plus what torch's own
    CPU probe (cpuinfo) reports for AVX512-BF16 where /proc is absent or hides it."""
    flags: set[str] = set()
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                flags.update(value.split())
                break
    except OSError:
        pass
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if probe is not None and probe():
        flags.add("avx512_bf16")
    return flags


def probe_matmul() -> tuple[float, float]:
    """(fp32 seconds, bf16 seconds) of one PROBE_SHAPE matmul, the best of PROBE_REPEATS after a warm-up, on the
    threads the run will use."""
    tokens, inner, outer = PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    best = []
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(tokens, inner, generator=generator).to(dtype)
        b = torch.randn(inner, outer, generator=generator).to(dtype)
        torch.matmul(a, b)  # warm-up: oneDNN builds its kernel on the first call
        times = []
        for _ in range(PROBE_REPEATS):
            started = time.perf_counter()
            torch.matmul(a, b)
            times.append(time.perf_counter() - started)
        best.append(min(times))
    return best[0], best[1]
