"""leanfoem against GPTQModel on a small Qwen3-MoE checkpoint: same rows, same machine, same run; time and peak RSS.

    python tools/bench_moe_compare.py [--method foem] [--nsamples 16] [--seqlen 256] [--ref-python PY]
        [--expert-calibration all,routed]
        [--workdir /tmp/leanfoem-moe-compare] [--write-docs]

The checkpoint: Qwen3-MoE, 4 layers, hidden 512, 8 heads of 64 / 2 kv heads, 32 experts of 256, top-4, random bf16
weights (N(0, 0.02); routers N(0, 0.5) so that the tokens spread) and the bundled demo tokenizer, built once. Both
tools get the same token rows (leanfoem's `.txt` windowing of War and Peace, written as `input_ids` .jsonl), 4 bit,
group 64, symmetric, damping 0.05, FOEM β = 0.2 (or GPTQ). leanfoem runs once per `--expert-calibration` mode:
"all" (its default: every expert's statistics from every token, top-k/E more expert compute than GPTQModel does)
and "routed" (each expert's own tokens, the statistics GPTQModel computes). GPTQModel runs in the reference venv (see
tools/bench_compare.py) through tools/peers.py, once at its own dtype choice and once in fp32 like leanfoem on this
CPU; an untimed warm-up builds its C++ kernels first. Times and peaks through tools/rss_probe.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))
from bench_compare import PEERS, calibration_rows, run_measured  # noqa: E402
from benchdoc import machine_line, replace_section  # noqa: E402

SHAPE = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
             num_experts=32, moe_intermediate_size=256, num_experts_per_tok=4, intermediate_size=1024)


def build(out: Path) -> Path:
    if (out / "config.json").exists():
        return out
    from leanfoem.models import demo_model_dir
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
    config = Qwen3MoeConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=True,
                            **SHAPE)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    for name, p in model.named_parameters():
        p.data.normal_(0, 0.5 if name.endswith("mlp.gate.weight") else 0.02)
    model.save_pretrained(out, max_shard_size="50MB")
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=["foem", "gptq"], default="foem")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--ref-python", default="/work/venv-ref/bin/python")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/leanfoem-moe-compare"))
    parser.add_argument("--expert-calibration", default="all,routed")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    model = build(work / "qwen3-moe-small")
    text = ROOT.parent / "shared" / "data" / "corpus" / "war_and_peace.txt"
    rows = calibration_rows(model, text, work / "rows.jsonl", args.nsamples, args.seqlen, seed=0)
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    peer_env = dict(base, GPTQMODEL_CPU_WORKERS="2", GPTQMODEL_CACHE_DIR=str(work / "gptqmodel-cache"),
                    GPTQMODEL_TORCH_EXTENSIONS_DIR=str(work / "gptqmodel-ext"))
    beta = ["--beta", "0.2", "--alpha", "0"] if args.method == "foem" else []

    def peer(out: Path, dtype: str, rows_file: Path = rows) -> list[str]:
        shutil.rmtree(out, ignore_errors=True)
        return [args.ref_python, str(PEERS), "gptqmodel", "--model", str(model), "--rows", str(rows_file), "--out",
                str(out), "--bits", "4", "--group-size", "64", "--method", args.method, "--damp", "0.05",
                "--offload-dir", str(work / "offload"), *beta] + ([] if dtype == "auto" else ["--dtype", dtype])

    few = work / "warmup-rows.jsonl"
    few.write_text("".join(rows.read_text().splitlines(keepends=True)[:2]))
    run_measured(peer(work / "warmup", "auto", few), work / "logs" / "warmup", peer_env, work)
    runs = {}
    for mode in args.expert_calibration.split(","):
        out = work / f"leanfoem-{mode}"
        shutil.rmtree(out, ignore_errors=True)
        lean = [sys.executable, "-m", "leanfoem", "quantize", "--model", str(model), "--out", str(out), "--calib",
                str(rows), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--bits", "4",
                "--group-size", "64", "--method", args.method, "--damp", "0.05", "--device", "cpu", "--quiet",
                "--expert-calibration", mode, *beta]
        runs[f"leanfoem ({mode})"] = run_measured(lean, work / "logs" / f"leanfoem-{mode}",
                                                  dict(base, PYTHONPATH=str(ROOT)), ROOT)
    for dtype in ("auto", "float32"):
        runs[f"gptqmodel ({dtype})"] = run_measured(peer(work / f"gptqmodel-{dtype}", dtype),
                                                     work / "logs" / f"gptqmodel-{dtype}", peer_env, work)
    lean_run = next(iter(runs.values()))
    lines = [f"Command: `python tools/bench_moe_compare.py --method {args.method} --nsamples {args.nsamples} "
             f"--seqlen {args.seqlen}` ({machine_line()}). Qwen3-MoE, 4 layers, hidden 512, 32 experts of 256, "
             f"top-4, random weights; {args.nsamples} × {args.seqlen} rows, 4 bit, group 64, {args.method}.", "",
             f"| tool | time | peak RSS | {next(iter(runs))}: time / this row's | {next(iter(runs))}: peak / this row's |",
             "|---|---|---|---|---|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['seconds']:.1f} s | {r['peak_rss_bytes'] / 2**30:.2f} GiB | "
                     f"{lean_run['seconds'] / r['seconds']:.2f} | "
                     f"{lean_run['peak_rss_bytes'] / r['peak_rss_bytes']:.2f} |")
    print("\n".join(lines))
    print(json.dumps({k: {"seconds": v["seconds"], "peak_rss_bytes": v["peak_rss_bytes"],
                          "loadavg_before": v["loadavg_before"]} for k, v in runs.items()}))
    if args.write_docs:
        replace_section(ROOT / "docs" / "BENCHMARKS.md", "Mixture of experts: leanfoem and GPTQModel side by side",
                        "\n".join(lines))


if __name__ == "__main__":
    main()
