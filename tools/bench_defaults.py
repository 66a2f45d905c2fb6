"""Damping and β measured by KL divergence against the fp model, over calibration draws: what the defaults rest on.

    .venv/bin/python tools/bench_defaults.py run [--models smollm2,demo] [--bits 4,3] [--groups 64,128] \\
        [--damps 0.01,0.05] [--betas 0,0.2] | --settings 0.01:0.2,0.05:0.2,0.01:0] [--draws 0,1,2] [--workdir DIR]
    .venv/bin/python tools/bench_defaults.py table [--workdir ...] [--write-docs]

Why KLD: one calibration draw moves SmolLM2-135M's perplexity by ±1.5% from rounding alone, more than the
damping or β choices differ by; KL(P_fp ‖ P_q) per token (`leanfoem eval --reference`) compares the two
distributions token by token and is far less noisy. A draw is the `--seed` of leanfoem's `.txt` windowing (where
the calibration windows fall in the text); every setting sees the same rows in a draw, so settings are compared
draw by draw (paired) and the spread over draws is reported.

Besides numbers, β takes words that put other quantizers in the same table, on the same rows (see METHODS and
PEERS): `rtn`, `auto` (`--beta auto`), `gptaq` (FOEM+GPTAQ, α 0.25, β 0.2), and GPTQModel 7.7.0's
`gptqmodel-gptq` and `gptqmodel-foem` (β 0.2), run by tools/peers.py under LEANFOEM_REF_PYTHON (default
/work/venv-ref/bin/python; its recipe is in tools/bench_compare.py) with fp32 layers on the rows leanfoem's
windowing cuts for the draw, and `bnb-nf4` (bitsandbytes NF4, 4 bit only, its own blocksize 64 whatever the
group; evaluated in transformers by the same figures, tools/peers.py ppl --reference), e.g.
`--settings 0.01:rtn,0.01:0,0.01:0.2,0.01:auto,0.01:gptaq,0.05:gptqmodel-foem,0.01:bnb-nf4`. The damping means
nothing to RTN and NF4, and neither uses calibration: they run once, in the first draw asked, and the other draws
record that result again (marked `same_as_draw`).

Each (model, bits, group, damp, β, draw) is one `leanfoem quantize` and one `leanfoem eval --reference` in its own
process; results are cached one JSON file a run in WORKDIR/results (an interrupted benchmark resumes; the
checkpoint is deleted after its evaluation). The runs go in the order of the arguments' product, the draw
outermost, so a partial run still has every setting in its first draws.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from benchdoc import machine_line, replace_section  # noqa: E402

DOC = ROOT / "docs" / "BENCHMARKS.md"
SECTION = "Defaults: damping and β by KL divergence over calibration draws"
SHARED = ROOT.parent / "shared" / "data"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data")

MODELS = {  # calibration (text, rows, row length) and evaluation (text, seqlen, windows)
    "smollm2": {"calib": SHARED / "corpus" / "war_and_peace.txt", "nsamples": 32, "seqlen": 512,
                "text": SHARED / "wikitext2" / "wiki.test.raw", "eval_seqlen": 512, "windows": 8},
    "demo": {"calib": ROOT / "leanfoem" / "demo" / "calibration.txt", "nsamples": 128, "seqlen": 256,
             "text": ROOT / "leanfoem" / "demo" / "eval.txt", "eval_seqlen": 256, "windows": 40},
}


def model_dir(key: str) -> str:
    if key == "demo":
        return "demo"
    from smollm2 import ensure_smollm2
    return str(ensure_smollm2())


def run_name(model, bits, group, damp, beta, draw) -> str:
    return f"{model}-w{bits}g{group}-damp{damp:g}-beta{shown_beta(beta)}-draw{draw}"


METHODS = {  # the β column's words: leanfoem runs other than FOEM with a fixed β (β = 0 is GPTQ)
    "rtn": ["--method", "rtn"],
    "auto": ["--method", "foem", "--beta", "auto"],
    "gptaq": ["--method", "foem", "--beta", "0.2", "--alpha", "0.25"],
}
DRAW_FREE = {"rtn", "bnb-nf4"}  # no calibration: every draw gives the same result
PEERS = {"gptqmodel-gptq": ("gptq", 0.0), "gptqmodel-foem": ("foem", 0.2)}  # GPTQModel 7.7.0: method, β
LABELS = {"rtn": "RTN", "auto": "FOEM, β auto", "gptaq": "FOEM+GPTAQ (α 0.25, β 0.2)",
          "gptqmodel-gptq": "GPTQModel GPTQ (fp32)", "gptqmodel-foem": "GPTQModel FOEM, β 0.2 (fp32)",
          "bnb-nf4": "bitsandbytes NF4 (blocksize 64)"}
REF_PYTHON = os.environ.get("LEANFOEM_REF_PYTHON", "/work/venv-ref/bin/python")  # with gptqmodel 7.7.0


def parse_beta(text: str) -> float | str:
    """A number, or a word of METHODS, PEERS or bnb-nf4 ("auto": `--beta auto`, chosen per layer)."""
    if text in METHODS or text in PEERS or text == "bnb-nf4":
        return text
    return float(text)


def method_label(beta: float | str) -> str:
    if isinstance(beta, str):
        return LABELS[beta]
    return "GPTQ" if beta == 0 else f"FOEM, β {beta:g}"


def shown_beta(beta: float | str) -> str:
    return beta if isinstance(beta, str) else f"{beta:g}"


def setting_order(setting: tuple) -> tuple:
    """(damp, β) in table order: RTN, numeric β ascending (GPTQ first), auto, GPTAQ, then GPTQModel's."""
    damp, beta = setting
    order = ["rtn", 0.0, "auto", "gptaq", *PEERS, "bnb-nf4"]
    place = order.index(beta) if isinstance(beta, str) else 1
    return place, damp, 0.0 if isinstance(beta, str) else beta


def quantize_and_compare(model: str, out: Path, draw: int, settings: list[str], command: list[str] | None = None,
                         env: dict | None = None, cwd: Path = ROOT, evaluate: list[str] | None = None) -> dict:
    """`leanfoem quantize` of `model` with calibration draw `draw` and `settings` (or another quantizer's `command`),
    then `leanfoem eval --reference` of the output against the model, from the repository in this environment (or a
    peer's `evaluate` command, run in `env` and `cwd` as the quantizer is, that prints the same JSON); the checkpoint
    is removed afterwards. Also used by tools/bench_dtype.py."""
    m = MODELS[model]
    shutil.rmtree(out, ignore_errors=True)
    quantize = command or [sys.executable, "-m", "leanfoem", "quantize", "--model", model_dir(model), "--out",
                           str(out), "--calib", str(m["calib"]), "--nsamples", str(m["nsamples"]), "--seqlen",
                           str(m["seqlen"]), "--seed", str(draw), *settings, "--device", "cpu", "--quiet"]
    started = time.time()
    subprocess.run(quantize, check=True, cwd=cwd, env=env)
    seconds = time.time() - started
    if evaluate is None:
        evaluate, env, cwd = [sys.executable, "-m", "leanfoem", "eval", "--model", str(out), "--reference",
                              model_dir(model), "--text", str(m["text"]), "--seqlen", str(m["eval_seqlen"]),
                              "--windows", str(m["windows"]), "--device", "cpu", "--json"], None, ROOT
    done = subprocess.run(evaluate, check=True, cwd=cwd, env=env, capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    return {"quantize_seconds": round(seconds, 1), "loadavg": os.getloadavg()[0],
            "eval": json.loads(done.stdout.strip().splitlines()[-1]), "quantize_cmd": quantize, "eval_cmd": evaluate}


def run_one(work: Path, model, bits, group, damp, beta, draw) -> dict:
    out = work / f"ckpt-{run_name(model, bits, group, damp, beta, draw)}"  # runs may go in parallel
    shape = ["--bits", str(bits), "--group-size", str(group), "--damp", f"{damp:g}"]
    if beta == "bnb-nf4":
        result = nf4_and_compare(work, model, out, draw)
    elif beta in PEERS:
        result = gptqmodel_and_compare(work, model, out, draw, beta, shape)
    else:
        result = quantize_and_compare(model, out, draw, [*shape, *leanfoem_method(beta)])
    return {"model": model, "bits": bits, "group": group, "damp": damp, "beta": beta, "draw": draw, **result}


def leanfoem_method(beta: float | str) -> list[str]:
    if beta == 0:
        return ["--method", "gptq"]
    if isinstance(beta, str):
        return METHODS[beta]
    return ["--method", "foem", "--beta", shown_beta(beta)]


def gptqmodel_and_compare(work: Path, model: str, out: Path, draw: int, kind: str, shape: list[str]) -> dict:
    """GPTQModel (tools/peers.py, under LEANFOEM_REF_PYTHON) on the very rows leanfoem's `--seed draw` windowing cuts,
    its layers in fp32 as leanfoem computes on this CPU, then `leanfoem eval --reference` as for leanfoem's runs."""
    from bench_compare import calibration_rows, peer_env
    m = MODELS[model]
    path = peer_model_path(model)
    rows = work / "rows" / f"{model}-draw{draw}.jsonl"
    if not rows.exists():
        rows.parent.mkdir(parents=True, exist_ok=True)
        calibration_rows(Path(path), m["calib"], rows, m["nsamples"], m["seqlen"], draw)
    method, beta = PEERS[kind]
    scratch = peer_scratch(work)
    quantize = [REF_PYTHON, str(ROOT / "tools" / "peers.py"), "gptqmodel", "--model", path,
                "--rows", str(rows), "--out", str(out), *shape, "--method", method, "--beta", f"{beta:g}",
                "--alpha", "0", "--dtype", "float32", "--offload-dir", str(scratch / "offload")]
    return quantize_and_compare(model, out, draw, [], command=quantize, env=peer_env(scratch), cwd=scratch)


def nf4_and_compare(work: Path, model: str, out: Path, draw: int) -> dict:
    """bitsandbytes NF4 (tools/peers.py under LEANFOEM_REF_PYTHON), evaluated in transformers with the figures of
    `leanfoem eval --reference` on the same windows: an NF4 model is no GPTQ checkpoint."""
    from bench_compare import peer_env
    m, path, peers = MODELS[model], peer_model_path(model), str(ROOT / "tools" / "peers.py")
    quantize = [REF_PYTHON, peers, "bnb-nf4", "--model", path, "--out", str(out)]
    evaluate = [REF_PYTHON, peers, "ppl", "--model", str(out), "--reference", path, "--text", str(m["text"]),
                "--seqlen", str(m["eval_seqlen"]), "--windows", str(m["windows"])]
    scratch = peer_scratch(work)
    return quantize_and_compare(model, out, draw, [], command=quantize, env=peer_env(scratch), cwd=scratch,
                                evaluate=evaluate)


def peer_scratch(work: Path) -> Path:
    """The peers' working directory (GPTQModel writes its logs into it) and the home of their caches."""
    scratch = work / "gptqmodel-scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    return scratch


def peer_model_path(model: str) -> str:
    """The model's directory for the peers, which know no `demo` alias."""
    return str(ROOT / "leanfoem" / "demo" / "model") if model == "demo" else model_dir(model)


def run(args) -> None:
    results = args.workdir / "results"
    results.mkdir(parents=True, exist_ok=True)
    settings = args.settings or list(itertools.product(args.damps, args.betas))
    grid = itertools.product(args.draws, args.models, args.bits, args.groups, settings)
    for draw, model, bits, group, (damp, beta) in grid:
        path = results / (run_name(model, bits, group, damp, beta, draw) + ".json")
        if path.exists() or (beta == "bnb-nf4" and bits != 4):
            continue
        first = results / (run_name(model, bits, group, damp, beta, args.draws[0]) + ".json")
        if beta in DRAW_FREE and first.exists():
            result = dict(json.loads(first.read_text()), draw=draw, same_as_draw=args.draws[0])
        else:
            result = run_one(args.workdir, model, bits, group, damp, beta, draw)
        path.write_text(json.dumps(result))
        e = result["eval"]
        print(f"{path.stem}: KLD {e['kld_mean']:.5f}, top-1 {e['top1_agreement']:.4f}, ppl {e['perplexity']:.3f} "
              f"(fp {e['reference_perplexity']:.3f}), {result['quantize_seconds']} s", flush=True)


def load_results(workdir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((workdir / "results").glob("*.json"))]


def mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan"))


def table(results: list[dict]) -> str:
    """One table per (model, bits, group): a row per (damp, β) with mean ± s.e. over the draws it has, and the paired
    log-ratio of its KLD (and perplexity) to the best setting's in the draws both have. The best is the lowest mean
    KLD among the settings with the most draws (a setting run on fewer draws is compared on those only)."""
    out = []
    for key in sorted({(r["model"], r["bits"], r["group"]) for r in results}):
        rows = [r for r in results if (r["model"], r["bits"], r["group"]) == key]
        settings = sorted({(r["damp"], r["beta"]) for r in rows}, key=setting_order)
        by = {(r["damp"], r["beta"], r["draw"]): r["eval"] for r in rows}
        draws = {s: sorted(d for (dp, b, d) in by if (dp, b) == s) for s in settings}
        most = max(len(d) for d in draws.values())
        best = min((s for s in settings if len(draws[s]) == most),
                   key=lambda s: statistics.fmean(by[(*s, d)]["kld_mean"] for d in draws[s]))
        shown_draws = sorted({d for ds in draws.values() for d in ds})
        out.append(f"**{key[0]}, {key[1]} bit, group {key[2]}** — draws {', '.join(map(str, shown_draws))}\n")
        out.append("| damp | method | draws | KLD mean (± s.e.) | KLD 99% | top-1 agree | ppl (fp "
                   f"{by[(*best, draws[best][0])]['reference_perplexity']:.3f}) | KLD vs best, paired | "
                   "ppl vs best, paired | quantize s |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for s in settings:
            evals = [by[(*s, d)] for d in draws[s]]
            shared = [d for d in draws[s] if d in draws[best]]
            kld, kse = mean_se([e["kld_mean"] for e in evals])
            p99 = statistics.fmean(e["kld_p99"] for e in evals)
            top, tse = mean_se([e["top1_agreement"] for e in evals])
            ppl, pse = mean_se([e["perplexity"] for e in evals])
            gap, gse = mean_se([math.log(by[(*s, d)]["kld_mean"] / by[(*best, d)]["kld_mean"]) for d in shared])
            pgap, pgse = mean_se([math.log(by[(*s, d)]["perplexity"] / by[(*best, d)]["perplexity"]) for d in shared])
            secs = statistics.fmean(r["quantize_seconds"] for r in rows if (r["damp"], r["beta"]) == s)
            mark = "**" if s == best else ""
            out.append(f"| {mark}{s[0]:g}{mark} | {mark}{method_label(s[1])}{mark} | {len(evals)} | "
                       f"{kld:.5f} ± {kse:.5f} | {p99:.4f} | {top:.2%} ± {tse:.2%} | {ppl:.3f} ± {pse:.3f} | "
                       f"{math.expm1(gap):+.1%} ± {gse:.1%} | {math.expm1(pgap):+.2%} ± {pgse:.2%} | {secs:.0f} |")
        out.append("")
    return "\n".join(out)


def render(results: list[dict], workdir: Path) -> str:
    r0 = results[0]
    loads = [r["loadavg"] for r in results]
    models = sorted({r["model"] for r in results})
    lines = [f"Command: `.venv/bin/python tools/bench_defaults.py run --workdir {workdir} ...` then `... table "
             f"--write-docs` ({machine_line()}; load average after the runs {min(loads):.1f}–{max(loads):.1f}: other "
             "jobs shared the cores, so the seconds are not clean). GPTQ is `--method gptq`; β auto is `--beta auto`, "
             "chosen per layer by held-out error; GPTQModel rows: GPTQModel 7.7.0 (tools/peers.py, fp32 layers, no "
             "act-order, no GAR) on the rows leanfoem's windowing cuts for the draw, evaluated by the same `leanfoem "
             "eval --reference`; bitsandbytes NF4 (4 bit, its blocksize 64 whatever the group, no calibration), "
             "evaluated in transformers by the same figures on the same windows (tools/peers.py ppl --reference). "
             "RTN and NF4 use no calibration: one run stands for every draw. Per model:"]
    for key in models:
        m, example = MODELS[key], next(r for r in results if r["model"] == key)
        lines.append(f"- {key}: calibration {m['nsamples']} × {m['seqlen']} rows of `{Path(m['calib']).name}`, draw N ="
                     f" `--seed N`; KLD on `{Path(m['text']).name}`, first {m['windows']} windows of {m['eval_seqlen']}"
                     f" tokens. Example: `{shown(example['quantize_cmd'])}` then `{shown(example['eval_cmd'])}`")
    lines += ["", "KLD = mean per-token KL(P_fp ‖ P_q) in nats; \"KLD vs best, paired\" = mean over draws of "
              "KLD(setting)/KLD(best setting of the table) in the same draw, − 1 (as log ratios, ± s.e.), and the same for "
              "perplexity: a difference several times its paired s.e. is measured, not noise. Bold: lowest mean "
              "KLD among the settings run on the most draws; a row with fewer draws is compared on the draws it has. "
              "With few draws the s.e. itself is rough (draws − 1 degrees of freedom).", "",
              table(results)]
    del r0
    return "\n".join(lines)


def shown(cmd: list[str]) -> str:
    """A command as the docs show it: `python`, and file paths by their names (they are named above)."""
    return "python " + " ".join(Path(c).name if "/" in c else c for c in cmd[1:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    split = lambda kind: (lambda text: [kind(x) for x in text.split(",")])  # noqa: E731
    r.add_argument("--models", type=split(str), default=["smollm2", "demo"])
    r.add_argument("--bits", type=split(int), default=[4, 3])
    r.add_argument("--groups", type=split(int), default=[64, 128])
    r.add_argument("--damps", type=split(float), default=[0.01, 0.05])
    r.add_argument("--betas", type=split(parse_beta), default=[0.0, 0.2], help="numbers, or auto")
    r.add_argument("--draws", type=split(int), default=[0, 1, 2])
    r.add_argument("--settings", type=lambda text: [(float(x.split(":")[0]), parse_beta(x.split(":")[1]))
                                                     for x in text.split(",")],
                   default=None, help="damp:beta pairs instead of the --damps x --betas product, e.g. "
                                      "0.01:0.2,0.05:0.2,0.01:auto")
    t = sub.add_parser("table")
    t.add_argument("--write-docs", action="store_true")
    t.add_argument("--section", default=SECTION, help="the docs/BENCHMARKS.md section to write")
    for p in (r, t):
        p.add_argument("--workdir", type=Path, default=Path("/tmp/leanfoem-defaults"))
    args = parser.parse_args()
    if args.command == "run":
        run(args)
        return 0
    results = load_results(args.workdir)
    body = render(results, args.workdir)
    print(body)
    if args.write_docs:
        replace_section(DOC, args.section, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
