"""Time and peak memory of `leanfoem quantize` versus depth (layers) and width (hidden size), fitted and plotted,
plus the memory-over-time trace of one run.

    python tools/bench_scaling.py [--depths 2 4 8 16] [--widths 1024 2048 3072 4096] [--trace 1024 8]
                                  [--workdir /tmp/leanfoem-scaling] [--fresh] [--write-docs]
    python tools/bench_scaling.py --quick      # smoke run: hidden 256/512, 1-2 layers, plots in WORKDIR/plots

Models: Llama-shaped, random bf16 weights, the demo tokenizer (tools/bench_memory_depth.build_llama); intermediate
≈ 2.75 × hidden rounded to a multiple of 128, head_dim 128, kv heads = heads / 4 (Llama-3's shape; hidden 4096 is
Llama-3-8B's block). Depth sweep: hidden 1024 at each of --depths; width sweep: --width-layers (2) layers at each of
--widths. Each run: `leanfoem quantize --nsamples 8 --seqlen 256 --group-size 128` (FOEM β = 0.2, 4 bit, CPU) in
its own process, started through tools/rss_probe.py (a process without torch, so its child's ru_maxrss is the run's
own: see there), which also samples the run's RSS every 0.1 s. From OUT/quantize_log.jsonl: the seconds of each
block and the time each block ended. Next to each measurement: `leanfoem plan --json`'s forecast of the host peak
for the same command.

Fits (numpy.polyfit): wall time = a + b·layers; peak RSS = a + b·layers (b in MiB per layer: ~0 if memory is flat in
depth); seconds per block = c·hidden^k (log-log, the exponent k); peak RSS = a + b·hidden². Plots (matplotlib,
~100 dpi): scaling_depth.png, scaling_width.png, memory_trace.png, in WORKDIR/plots, and in docs/ with --write-docs,
which also writes the section "Scaling with depth and width" of docs/BENCHMARKS.md.

A finished run is stored in WORKDIR/results/<model>.json and reused by a later invocation when the quantize command
is the same (--fresh measures again); leanfoem's git commit is stored with it and named in the docs section. Run it
on a quiet machine: time is measured, so other jobs on the same cores change it (memory they do not). The load
average before each run is recorded and shown.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from bench_memory_depth import build_llama  # noqa: E402
from benchdoc import machine_line, replace_section  # noqa: E402

DEMO = ROOT / "leanfoem" / "demo"
MIB, GIB = 1 << 20, 1 << 30
QUANTIZE_ARGS = ["--nsamples", "8", "--seqlen", "256", "--group-size", "128"]
SECTION = "Scaling with depth and width"
PLOTS = ("scaling_depth.png", "scaling_width.png", "memory_trace.png")


# -- models and runs --------------------------------------------------------------------------------------------------
def shape(hidden: int) -> dict:
    """Llama-like proportions for a hidden size (a multiple of 128)."""
    heads = max(1, hidden // 128)
    return {"hidden": hidden, "intermediate": 128 * max(1, round(2.75 * hidden / 128)), "heads": heads,
            "kv_heads": max(1, heads // 4)}


def model_name(hidden: int, layers: int) -> str:
    s = shape(hidden)
    return f"llama-h{hidden}-i{s['intermediate']}-L{layers}"


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "--",
                                "leanfoem"], check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+local changes" if dirty else "")


def forecast(model: Path, calib: Path) -> dict:
    """`leanfoem plan --json` for the same settings as the run (device cpu, this machine's RAM as the budget)."""
    cmd = [sys.executable, "-m", "leanfoem", "plan", "--model", str(model), "--device", "cpu", "--calib", str(calib),
           *QUANTIZE_ARGS, "--json"]
    plan = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout.splitlines()[-1])
    return {"host_peak_bytes": plan["host_peak_bytes"], "host_peak_phase": plan["host_peak_phase"],
            "batch_tokens": plan["batch_tokens"]}


def read_log(path: Path) -> dict:
    """Block lines of quantize_log.jsonl: seconds, end time and RSS of each block; when the block loop started
    and when the run was done; solver seconds per module kind (q_proj, ..., summed over blocks)."""
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    blocks = [{"index": e["index"], "seconds": e["seconds"], "end": e["time"], "rss_gib": e["rss_gib"]}
              for e in events if e["event"] == "block"]
    solver: dict[str, float] = {}
    for e in events:
        if e["event"] == "module":
            kind = e["module"].rsplit(".", 1)[-1]
            solver[kind] = round(solver.get(kind, 0.0) + e["seconds"], 3)
    start = next(e["time"] for e in events if e["event"] == "start")
    done = next((e["time"] for e in events if e["event"] == "done"), None)
    return {"blocks": blocks, "loop_start": start, "done": done, "solver_seconds": solver}


def run_one(hidden: int, layers: int, workdir: Path, tokenizer: Path, calib: Path, fresh: bool) -> tuple[dict, bool]:
    """The run's result, and whether it was stored by an earlier invocation."""
    name = model_name(hidden, layers)
    cache = workdir / "results" / f"{name}.json"
    model = workdir / "models" / name
    out = workdir / "out" / name
    cmd = [sys.executable, "-m", "leanfoem", "quantize", "--model", str(model), "--out", str(out), "--calib",
           str(calib), *QUANTIZE_ARGS, "--quiet", "--restart"]
    if cache.exists() and not fresh:
        known = json.loads(cache.read_text())
        if known.get("cmd") == cmd:
            return known, True
    s = shape(hidden)
    build_llama(model, tokenizer, layers=layers, hidden=hidden, intermediate=s["intermediate"], heads=s["heads"],
                kv_heads=s["kv_heads"])
    model_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    plan = forecast(model, calib)
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    samples_file = workdir / "results" / f"{name}.samples.json"
    samples_file.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    probe = [sys.executable, str(ROOT / "tools" / "rss_probe.py"), "--interval", "0.1", "--samples",
             str(samples_file), "--"]
    # cwd=ROOT: `-m leanfoem` runs this checkout's leanfoem, whatever is installed.
    probed = json.loads(subprocess.run(probe + cmd, check=True, stdout=subprocess.PIPE, text=True,
                                       cwd=ROOT).stdout.splitlines()[-1])
    log = read_log(out / "quantize_log.jsonl")
    samples = json.loads(samples_file.read_text())
    samples_file.unlink()
    shutil.rmtree(out)
    result = {"name": name, "hidden": hidden, "layers": layers, **s, "cmd": cmd, "commit": git_commit(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_before": round(load, 2),
              "model_bytes": model_bytes, "seconds": probed["seconds"], "peak_rss_bytes": probed["peak_rss_bytes"],
              "sampled_peak_bytes": probed["sampled_peak_bytes"], "forecast": plan, **log,
              "started": samples[0][0] if samples else None, "samples": samples}
    cache.write_text(json.dumps(result))
    return result, False


def block_seconds(r: dict) -> float:
    return sum(b["seconds"] for b in r["blocks"]) / len(r["blocks"])


# -- fits and plots ---------------------------------------------------------------------------------------------------
def fit_depth(runs: list[dict]) -> dict:
    import numpy as np
    layers = np.array([r["layers"] for r in runs], float)
    wall = np.array([r["seconds"] for r in runs])
    rss = np.array([r["peak_rss_bytes"] for r in runs]) / MIB
    if len(runs) < 2:
        return {}
    (b, a), (rb, ra) = np.polyfit(layers, wall, 1), np.polyfit(layers, rss, 1)
    return {"wall_a": a, "wall_b": b, "rss_a": ra, "rss_b": rb}


def fit_width(runs: list[dict]) -> dict:
    import numpy as np
    if len(runs) < 2:
        return {}
    hidden = np.array([r["hidden"] for r in runs], float)
    per_block = np.array([block_seconds(r) for r in runs])
    rss = np.array([r["peak_rss_bytes"] for r in runs]) / MIB
    k, log_c = np.polyfit(np.log(hidden), np.log(per_block), 1)
    rb, ra = np.polyfit((hidden / 1024) ** 2, rss, 1)
    return {"k": k, "c": float(np.exp(log_c)), "rss_a": ra, "rss_b": rb}


def plot_depth(runs: list[dict], fit: dict, path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np
    layers = [r["layers"] for r in runs]
    x = np.linspace(0, max(layers) * 1.05, 50)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.plot(layers, [r["seconds"] for r in runs], "o", label="wall time")
    left.plot(layers, [sum(b["seconds"] for b in r["blocks"]) for r in runs], "s", mfc="none",
              label="sum of block times")
    if fit:
        left.plot(x, fit["wall_a"] + fit["wall_b"] * x, "-", color="C0", lw=1,
                  label=f"fit {fit['wall_a']:.0f} s + {fit['wall_b']:.1f} s/layer")
    left.set(xlabel="layers", ylabel="seconds", title=f"time, hidden {runs[0]['hidden']}", xlim=(0, None),
             ylim=(0, None))
    left.legend(fontsize=8)
    right.plot(layers, [r["peak_rss_bytes"] / GIB for r in runs], "o", label="peak RSS (measured)")
    right.plot(layers, [r["forecast"]["host_peak_bytes"] / GIB for r in runs], "x", label="forecast (leanfoem plan)")
    right.plot(layers, [r["model_bytes"] / GIB for r in runs], "^--", color="gray", lw=1, label="model size on disk")
    if fit:
        right.plot(x, (fit["rss_a"] + fit["rss_b"] * x) / 1024, "-", color="C0", lw=1,
                   label=f"fit: {fit['rss_b']:+.1f} MiB/layer")
    right.set(xlabel="layers", ylabel="GiB", title="host memory", xlim=(0, None), ylim=(0, None))
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_width(runs: list[dict], fit: dict, path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import FormatStrFormatter, LogLocator
    hidden = [r["hidden"] for r in runs]
    x = np.linspace(min(hidden) * 0.9, max(hidden) * 1.1, 50)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.loglog(hidden, [block_seconds(r) for r in runs], "o", label="seconds per block")
    left.loglog(hidden, [sum(r["solver_seconds"].values()) / len(r["blocks"]) for r in runs], "s", mfc="none",
                label="of which solver (7 linears)")
    if fit:
        left.loglog(x, fit["c"] * x ** fit["k"], "-", color="C0", lw=1, label=f"fit ∝ hidden^{fit['k']:.2f}")
    left.set(xlabel="hidden size", ylabel="seconds", title=f"time per block ({_layers(runs[0]['layers'])})")
    left.set_xticks(hidden, [str(h) for h in hidden])
    left.minorticks_off()
    left.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    left.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    left.legend(fontsize=8)
    right.plot(hidden, [r["peak_rss_bytes"] / GIB for r in runs], "o", label="peak RSS (measured)")
    right.plot(hidden, [r["forecast"]["host_peak_bytes"] / GIB for r in runs], "x", label="forecast (leanfoem plan)")
    right.plot(hidden, [r["model_bytes"] / GIB for r in runs], "^--", color="gray", lw=1, label="model size on disk")
    if fit:
        right.plot(x, (fit["rss_a"] + fit["rss_b"] * (x / 1024) ** 2) / 1024, "-", color="C0", lw=1,
                   label=f"fit {fit['rss_a']:.0f} MiB + {fit['rss_b']:.0f} MiB·(h/1024)²")
    right.set(xlabel="hidden size", ylabel="GiB", title="host memory", ylim=(0, None))
    right.set_xticks(hidden, [str(h) for h in hidden])
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_trace(r: dict, path: Path) -> None:
    import matplotlib.pyplot as plt
    samples = [(t, rss) for t, rss in r["samples"] if rss]  # 0: a zombie (exited, not yet reaped)
    t0 = samples[0][0]
    fig, ax = plt.subplots(figsize=(10.5, 3.4))
    ax.plot([t - t0 for t, _ in samples], [rss / GIB for _, rss in samples], lw=1, label="RSS (every 0.1 s)")
    ax.axvline(r["loop_start"] - t0, color="gray", ls=":", lw=1, label="block loop starts")
    begin = r["loop_start"]
    for n, b in enumerate(r["blocks"]):
        ax.axvline(b["end"] - t0, color="C1", ls="--", lw=0.8, label="block ends" if n == 0 else None)
        if n % 2 == 0:
            ax.axvspan(begin - t0, b["end"] - t0, color="C1", alpha=0.08, lw=0)
        begin = b["end"]
    if r["done"]:
        ax.axvline(r["done"] - t0, color="k", ls=":", lw=1, label="done")
    ax.axhline(r["peak_rss_bytes"] / GIB, color="C3", lw=0.8, label="peak RSS (ru_maxrss)")
    ax.axhline(r["forecast"]["host_peak_bytes"] / GIB, color="C2", lw=0.8, ls="-.", label="forecast (leanfoem plan)")
    top = max(r["peak_rss_bytes"], r["forecast"]["host_peak_bytes"]) / GIB
    ax.set(xlabel="seconds since start", ylabel="GiB", ylim=(0, top * 1.12), xlim=(0, None),
           title=f"resident memory of one run: hidden {r['hidden']}, {r['layers']} layers "
                 f"(model {r['model_bytes'] / MIB:.0f} MiB)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over the trace
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- the docs section -------------------------------------------------------------------------------------------------
def docs_section(command: str, depth: list[dict], width: list[dict], trace: dict, fd: dict, fw: dict) -> str:
    def row(r: dict) -> str:
        f, peak = r["forecast"]["host_peak_bytes"], r["peak_rss_bytes"]
        solver = sum(r["solver_seconds"].values()) / len(r["blocks"])
        return (f"| {r['hidden']} | {r['intermediate']} | {r['layers']} | {r['model_bytes'] / MIB:.0f} | "
                f"{r['seconds']:.1f} | {block_seconds(r):.1f} | {solver:.1f} | {peak / MIB:.0f} | {f / MIB:.0f} | "
                f"{f / peak:.2f} | {r['load_before']:.2f} |")

    head = ("| hidden | intermediate | layers | model (MiB) | wall (s) | s / block | solver s / block | "
            "peak RSS (MiB) | forecast (MiB) | forecast / measured | load before |\n" + "|---" * 11 + "|")
    runs = depth + width + [trace]
    commits = sorted({r["commit"] for r in runs})
    threads = sorted({str(r["omp_num_threads"]) for r in runs})
    loads = [r["load_before"] for r in runs]
    lines = [f"Command: `{command}` ({machine_line()}; 1-minute load average before the runs "
             f"{min(loads):.2f}–{max(loads):.2f}; OMP_NUM_THREADS={', '.join(threads)}; leanfoem "
             f"{', '.join(commits)}).",
             "Llama-shaped models with random bf16 weights and the demo tokenizer (vocab 4096): intermediate ≈ "
             "2.75 × hidden (multiple of 128), head_dim 128, kv heads = heads / 4. Each run `leanfoem quantize "
             f"{' '.join(QUANTIZE_ARGS)}` (FOEM β = 0.2, 4 bit, CPU, fp32 blocks) in its own process; peak RSS is its "
             "ru_maxrss, the forecast is `leanfoem plan --device cpu` for the same settings; s / block is the mean of "
             "the block times in quantize_log.jsonl, solver s / block the part spent in the solver (factorisation + "
             "column loop of the 7 linears; the rest is Hessian accumulation, forward passes and writing).", ""]
    if depth:
        lines += [f"**Depth** (hidden {depth[0]['hidden']}):", "", head, *map(row, depth), ""]
        if fd:
            lines += [f"- wall time = {fd['wall_a']:.1f} s + **{fd['wall_b']:.2f} s per layer** (fixed part: start-up, "
                      "tokenizing, embeddings, the final shard and configs).",
                      f"- peak RSS = {fd['rss_a']:.0f} MiB + layers × ({fd['rss_b']:+.1f} MiB): the slope is "
                      f"**{fd['rss_b']:+.1f} MiB per layer**, while the model grows by "
                      f"{_per_layer_bytes(depth) / MIB:.0f} MiB per layer.", ""]
        lines += ["![time and peak RSS versus depth](scaling_depth.png)", ""]
    if width:
        lines += [f"**Width** ({_layers(width[0]['layers'])}):", "", head, *map(row, width), ""]
        if fw:
            lines += [f"- seconds per block ∝ hidden^**{fw['k']:.2f}** (log-log fit over hidden "
                      f"{width[0]['hidden']}–{width[-1]['hidden']}).",
                      f"- peak RSS = {fw['rss_a']:.0f} MiB + {fw['rss_b']:.0f} MiB × (hidden / 1024)².", ""]
        lines += ["![time per block and peak RSS versus width](scaling_width.png)", ""]
    peaks = block_peaks(trace)
    lines += [f"**Memory over time** (hidden {trace['hidden']}, {_layers(trace['layers'])}, model "
              f"{trace['model_bytes'] / MIB:.0f} MiB: RSS sampled every 0.1 s; dashed lines: the block ends logged in "
              "quantize_log.jsonl). The highest sample within each block: " + ", ".join(f"{p / MIB:.0f}" for p in peaks)
              + f" MiB (spread {(max(peaks) - min(peaks)) / MIB:.0f} MiB); peak RSS "
              f"{trace['peak_rss_bytes'] / MIB:.0f} MiB.", "",
              "![RSS over time of one run](memory_trace.png)"]
    return "\n".join(lines)


def _layers(n: int) -> str:
    return f"{n} layer" + ("" if n == 1 else "s")


def block_peaks(r: dict) -> list[int]:
    """The highest RSS sample between the start and the end of each block."""
    peaks, begin = [], r["loop_start"]
    for b in r["blocks"]:
        peaks.append(max((rss for t, rss in r["samples"] if begin <= t <= b["end"]), default=0))
        begin = b["end"]
    return peaks


def _per_layer_bytes(depth: list[dict]) -> float:
    lo, hi = min(depth, key=lambda r: r["layers"]), max(depth, key=lambda r: r["layers"])
    return (hi["model_bytes"] - lo["model_bytes"]) / max(1, hi["layers"] - lo["layers"])


# -- main -------------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16], help="layers of the depth sweep")
    parser.add_argument("--depth-hidden", type=int, default=1024, help="hidden size of the depth sweep")
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 2048, 3072, 4096],
                        help="hidden sizes of the width sweep (multiples of 128)")
    parser.add_argument("--width-layers", type=int, default=2, help="layers of the width sweep")
    parser.add_argument("--trace", type=int, nargs=2, default=[1024, 8], metavar=("HIDDEN", "LAYERS"),
                        help="the run whose memory-over-time trace is plotted")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/leanfoem-scaling"))
    parser.add_argument("--tokenizer", type=Path, default=DEMO / "model")
    parser.add_argument("--calib", type=Path, default=DEMO / "calibration.txt")
    parser.add_argument("--quick", action="store_true", help="smoke run: hidden 256 (1, 2 layers) and 512 (1 layer)")
    parser.add_argument("--fresh", action="store_true", help="measure again runs stored in WORKDIR/results")
    parser.add_argument("--write-docs", action="store_true",
                        help="copy the plots to docs/ and write the section of docs/BENCHMARKS.md")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help=argparse.SUPPRESS)  # to test --write-docs
    args = parser.parse_args()
    if args.quick:
        if args.write_docs and args.docs.resolve() == (ROOT / "docs").resolve():
            parser.error("--quick is a smoke run; its numbers do not belong in docs/ (drop --write-docs)")
        args.depths, args.depth_hidden, args.trace = [1, 2], 256, [256, 2]
        args.widths, args.width_layers = [256, 512], 1
    for h in {args.depth_hidden, *args.widths, args.trace[0]}:
        if h % 128:
            parser.error(f"hidden size {h} is not a multiple of 128 (head_dim 128)")
    command = "python tools/bench_scaling.py" + " ".join([""] + [a for a in sys.argv[1:]])
    cases = sorted({(args.depth_hidden, n) for n in args.depths} | {(h, args.width_layers) for h in args.widths}
                   | {tuple(args.trace)})
    results = {}
    for hidden, layers in cases:
        r, stored = run_one(hidden, layers, args.workdir, args.tokenizer, args.calib, args.fresh)
        results[hidden, layers] = r
        print(f"hidden {hidden:5d}, {_layers(layers):>9}: wall {r['seconds']:7.1f} s, {block_seconds(r):6.1f} s/block, "
              f"peak RSS {r['peak_rss_bytes'] / MIB:6.0f} MiB (forecast {r['forecast']['host_peak_bytes'] / MIB:.0f}, "
              f"sampled {r['sampled_peak_bytes'] / MIB:.0f}), load before {r['load_before']:.2f}"
              + (" [stored]" if stored else ""), flush=True)
    depth = [results[args.depth_hidden, n] for n in sorted(set(args.depths))]
    width = [results[h, args.width_layers] for h in sorted(set(args.widths))]
    trace = results[tuple(args.trace)]
    fd, fw = fit_depth(depth), fit_width(width)
    if fd:
        print(f"depth: wall = {fd['wall_a']:.1f} s + {fd['wall_b']:.2f} s/layer; "
              f"peak RSS = {fd['rss_a']:.0f} MiB {fd['rss_b']:+.1f} MiB/layer")
    if fw:
        print(f"width: s/block ∝ hidden^{fw['k']:.2f}; peak RSS = {fw['rss_a']:.0f} MiB + "
              f"{fw['rss_b']:.0f} MiB·(hidden/1024)²")
    plots = args.workdir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    plot_depth(depth, fd, plots / PLOTS[0])
    plot_width(width, fw, plots / PLOTS[1])
    plot_trace(trace, plots / PLOTS[2])
    print(f"plots in {plots}")
    if args.write_docs:
        args.docs.mkdir(parents=True, exist_ok=True)
        for name in PLOTS:
            shutil.copyfile(plots / name, args.docs / name)
        replace_section(args.docs / "BENCHMARKS.md", SECTION, docs_section(command, depth, width, trace, fd, fw))
        print(f"wrote the section {SECTION!r} of {args.docs / 'BENCHMARKS.md'} and its plots")


if __name__ == "__main__":
    main()
