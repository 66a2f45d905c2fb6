"""Host memory flat in depth: peak RSS of `leanfoem quantize` on a 4-layer and a 16-layer model of the same
width (hidden 2048, random bf16 weights, real tokenizer), and the 16-layer model's own size.

    python tools/bench_memory_depth.py [--layers 4 16] [--workdir /tmp/leanfoem-depth] [--write-docs]

Target (issue "Streaming pipeline"): peak RSS(16 layers) ≤ 1.15 × peak RSS(4 layers), and < the 16-layer
model's size on disk. Peak RSS is the child process's ru_maxrss (what `/usr/bin/time -v` reports).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from benchdoc import machine_line, replace_section  # noqa: E402


def build_llama(out: Path, tokenizer_dir: Path, *, layers: int, hidden: int = 2048, intermediate: int = 5632,
                heads: int = 16, kv_heads: int = 4, max_shard_size: str = "400MB") -> Path:
    """A Llama-shaped checkpoint with random bf16 weights (N(0, 0.02)) and the tokenizer of `tokenizer_dir`; kept
    (not rebuilt) when `out` already holds one, so name `out` after the shape. Also used by tools/bench_scaling.py."""
    if (out / "config.json").exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=2048, tie_word_embeddings=True)
    return save_random_checkpoint(LlamaForCausalLM, config, tokenizer, out, max_shard_size)


def save_random_checkpoint(model_cls, config, tokenizer, out: Path, max_shard_size: str) -> Path:
    """`model_cls(config)` with random bf16 weights (N(0, 0.02), seed 0), built on meta and materialised once, saved
    sharded with the tokenizer. Also used by tools/bench_moe_block.py."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = model_cls(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    return out


def measure(model: Path, out: Path, calib: Path) -> dict:
    cmd = [sys.executable, "-m", "leanfoem", "quantize", "--model", str(model), "--out", str(out), "--calib",
           str(calib), "--nsamples", "8", "--seqlen", "256", "--group-size", "128", "--quiet", "--restart"]
    subprocess.run(["rm", "-rf", str(out)], check=True)
    # Through tools/rss_probe.py, a process without torch: a child inherits its parent's RSS high-water mark at exec,
    # and this process has imported torch and may just have built the model (see rss_probe.py).
    probe = [sys.executable, str(ROOT / "tools" / "rss_probe.py"), "--interval", "1", "--"]
    lines = subprocess.run(probe + cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.splitlines()
    result = json.loads(lines[-1])
    return {"seconds": result["seconds"], "peak_rss_bytes": result["peak_rss_bytes"], "command": " ".join(cmd[1:])}


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
        model = build_llama(args.workdir / f"llama-{args.one}L", args.tokenizer, layers=args.one)
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
