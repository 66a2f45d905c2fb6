"""Summarises bench_compare runs over several calibration draws: the perplexity gap between two runs, draw by draw,
with its mean and standard error.

    python tools/bench_draws.py /tmp/bc /tmp/bc-seed1 /tmp/bc-seed2 ... [--write-docs]

Each argument is a bench_compare `--workdir` (one `--calib-seed` each). Why a separate summary: on SmolLM2-135M
one draw's FOEM perplexity moves by ±3% with the calibration rows (and with the thread count), more than the 1%
the pipeline target asks for, so a single draw cannot say whether the two tools differ; the mean over draws can.
The gap of a draw is B's perplexity over A's, minus one; the mean and its standard error are taken over the log
ratios (a gap of +x% and one of −x% cancel) and shown as percentages.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import scipy.stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchdoc import machine_line, replace_section  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"
SECTION = "FOEM perplexity over calibration draws"


def read_draw(workdir: Path, model: str, bits: int, run: str) -> dict | None:
    path = workdir / model / "results" / f"w{bits}-{run}.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    evals = result.get("evals", {})
    if not evals:
        return None
    key, first = next(iter(evals.items()))
    return {"perplexity": first["perplexity"], "eval": key, "rows": result["settings"]["rows_sha256"]}


def summarise(workdirs: list[Path], model: str, bits: int, a: str, b: str) -> tuple[list[dict], dict]:
    draws = []
    for workdir in workdirs:
        first, second = read_draw(workdir, model, bits, a), read_draw(workdir, model, bits, b)
        if first is None or second is None:
            print(f"{workdir}: no {a} / {b} result with an evaluation yet, skipped", file=sys.stderr)
            continue
        if first["rows"] != second["rows"] or first["eval"] != second["eval"]:
            raise SystemExit(f"{workdir}: the two runs saw different calibration rows or evaluations")
        draws.append({"draw": workdir.name, "a": first["perplexity"], "b": second["perplexity"],
                      "log_ratio": math.log(first["perplexity"] / second["perplexity"]), "eval": first["eval"]})
    if len(draws) < 2:
        raise SystemExit("need at least two draws with both runs evaluated")
    logs = [d["log_ratio"] for d in draws]
    mean, se = statistics.fmean(logs), statistics.stdev(logs) / math.sqrt(len(logs))
    half = scipy.stats.t.ppf(0.975, len(logs) - 1) * se  # two-sided 95% Student t interval
    stats = {"draws": len(draws), "mean_gap": math.expm1(mean), "se": se, "low": math.expm1(mean - half),
             "high": math.expm1(mean + half), "a_wins": sum(1 for x in logs if x < 0),
             "mean_a": statistics.fmean(d["a"] for d in draws), "mean_b": statistics.fmean(d["b"] for d in draws)}
    return draws, stats


def render(draws: list[dict], stats: dict, a: str, b: str, command: str) -> str:
    lines = [f"Command: `{command}` ({machine_line()}). Each draw is the `--workdir` of one `python "
             f"tools/bench_compare.py --models smollm2 --bits 4 --eval-windows 16 --runs {a},{b} --calib-seed N` "
             f"(its own N): 32 windows of 512 tokens of War and Peace, the same rows to both tools; 4 bit, group 64, "
             f"β = 0.2; perplexity on wikitext-2 ({draws[0]['eval']}).", "",
             f"| draw | {a} | {b} | gap |", "|---|---|---|---|"]
    for d in draws:
        lines.append(f"| {d['draw']} | {d['a']:.2f} | {d['b']:.2f} | {math.expm1(d['log_ratio']):+.1%} |")
    lines.append(f"| mean of {stats['draws']} | {stats['mean_a']:.2f} | {stats['mean_b']:.2f} | "
                 f"**{stats['mean_gap']:+.1%}** |")
    lines += ["", f"Gap = {a} / {b} − 1, averaged as log ratios: **{stats['mean_gap']:+.2%}**, standard error "
              f"{stats['se']:.2%}, 95% interval {stats['low']:+.2%} to {stats['high']:+.2%}; {a} has the lower "
              f"perplexity in {stats['a_wins']} of {stats['draws']} draws."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", type=Path)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--a", default="leanfoem-foem", help="bench_compare run whose perplexity is compared")
    parser.add_argument("--b", default="gptqmodel-foem-fp32", help="the run it is compared against")
    parser.add_argument("--write-docs", action="store_true", help=f"write the '{SECTION}' section of BENCHMARKS")
    args = parser.parse_args()
    draws, stats = summarise(args.workdirs, args.model, args.bits, args.a, args.b)
    command = "python tools/bench_draws.py " + " ".join(str(w) for w in args.workdirs)
    body = render(draws, stats, args.a, args.b, command)
    print(body)
    if args.write_docs:
        replace_section(DOC, SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
