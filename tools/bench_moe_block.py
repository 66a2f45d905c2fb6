"""One mixture-of-experts block of Qwen3-30B-A3B's shape on this machine: time, peak RSS against the planner's
forecast, and the expert-group size the planner chose.

    python tools/bench_moe_block.py [--layers 1] [--nsamples 16] [--seqlen 512] [--workdir /tmp/leanfoem-moe]
        [--expert-calibration all] [--write-docs]

The checkpoint is Qwen3-MoE (hidden 2048, 32 heads of 128 / 4 kv heads, 128 experts of 768, top-8) with random
bf16 weights (N(0, 0.02)) and the bundled demo tokenizer, built once and kept in the work dir. Peak RSS is the
child's ru_maxrss through tools/rss_probe.py; the forecast is `leanfoem plan --device cpu` for the same settings
(its `host_peak_bytes`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from bench_memory_depth import save_random_checkpoint  # noqa: E402
from benchdoc import machine_line, replace_section  # noqa: E402

SHAPE = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
             moe_intermediate_size=768, num_experts_per_tok=8, intermediate_size=6144)


def build_qwen3_moe(out: Path, tokenizer_dir: Path, layers: int) -> Path:
    """Kept (not rebuilt) when `out` already holds one."""
    if (out / "config.json").exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen3MoeConfig(vocab_size=len(tokenizer), num_hidden_layers=layers, max_position_embeddings=4096,
                            tie_word_embeddings=True, **SHAPE)
    return save_random_checkpoint(Qwen3MoeForCausalLM, config, tokenizer, out, "500MB")


def run(cmd: list[str]) -> dict:
    probe = [sys.executable, str(ROOT / "tools" / "rss_probe.py"), "--interval", "1", "--"]
    lines = subprocess.run(probe + cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.splitlines()
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--expert-calibration", default="all")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/leanfoem-moe"))
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    from leanfoem.models import demo_model_dir
    model = build_qwen3_moe(args.workdir / f"qwen3-moe-30b-shape-{args.layers}L", demo_model_dir(), args.layers)
    calib = ROOT.parent / "shared" / "data" / "corpus" / "war_and_peace.txt"
    common = ["--model", str(model), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--calib",
              str(calib)]
    plan = subprocess.run([sys.executable, "-m", "leanfoem", "plan", *common, "--device", "cpu", "--json"],
                          check=True, stdout=subprocess.PIPE, text=True).stdout.splitlines()
    forecast = json.loads(plan[-1])
    out = args.workdir / "out"
    shutil.rmtree(out, ignore_errors=True)  # a finished output of the same settings would be taken as done
    cmd = [sys.executable, "-m", "leanfoem", "quantize", *common, "--out", str(out), "--restart", "--quiet",
           "--expert-calibration", args.expert_calibration]
    measured = run(cmd)
    events = [json.loads(line) for line in (out / "quantize_log.jsonl").read_text().splitlines()]
    group = next(e["group"] for e in events if e["event"] == "experts")
    ratio = measured["peak_rss_bytes"] / forecast["host_peak_bytes"]
    lines = [f"Command: `python tools/bench_moe_block.py --layers {args.layers} --nsamples {args.nsamples} "
             f"--seqlen {args.seqlen} --expert-calibration {args.expert_calibration}` ({machine_line()}).",
             "",
             "| layers | tokens | expert group | time | peak RSS | planner's host forecast | measured / forecast |",
             "|---|---|---|---|---|---|---|",
             f"| {args.layers} | {args.nsamples * args.seqlen} | {group} | {measured['seconds']:.1f} s | "
             f"{measured['peak_rss_bytes'] / 2**30:.2f} GiB | {forecast['host_peak_bytes'] / 2**30:.2f} GiB | "
             f"{ratio:.2f} |"]
    print("\n".join(lines))
    print(json.dumps({"measured": measured, "forecast_host_peak_bytes": forecast["host_peak_bytes"],
                      "expert_group": group, "ratio": ratio}))
    if args.write_docs:
        replace_section(ROOT / "docs" / "BENCHMARKS.md", "A Qwen3-30B-A3B-shaped block on the CPU", "\n".join(lines))


if __name__ == "__main__":
    main()
