"""How good is `leanfoem plan`? Its host-memory forecast for device=cpu against the peak RSS of real
`leanfoem quantize` runs on this CPU, over models of different widths, plus the Llama-3.3-70B plan.

    python tools/bench_planner.py [--workdir /tmp/leanfoem-planner] [--skip-smollm2] [--only NAME ...] [--fresh]
                                  [--write-docs]

A measurement is stored in WORKDIR/measured and reused by a later run of the very same command (so the cases can
be measured in separate, even concurrent, invocations: peak RSS does not depend on CPU contention); --fresh drops them.

Target (issue "Evaluation, memory planner"): every forecast within ±30% of the measured peak RSS. Peak RSS is
the child process's ru_maxrss, what `/usr/bin/time -v` reports as "Maximum resident set size"; each run is a
fresh process. Writes the section "Memory planner accuracy" of docs/BENCHMARKS.md with --write-docs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from benchdoc import machine_line, replace_section  # noqa: E402

from leanfoem.planner import format_plan, format_size, plan  # noqa: E402

DEMO = ROOT / "leanfoem" / "demo"
LLAMA_33_70B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
PLAN_70B_ARGS = "--gpu-memory 24GiB --host-memory 32GiB --nsamples 128 --seqlen 2048"

# (name, factory arguments or None for SmolLM2, nsamples, seqlen, calibration file)
CASES = [
    ("factory h128 i256 L2", dict(hidden=128, intermediate=256, heads=4, kv_heads=2, layers=2), 16, 128, "demo"),
    ("factory h512 i1536 L2", dict(hidden=512, intermediate=1536, heads=8, kv_heads=4, layers=2), 16, 128, "demo"),
    ("factory h1024 i4096 L2", dict(hidden=1024, intermediate=4096, heads=16, kv_heads=4, layers=2), 32, 256, "demo"),
    ("factory h2048 i5632 L1", dict(hidden=2048, intermediate=5632, heads=16, kv_heads=4, layers=1), 16, 256, "demo"),
    ("SmolLM2-135M", None, 8, 256, "demo"),
    ("SmolLM2-135M, War and Peace calibration", None, 8, 256, "war_and_peace"),
]


def calib_path(name: str) -> Path:
    return DEMO / "calibration.txt" if name == "demo" else ROOT.parent / "shared" / "data" / "corpus" / f"{name}.txt"


def peak_rss(cmd: list[str]) -> tuple[int, float]:
    """ru_maxrss of `cmd` run as the only child of a fresh interpreter (bytes), and its wall time."""
    probe = ("import resource, subprocess, sys, time; t = time.time(); subprocess.run(sys.argv[1:], check=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, time.time() - t)")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True).stdout
    rss, seconds = out.strip().splitlines()[-1].split()
    return int(rss), float(seconds)


def run_case(name, factory_args, nsamples, seqlen, calib, workdir: Path) -> dict:
    if factory_args is None:
        sys.path.insert(0, str(ROOT / "tools"))
        from smollm2 import ensure_smollm2
        model = Path(ensure_smollm2())
    else:
        from factory import build_checkpoint
        model = workdir / name.replace(" ", "-")
        if not (model / "config.json").exists():
            build_checkpoint(model, DEMO / "model", max_shard_size="50MB", **factory_args)
    out = workdir / ("out-" + name.replace(" ", "-").replace(",", ""))
    subprocess.run(["rm", "-rf", str(out)], check=True)
    calib = calib_path(calib)
    args = ["--nsamples", str(nsamples), "--seqlen", str(seqlen), "--group-size", "128"]
    cmd = [sys.executable, "-m", "leanfoem", "quantize", "--model", str(model), "--out", str(out), "--calib",
           str(calib), *args, "--quiet"]
    forecast = plan(model, device="cpu", nsamples=nsamples, seqlen=seqlen, group_size=128, batch_tokens=4096,
                    calib_bytes=calib.stat().st_size)  # 4096: quantize's default --batch-tokens
    cache = workdir / "measured" / (out.name + ".json")  # a measurement is reused only for the very same command
    known = json.loads(cache.read_text()) if cache.exists() else {}
    if known.get("cmd") == cmd:
        measured, seconds = known["measured"], known["seconds"]
    else:
        measured, seconds = peak_rss(cmd)
        cache.parent.mkdir(exist_ok=True)
        cache.write_text(json.dumps({"cmd": cmd, "measured": measured, "seconds": seconds}))
    subprocess.run(["rm", "-rf", str(out)], check=True)
    return {"name": name, "args": " ".join(args) + f" --calib {calib.name}", "forecast": forecast.host_peak_bytes,
            "phase": forecast.host_peak_phase, "measured": measured, "ratio": forecast.host_peak_bytes / measured,
            "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/leanfoem-planner"))
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--only", nargs="*", help="names of the cases to run")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--fresh", action="store_true", help="measure again even where a measurement of the same "
                                                             "command is stored in the workdir")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        subprocess.run(["rm", "-rf", str(args.workdir / "measured")], check=True)
    results = []
    for case in CASES:
        if args.skip_smollm2 and case[1] is None or args.only and case[0] not in args.only:
            continue
        started = time.time()
        results.append(run_case(*case, workdir=args.workdir))
        r = results[-1]
        print(f"{r['name']}: forecast {format_size(r['forecast'])}, measured {format_size(r['measured'])}, "
              f"ratio {r['ratio']:.3f} ({time.time() - started:.0f} s)", flush=True)
    (args.workdir / "results.json").write_text(json.dumps(results, indent=1))
    plan_70b = plan(LLAMA_33_70B, device="cuda", gpu_memory="24GiB", host_memory="32GiB", nsamples=128, seqlen=2048)
    text_70b = format_plan(plan_70b, "Llama-3.3-70B")
    print(text_70b)
    worst = max(abs(r["ratio"] - 1) for r in results)
    verdict = (f"Worst forecast error **{worst:.0%}** (target ±30%: {'met' if worst <= 0.3 else '**missed**'}).")
    print(verdict)
    if not args.write_docs:
        return
    rows = "\n".join(f"| {r['name']} | `{r['args']}` | {r['forecast'] / 2**20:.0f} | {r['measured'] / 2**20:.0f} | "
                     f"{r['ratio']:.2f} | {r['phase']} |" for r in results)
    replace_section(ROOT / "docs" / "BENCHMARKS.md", "Memory planner accuracy", f"""Command: `python tools/bench_planner.py --write-docs` ({machine_line()}).
Each row: `leanfoem plan` (device cpu, from config.json only) forecasts the host peak of `leanfoem quantize` (FOEM β = 0.2,
4 bit, group 128, CPU, fp32 blocks); then the real run, in its own process, gives its peak RSS (ru_maxrss, what
`/usr/bin/time -v` reports). Factory models are Llama-shaped with random bf16 weights and the demo tokenizer.

| model | quantize arguments | forecast (MiB) | measured peak RSS (MiB) | forecast / measured | forecast peak phase |
|---|---|---|---|---|---|
{rows}

{verdict} On small models the peak is the start (python + torch + transformers ~270 MiB, the tokenizer ~150–190 MiB,
the tokenized calibration text ~150 bytes per text byte); from hidden ~2048 up it is the block work (fp32 block, the
forward batch, the down_proj Hessian and its fp64 factorisation buffer).

Llama-3.3-70B, 128 × 2048 calibration tokens, `leanfoem plan --model <dir with its config.json> {PLAN_70B_ARGS}`
(the device side checked against the H100 measurement of "Pipeline on a GPU": 16.9 GiB allocated at the down_proj
factorisation, which the plan reproduces plus 0.75 GiB for the CUDA context; the host side's CUDA overhead is an
estimate, not measured on a GPU machine):

```
{text_70b}
```
""")


if __name__ == "__main__":
    main()
