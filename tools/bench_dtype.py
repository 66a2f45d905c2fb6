"""The quality cost of bf16 forwards during quantization on the CPU, over calibration draws (issue 17).

    .venv/bin/python tools/bench_dtype.py run [--models demo] [--draws 0,1,2,3,4] [--workdir DIR]
    .venv/bin/python tools/bench_dtype.py table [--workdir DIR]

For each draw (the `--seed` of the calibration windows) the model is quantized twice, `--dtype float32` and
`--dtype bfloat16`, everything else at leanfoem's defaults (FOEM β = 0.2, 4 bit, group 128, damping 0.01) and the
rows of bench_defaults.py's MODELS; each checkpoint is then evaluated against the full-precision model by
`leanfoem eval --reference` (perplexity, KL divergence per token, top-1 agreement; the evaluation itself computes in
fp32). Both dtypes see the same rows in a draw, so they are compared draw by draw (paired): the table gives each
figure's mean ± standard error over the draws, and the mean ± s.e. of the paired difference bf16 − fp32.
Results are cached one JSON file a run in WORKDIR (an interrupted benchmark resumes). On a CPU without native bf16
the bf16 runs are slow (torch emulates bf16): their times say nothing about a CPU that has it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from bench_defaults import quantize_and_compare  # noqa: E402
from benchdoc import machine_line  # noqa: E402

DTYPES = ("float32", "bfloat16")
FIGURES = (("perplexity", "perplexity", 3), ("kld_mean", "KLD mean", 7), ("top1_agreement", "top-1 agreement", 4))


def run_one(work: Path, model: str, dtype: str, draw: int) -> dict:
    out = work / f"ckpt-{model}-{dtype}-draw{draw}"
    return {"model": model, "dtype": dtype, "draw": draw,
            **quantize_and_compare(model, out, draw, ["--dtype", dtype])}


def run(work: Path, models: list[str], draws: list[int]) -> None:
    work.mkdir(parents=True, exist_ok=True)
    for draw in draws:
        for model in models:
            for dtype in DTYPES:
                path = work / f"{model}-{dtype}-draw{draw}.json"
                if path.exists():
                    continue
                result = run_one(work, model, dtype, draw)
                path.write_text(json.dumps(result, indent=1))
                print(f"{path.name}: perplexity {result['eval']['perplexity']:.3f}, "
                      f"KLD {result['eval']['kld_mean']:.5f}, {result['quantize_seconds']} s", flush=True)


def mean_se(values: list[float], digits: int, signed: bool = False) -> str:
    mean, se = statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))
    return f"{mean:{'+' if signed else ''}.{digits}f} ± {se:.{digits}f}"


def bf16_line() -> str:
    from leanfoem.dtype_choice import NATIVE_BF16_FLAGS, choose, cpu_flags
    import torch
    native = sorted(cpu_flags() & NATIVE_BF16_FLAGS)
    auto = choose("auto", torch.device("cpu"), torch.float32)
    return (f"native bf16: {', '.join(native) if native else 'no (no amx_bf16, avx512_bf16 or bf16 flag)'}; "
            f"`--dtype auto` chooses {auto.name} here")


def table(work: Path) -> str:
    results = [json.loads(p.read_text()) for p in sorted(work.glob("*-draw*.json"))]
    lines = [machine_line(), bf16_line(), ""]
    for model in sorted({r["model"] for r in results}):
        by = {(r["dtype"], r["draw"]): r for r in results if r["model"] == model}
        draws = sorted(d for d in {d for _, d in by} if all((t, d) in by for t in DTYPES))
        if len(draws) < 2:
            continue
        lines += [f"{model}: {len(draws)} draws (seeds {', '.join(map(str, draws))}), mean ± s.e.", "",
                  "| figure | float32 | bfloat16 | bf16 − fp32 (paired) |", "|---|---|---|---|"]
        for key, label, digits in FIGURES:
            fp32, bf16 = ([by[(t, d)]["eval"][key] for d in draws] for t in DTYPES)
            diffs = [b - a for a, b in zip(fp32, bf16)]
            lines.append(f"| {label} | {mean_se(fp32, digits)} | {mean_se(bf16, digits)} | "
                         f"{mean_se(diffs, digits, signed=True)} |")
        fp32, bf16 = ([by[(t, d)]["quantize_seconds"] for d in draws] for t in DTYPES)
        lines.append(f"| quantize wall time (s) | {mean_se(fp32, 1)} | {mean_se(bf16, 1)} | "
                     f"{mean_se([b - a for a, b in zip(fp32, bf16)], 1, signed=True)} |")
        lines.append("")
        lines.append("per draw (perplexity fp32 / bf16): " + "; ".join(
            f"seed {d}: {by[('float32', d)]['eval']['perplexity']:.3f} / {by[('bfloat16', d)]['eval']['perplexity']:.3f}"
            for d in draws))
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["run", "table"])
    parser.add_argument("--models", default="demo")
    parser.add_argument("--draws", default="0,1,2,3,4")
    parser.add_argument("--workdir", default="/tmp/leanfoem-bench-dtype")
    args = parser.parse_args()
    work = Path(args.workdir)
    if args.action == "run":
        run(work, args.models.split(","), [int(d) for d in args.draws.split(",")])
    print(table(work))


if __name__ == "__main__":
    main()
