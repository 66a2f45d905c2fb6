"""Host memory flat in depth: peak RSS of `leanfoem quantize` on a 4-layer and a 16-layer model of the same
width (hidden 2048, random bf16 weights, real tokenizer), and the 16-layer model's own size.

    python tools/bench_memory_depth.py [--layers 4 16] [--workdir /tmp/leanfoem-depth] [--write-docs]

Target (issue "Streaming pipeline"): peak RSS(16 layers) ≤ 1.15 × peak RSS(4 layers), and < the 16-layer
model's size on disk. Peak RSS is the child process's ru_maxrss (what `/usr/bin/time -v` reports).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from benchdoc import machine_line, replace_section  # noqa: E402


def build(out: Path, layers: int, tokenizer_dir: Path) -> Path:
    if (out / "config.json").exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    model.save_pretrained(out, max_shard_size="400MB")
    tokenizer.save_pretrained(out)
    return out


def measure(model: Path, out: Path, calib: Path) -> dict:
    cmd = [sys.executable, "-m", "leanfoem", "quantize", "--model", str(model), "--out", str(out), "--calib",
           str(calib), "--nsamples", "8", "--seqlen", "256", "--group-size", "128", "--quiet", "--restart"]
    subprocess.run(["rm", "-rf", str(out)], check=True)
    started = time.time()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(cmd, check=True)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kib <= before:
        raise RuntimeError("ru_maxrss of children did not grow; run each size in a fresh process")
    return {"seconds": time.time() - started, "peak_rss_bytes": peak_kib * 1024, "command": " ".join(cmd[1:])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/leanfoem-depth"))
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "leanfoem" / "demo" / "model")
    parser.add_argument("--calib", type=Path, default=ROOT / "leanfoem" / "demo" / "calibration.txt")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one size
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    if args.one:
        model = build(args.workdir / f"llama-{args.one}L", args.one, args.tokenizer)
        print(json.dumps(measure(model, args.workdir / f"out-{args.one}L", args.calib)))
        return
    results = {}
    for layers in args.layers:  # each size in its own process: ru_maxrss of children is a high-water mark
        line = subprocess.run([sys.executable, __file__, "--one", str(layers), "--workdir", str(args.workdir),
                               "--tokenizer", str(args.tokenizer), "--calib", str(args.calib)],
                              check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[layers] = json.loads(line)
        size = sum(p.stat().st_size for p in (args.workdir / f"llama-{layers}L").glob("*.safetensors"))
        results[layers]["model_bytes"] = size
        print(layers, results[layers], flush=True)
    small, large = min(results), max(results)
    ratio = results[large]["peak_rss_bytes"] / results[small]["peak_rss_bytes"]
    rows = "\n".join(f"| {n} | {r['model_bytes'] / 2**30:.2f} | {r['peak_rss_bytes'] / 2**30:.2f} | {r['seconds']:.0f} |"
                     for n, r in sorted(results.items()))
    verdict = (f"peak RSS {large} layers / {small} layers = **{ratio:.3f}** (target ≤ 1.15); {large}-layer peak RSS is "
               f"{results[large]['peak_rss_bytes'] / results[large]['model_bytes']:.2f}× its own size (target < 1).")
    print(verdict)
    if args.write_docs:
        replace_section(ROOT / "docs" / "BENCHMARKS.md", "Host memory versus depth", f"""Command: `python tools/bench_memory_depth.py --write-docs` ({machine_line()}).
Llama-shaped models, hidden 2048, intermediate 5632, 16 heads / 4 kv heads, random bf16 weights, the demo tokenizer;
each run `leanfoem quantize --nsamples 8 --seqlen 256 --group-size 128` (FOEM β = 0.2, 4 bit) on the CPU, in its own
process; peak RSS is the process's ru_maxrss.

| layers | model size (GiB) | peak RSS (GiB) | wall time (s) |
|---|---|---|---|
{rows}

{verdict}
""")


if __name__ == "__main__":
    main()
