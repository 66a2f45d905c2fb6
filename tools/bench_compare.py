"""leanfoem's quantizers against GPTQModel and bitsandbytes NF4: wikitext-2 perplexity, KL divergence against the
fp model and top-1 agreement, wall time, peak RSS.

    python tools/bench_compare.py [--models smollm2,demo] [--bits 3,4] [--runs NAME,...]
                                  [--eval-windows N] [--eval-seqlen 2048] [--write-docs | --docs-only]

The full benchmark, from the repository root with its own venv running leanfoem (about 2-3 h on the idle
2-core machine: 15 quantizations and 17 evaluations a model; SmolLM2 gives 147 wikitext-2 windows of 2048
tokens, several seconds each, hence `--eval-windows`):
    .venv/bin/python tools/bench_compare.py --models demo --demo-eval-text leanfoem/demo/eval.txt --write-docs
    .venv/bin/python tools/bench_compare.py --models smollm2 --eval-windows 40 --write-docs
On wikitext-2 the demo model (trained on Shakespeare and Tolstoy) is out of its domain: its perplexity there is
~1000 and a quantized copy can score below the fp one; its own held-out text (eval.txt) is the meaningful one.

Same model, same calibration rows, same bits and group size for every calibrated run: leanfoem RTN, GPTQ,
FOEM (β = 0.1, 0.2) and FOEM+GPTAQ (α = 0.25, β = 0.2) against GPTQModel 7.7.0 GPTQ and FOEM (β = 0.2), plus
bitsandbytes NF4 (4 bit only, no calibration). Calibration: the rows are cut once by leanfoem's `.txt`
windowing and handed to both tools as token ids (rows.jsonl, "input_ids"). SmolLM2-135M: 32 × 512 rows of
War and Peace, group 64 (GPTQModel's CPU kernel needs in_features divisible by the group: hidden 576);
the demo model: 128 × 256 rows of its own calibration text (256 = its context), group 128. Damping 5% of
mean(diag H) in both tools; symmetric; no act-order (and no GAR: see tools/peers.py).

Each quantization runs in its own process, one after the other; wall time is the child's, peak RSS its
ru_maxrss (os.wait4). GPTQModel compiles a C++ pack kernel on its first run (+~30 s, and the compiler's RSS
would count as the child's): an untimed warm-up run on the demo model builds it into the scratch dir first.
Perplexity and KLD: `leanfoem eval --reference FP` on every GPTQ output (wikitext-2 test by default, `--eval-seqlen`
tokens a window, capped at the model's context, first `--eval-windows` windows or all): both perplexities, mean and
99% per-token KL(P_fp ‖ P_q), the share of tokens whose top-1 token agrees. bitsandbytes NF4 cannot be saved as
GPTQ: its figures are computed in-process with transformers by the same protocol, full-vocabulary logits of both
models (tools/peers.py ppl --reference), and so is the fp model's perplexity, next to `leanfoem eval`'s, as a check
that the two protocols agree.

Results are cached, one JSON file a run, in WORKDIR/<model>/results/: a rerun skips what is finished (the
benchmark survives being interrupted; an interrupted run is redone from the start). A cached quantization is
reused while the model, bits, group, calibration rows and settings are unchanged; evaluations are keyed by text,
seqlen and windows. `--write-docs` writes the `docs/BENCHMARKS.md` sections of the models asked for from the
cache (after running what is missing; `--docs-only` runs nothing).

Run it on an otherwise idle machine: with one of the 2 cores busy elsewhere, leanfoem's 2 OpenMP threads lose
4× (demo GPTQ: 13.5 s idle, 65-77 s beside one busy process, 19 s with OMP_NUM_THREADS=1), GPTQModel far less.

Needs: this python with leanfoem importable (the repository is put first on PYTHONPATH for leanfoem's runs),
and `--ref-python` with gptqmodel 7.7.0, bitsandbytes and transformers next to the pinned CPU torch:
    python3 -m venv /work/venv-ref && echo torch==2.13.0 > c.txt
    /work/venv-ref/bin/pip install torch==2.13.0
    /work/venv-ref/bin/pip install -c c.txt accelerate numpy safetensors filelock transformers threadpoolctl \
        packaging device-smi protobuf pillow requests pypcre tokenicer logbar jinja2 ninja maturin datasets \
        pyarrow dill torchao defuser optimum
    /work/venv-ref/bin/pip install --no-deps gptqmodel==7.7.0
    /work/venv-ref/bin/pip install -c c.txt bitsandbytes matplotlib scipy && /work/venv-ref/bin/pip install --no-deps -e .
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))  # this checkout's leanfoem (calibration rows), whatever is installed
from benchdoc import machine_line, replace_section  # noqa: E402
from smollm2 import ensure_smollm2  # noqa: E402

PEERS = ROOT / "tools" / "peers.py"


@dataclasses.dataclass(frozen=True)
class Model:
    key: str
    title: str
    group_size: int
    nsamples: int
    seqlen: int
    calib_name: str


MODELS = {
    "smollm2": Model("smollm2", "SmolLM2-135M-Instruct", 64, 32, 512, "War and Peace"),
    "demo": Model("demo", "the bundled demo model (`--model demo`: Llama, 4 layers, hidden 256)", 128, 128, 256,
                  "leanfoem/demo/calibration.txt"),
}


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    tool: str          # leanfoem, gptqmodel, bnb
    label: str
    method: str        # rtn, gptq, foem, nf4
    alpha: float = 0.0
    beta: float = 0.0
    gar: bool = False
    dtype: str = "auto"  # GPTQModel's layer dtype: "auto" is bf16 on the CPU, "float32" as leanfoem computes
    bits: tuple = (3, 4)
    default: bool = True
    peer: str | None = None   # the run the ratios compare this one with

    def settings(self) -> str:
        if self.method == "foem":
            return f"FOEM β = {self.beta:g}" + (f", GPTAQ α = {self.alpha:g}" if self.alpha else "")
        if self.method == "gptq":
            return "GPTQ" + (" + GAR (GPTQModel's default ordering)" if self.gar else "")
        return {"rtn": "round to nearest", "nf4": "NF4, blocksize 64, no calibration"}[self.method]


RUNS = {r.name: r for r in [
    Run("leanfoem-rtn", "leanfoem", "leanfoem RTN", "rtn", peer="bnb-nf4"),
    Run("leanfoem-gptq", "leanfoem", "leanfoem GPTQ", "gptq", peer="gptqmodel-gptq-fp32"),
    Run("leanfoem-foem-b0.1", "leanfoem", "leanfoem FOEM β 0.1", "foem", beta=0.1, peer="gptqmodel-foem-b0.1"),
    Run("leanfoem-foem", "leanfoem", "leanfoem FOEM", "foem", beta=0.2, peer="gptqmodel-foem-fp32"),
    Run("leanfoem-foem-gptaq", "leanfoem", "leanfoem FOEM+GPTAQ", "foem", alpha=0.25, beta=0.2,
        peer="gptqmodel-foem-gptaq"),
    # fp32 layers, as leanfoem computes on the CPU: the like-for-like peers (GPTQModel's own choice, bf16, ran ~7×
    # slower on a CPU without native bf16: SmolLM2 FOEM 4 bit reached layer 12 of 30 after 6.5 min)
    Run("gptqmodel-gptq-fp32", "gptqmodel", "GPTQModel GPTQ (fp32)", "gptq", dtype="float32"),
    Run("gptqmodel-foem-fp32", "gptqmodel", "GPTQModel FOEM (fp32)", "foem", beta=0.2, dtype="float32"),
    Run("bnb-nf4", "bnb", "bitsandbytes NF4", "nf4", bits=(4,)),
    # not in the default set (each costs a GPTQModel run per model and bit width): --runs NAME
    Run("gptqmodel-gptq", "gptqmodel", "GPTQModel GPTQ", "gptq", default=False),
    Run("gptqmodel-foem", "gptqmodel", "GPTQModel FOEM", "foem", beta=0.2, default=False),
    Run("gptqmodel-foem-b0.1", "gptqmodel", "GPTQModel FOEM β 0.1", "foem", beta=0.1, default=False),
    Run("gptqmodel-foem-gptaq", "gptqmodel", "GPTQModel FOEM+GPTAQ", "foem", alpha=0.25, beta=0.2, default=False),
    Run("gptqmodel-gptq-gar", "gptqmodel", "GPTQModel GPTQ (GAR)", "gptq", gar=True, default=False),
]}
KLD_KEY = "kld"  # evaluations against the fp reference (older caches without KLD are evaluated again)
FP = "fp"  # the unquantized model: `leanfoem eval` and the in-process transformers perplexity


def calibration_rows(model_dir: Path, text: Path, path: Path, nsamples: int, seqlen: int, seed: int) -> Path:
    """The rows leanfoem's `.txt` windowing cuts from `text` (windows drawn by `seed`), as token ids in a .jsonl
    both tools read."""
    from transformers import AutoTokenizer
    from leanfoem.calibration import load_calibration
    rows = load_calibration(str(text), AutoTokenizer.from_pretrained(model_dir), nsamples=nsamples, seqlen=seqlen,
                            seed=seed)
    path.write_text("".join(json.dumps({"input_ids": r.tolist()}) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------- processes

def clean_env() -> dict:
    """This environment without PYTHONPATH (each child is told where its packages are), tokenizers single-threaded."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def peer_env(scratch: Path) -> dict:
    """GPTQModel's environment: its caches and compiled kernels in `scratch`, its minimum of 2 CPU workers
    (OMP_NUM_THREADS, when set, bounds the BLAS)."""
    return dict(clean_env(), GPTQMODEL_CPU_WORKERS="2", GPTQMODEL_CACHE_DIR=str(scratch / "gptqmodel-cache"),
                GPTQMODEL_TORCH_EXTENSIONS_DIR=str(scratch / "gptqmodel-ext"))


def run_measured(cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> dict:
    """cmd in its own process, stdout to log.out and stderr to log.err; wall seconds and the child's peak RSS,
    measured by tools/rss_probe.py (a process without torch: a child of this one would inherit this process's
    RSS high-water mark in its ru_maxrss). RuntimeError when it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    before = os.getloadavg()
    report = Path(f"{log}.probe.json")
    report.unlink(missing_ok=True)
    probe = [sys.executable, str(ROOT / "tools" / "rss_probe.py"), "--report", str(report), "--", *cmd]
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        child = subprocess.Popen(probe, stdout=out, stderr=err, env=env, cwd=cwd)
        try:
            child.wait()
        except BaseException:
            child.kill()
            child.wait()
            raise
    measured = json.loads(report.read_text()) if report.is_file() else {"returncode": child.returncode}
    if child.returncode != 0 or measured["returncode"] != 0:
        tail = Path(f"{log}.err").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"exit {measured['returncode']}: {shlex.join(cmd)}\n(log: {log}.err)\n{tail}")
    lines = [line for line in Path(f"{log}.out").read_text(errors="replace").splitlines() if line.startswith("{")]
    return {"seconds": round(measured["seconds"], 2), "peak_rss_bytes": measured["peak_rss_bytes"], "cmd": cmd,
            "loadavg_before": [round(x, 2) for x in before], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "json": json.loads(lines[-1]) if lines else None}


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = args.workdir
        self.python = args.python
        self.ref = args.ref_python
        scratch = self.work / "scratch"
        scratch.mkdir(parents=True, exist_ok=True)
        self.scratch = scratch
        self.env_leanfoem = dict(clean_env(), PYTHONPATH=str(ROOT))
        self.env_peer = peer_env(scratch)
        self.invocation = "python tools/bench_compare.py " + shlex.join(sys.argv[1:])
        self._versions = None

    # ------------------------------------------------------------------ inputs

    def model_dir(self, model: Model) -> Path:
        if model.key == "demo":
            return ROOT / "leanfoem" / "demo" / "model"
        return ensure_smollm2()

    def calib_text(self, model: Model) -> Path:
        if model.key == "demo":
            return ROOT / "leanfoem" / "demo" / "calibration.txt"
        return self.args.data / "corpus" / "war_and_peace.txt"

    def eval_text(self, model: Model) -> Path:
        if model.key == "demo" and self.args.demo_eval_text:
            return self.args.demo_eval_text
        return self.args.data / "wikitext2" / "wiki.test.raw"

    def rows(self, model: Model) -> tuple[Path, str]:
        """The calibration rows file (rebuilt every invocation: deterministic) and its SHA-256."""
        path = self.work / model.key / "rows.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        calibration_rows(self.model_dir(model), self.calib_text(model), path, model.nsamples, model.seqlen,
                         self.args.calib_seed)
        return path, hashlib.sha256(path.read_bytes()).hexdigest()

    def versions(self) -> dict:
        if self._versions is None:
            code = ("import json, importlib.metadata as m\n"
                    "def version(p):\n"
                    "    try:\n        return m.version(p)\n"
                    "    except m.PackageNotFoundError:\n        return 'not installed'\n"
                    "print(json.dumps({p: version(p) for p in "
                    "('gptqmodel', 'bitsandbytes', 'transformers', 'torch', 'optimum')}))")
            peer = {}
            if Path(self.ref).exists():  # leanfoem's rows run without the peers' venv
                out = subprocess.run([self.ref, "-c", code], capture_output=True, text=True, check=True)
                peer = json.loads(out.stdout.strip().splitlines()[-1])
            code = "import json, leanfoem, transformers, torch; print(json.dumps({'leanfoem': leanfoem.__version__, " \
                   "'transformers': transformers.__version__, 'torch': torch.__version__}))"
            out = subprocess.run([self.python, "-c", code], capture_output=True, text=True, check=True,
                                 env=self.env_leanfoem)
            ours = json.loads(out.stdout.strip().splitlines()[-1])
            git = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                                 text=True)
            ours["commit"] = git.stdout.strip() or "?"  # recorded, not a cache key: rerun with a fresh --workdir
            self._versions = {"peer": peer, "leanfoem": ours}
        return self._versions

    # ------------------------------------------------------------------ cache

    def result_path(self, model: Model, name: str, bits: int | None) -> Path:
        stem = name if bits is None else f"w{bits}-{name}"
        return self.work / model.key / "results" / f"{stem}.json"

    @staticmethod
    def load(path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def save(path: Path, data: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)

    def eval_key(self, model: Model) -> str:
        text = self.eval_text(model)
        digest = hashlib.sha256(text.read_bytes()).hexdigest()[:12]
        return (f"{text.name}:{digest}:seqlen{self.args.eval_seqlen}:windows{self.args.eval_windows or 'all'}"
                f":{KLD_KEY}")

    def fp_key(self, model: Model) -> str:
        """The fp model's evaluations are perplexity only (its KLD against itself is 0 by definition)."""
        return self.eval_key(model).removesuffix(f":{KLD_KEY}")

    # ------------------------------------------------------------------ runs

    def warm_up_gptqmodel(self) -> None:
        """GPTQModel builds its C++ pack kernel on first use (~30 s and a compiler's RSS): do it untimed."""
        marker = self.scratch / "gptqmodel-warm"
        if marker.exists():
            return
        demo = MODELS["demo"]
        rows, _ = self.rows(demo)
        few = self.scratch / "warmup-rows.jsonl"
        few.write_text("".join(rows.read_text().splitlines(keepends=True)[:4]))
        out = self.scratch / "warmup-out"
        shutil.rmtree(out, ignore_errors=True)
        print("warming up GPTQModel (builds its CPU pack kernel once) ...", flush=True)
        run_measured([self.ref, str(PEERS), "gptqmodel", "--model", str(self.model_dir(demo)), "--rows", str(few),
                      "--out", str(out), "--bits", "4", "--group-size", "128", "--method", "gptq", "--damp", "0.05",
                      "--offload-dir", str(self.scratch / "gptqmodel-offload")],
                     self.scratch / "logs" / "warmup", env=self.env_peer, cwd=self.scratch)
        shutil.rmtree(out, ignore_errors=True)
        marker.write_text("ok\n")

    def quantize_cmd(self, model: Model, run: Run, bits: int, rows: Path, out: Path) -> tuple[list[str], dict, Path]:
        model_dir = str(self.model_dir(model))
        if run.tool == "leanfoem":
            cmd = [self.python, "-m", "leanfoem", "quantize", "--model", model_dir, "--out", str(out), "--calib",
                   str(rows), "--nsamples", str(model.nsamples), "--seqlen", str(model.seqlen), "--bits", str(bits),
                   "--group-size", str(model.group_size), "--method", run.method, "--damp", "0.05", "--device", "cpu",
                   "--quiet", "--restart"]
            if run.method == "foem":
                cmd += ["--beta", f"{run.beta:g}", "--alpha", f"{run.alpha:g}"]
            return cmd, self.env_leanfoem, ROOT
        if run.tool == "gptqmodel":
            cmd = [self.ref, str(PEERS), "gptqmodel", "--model", model_dir, "--rows", str(rows), "--out", str(out),
                   "--bits", str(bits), "--group-size", str(model.group_size), "--method", run.method,
                   "--damp", "0.05", "--offload-dir", str(self.scratch / "gptqmodel-offload")]
            if run.method == "foem":
                cmd += ["--beta", f"{run.beta:g}", "--alpha", f"{run.alpha:g}"]
            if run.gar:
                cmd.append("--gar")
            if run.dtype != "auto":
                cmd += ["--dtype", run.dtype]
            return cmd, self.env_peer, self.scratch
        return [self.ref, str(PEERS), "bnb-nf4", "--model", model_dir, "--out", str(out)], self.env_peer, self.scratch

    def do_run(self, model: Model, run: Run, bits: int, rows: Path, digest: str) -> None:
        path = self.result_path(model, run.name, bits)
        out = self.work / model.key / f"w{bits}-{run.name}"
        settings = {"model": str(self.model_dir(model)), "bits": bits, "group_size": model.group_size,
                    "rows_sha256": digest if run.tool != "bnb" else None, "run": dataclasses.asdict(run)}
        settings = json.loads(json.dumps(settings))  # as the cache holds it (tuples become lists)
        key = self.eval_key(model)
        result = self.load(path)
        if result is not None and result.get("settings") == settings and key in result["evals"]:
            print(f"[{model.key} w{bits}] {run.name}: cached, ppl {result['evals'][key]['perplexity']:.4f}", flush=True)
            return
        if result is None or result.get("settings") != settings or not out.is_dir():
            if run.tool == "gptqmodel":
                self.warm_up_gptqmodel()
            shutil.rmtree(out, ignore_errors=True)
            cmd, env, cwd = self.quantize_cmd(model, run, bits, rows, out)
            load = os.getloadavg()[0]
            print(f"[{model.key} w{bits}] {run.name}: quantizing ..."
                  + (f" (load average {load:.2f}: other jobs share the cores, the time is not clean)" if load > 0.5
                     else ""), flush=True)
            measured = run_measured(cmd, self.work / model.key / "logs" / f"w{bits}-{run.name}-quantize", env, cwd)
            result = {"settings": settings, "quantize": measured, "evals": {}, "bench": self.invocation,
                      "versions": self.versions(), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
            self.save(path, result)
            print(f"[{model.key} w{bits}] {run.name}: {measured['seconds']:.1f} s, "
                  f"{measured['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
        evaluate = self.transformers_eval if run.tool == "bnb" else self.leanfoem_eval  # NF4 is no GPTQ checkpoint
        result["evals"][key] = evaluate(model, out, f"w{bits}-{run.name}", reference=self.model_dir(model))
        self.save(path, result)
        print(f"[{model.key} w{bits}] {run.name}: ppl {result['evals'][key]['perplexity']:.4f}", flush=True)

    def leanfoem_eval(self, model: Model, checkpoint: Path, tag: str, reference: Path | None = None) -> dict:
        cmd = [self.python, "-m", "leanfoem", "eval", "--model", str(checkpoint), "--text", str(self.eval_text(model)),
               "--seqlen", str(self.args.eval_seqlen), "--device", "cpu", "--json"]
        if reference is not None:
            cmd += ["--reference", str(reference)]
        if self.args.eval_windows:
            cmd += ["--windows", str(self.args.eval_windows)]
        print(f"[{model.key}] {tag}: leanfoem eval ...", flush=True)
        measured = run_measured(cmd, self.work / model.key / "logs" / f"{tag}-eval", self.env_leanfoem, ROOT)
        return dict(measured["json"], cmd=cmd, wall_seconds=measured["seconds"], bench=self.invocation)

    def transformers_eval(self, model: Model, checkpoint: Path, tag: str, reference: Path | None = None) -> dict:
        cmd = [self.ref, str(PEERS), "ppl", "--model", str(checkpoint), "--text", str(self.eval_text(model)),
               "--seqlen", str(self.args.eval_seqlen)]
        if reference is not None:
            cmd += ["--reference", str(reference)]
        if self.args.eval_windows:
            cmd += ["--windows", str(self.args.eval_windows)]
        print(f"[{model.key}] {tag}: transformers perplexity ...", flush=True)
        measured = run_measured(cmd, self.work / model.key / "logs" / f"{tag}-transformers-eval", self.env_peer,
                                self.scratch)
        return dict(measured["json"], cmd=cmd, wall_seconds=measured["seconds"], bench=self.invocation)

    def do_fp(self, model: Model) -> None:
        path = self.result_path(model, FP, None)
        settings = {"model": str(self.model_dir(model))}
        result = self.load(path)
        if result is None or result.get("settings") != settings:
            result = {"settings": settings, "evals": {}, "transformers_evals": {}, "bench": self.invocation}
        key = self.fp_key(model)
        if key not in result["evals"]:
            result["evals"][key] = self.leanfoem_eval(model, self.model_dir(model), FP)
            self.save(path, result)
        if key not in result["transformers_evals"]:
            result["transformers_evals"][key] = self.transformers_eval(model, self.model_dir(model), FP)
            self.save(path, result)
        print(f"[{model.key}] fp: leanfoem eval {result['evals'][key]['perplexity']:.4f}, transformers "
              f"{result['transformers_evals'][key]['perplexity']:.4f}", flush=True)

    def run_all(self, models: list[Model], bits_list: list[int], runs: list[str]) -> None:
        for model in models:
            rows, digest = self.rows(model)
            if FP in runs:
                self.do_fp(model)
            for bits in bits_list:
                for name in runs:
                    if name != FP and bits in RUNS[name].bits:
                        self.do_run(model, RUNS[name], bits, rows, digest)

    # ------------------------------------------------------------------ docs

    def section(self, model: Model, bits_list: list[int]) -> str | None:
        key, fkey = self.eval_key(model), self.fp_key(model)
        fp = self.load(self.result_path(model, FP, None)) or {}
        fp_ppl = fp.get("evals", {}).get(fkey, {}).get("perplexity")
        fp_tf = fp.get("transformers_evals", {}).get(fkey, {}).get("perplexity")
        tables, commands, benches, loads, versions, commits = [], [], set(), [], None, set()
        eval_example, windows_seen = None, set()
        for e in (fp.get("evals", {}).get(fkey), fp.get("transformers_evals", {}).get(fkey)):
            if e:
                benches.add(e.get("bench"))
        for bits in bits_list:
            results = {}
            for name, run in RUNS.items():
                r = self.load(self.result_path(model, name, bits)) if bits in run.bits else None
                if r is not None:
                    results[name] = r
                    benches.add(r.get("bench"))
                    loads.append(r["quantize"]["loadavg_before"][0])
                    versions = versions or r.get("versions")
                    if RUNS[name].tool == "leanfoem":
                        commits.add((r.get("versions") or {}).get("leanfoem", {}).get("commit", "?"))
                    commands.append(f"- w{bits} {name}: `{shown(r['quantize']['cmd'])}`")
                    if key in r["evals"]:
                        e = r["evals"][key]
                        benches.add(e.get("bench"))
                        windows_seen.add((e["windows"], e["seqlen"]))
                        if eval_example is None and name.startswith("leanfoem"):
                            eval_example = e.get("cmd")
            if not results:
                continue

            def ppl(name):
                return results[name]["evals"].get(key, {}).get("perplexity") if name in results else None

            lines = [f"| fp (bf16 weights, fp32 compute) | – | – | – | "
                     f"{f'{fp_ppl:.3f}' if fp_ppl else '–'} | – | 0 | 0 | 100% |"]
            for name, r in results.items():
                q, p = r["quantize"], ppl(name)
                delta = f"{(p / fp_ppl - 1) * 100:+.1f}%" if p and fp_ppl else "–"
                lines.append(f"| {RUNS[name].label} | {RUNS[name].settings()} | {q['seconds']:.1f} | "
                             f"{q['peak_rss_bytes'] / 2**30:.2f} | {f'{p:.3f}' if p else '–'} | {delta} | "
                             f"{kld_cells(results[name]['evals'].get(key, {}))} |")
            ratios = []
            for name, r in results.items():
                peer = RUNS[name].peer
                if peer in results:
                    ours, theirs = r["quantize"], results[peer]["quantize"]
                    p, pp = ppl(name), ppl(peer)
                    ptxt = f", perplexity {(p / pp - 1) * 100:+.2f}%" if p and pp else ""
                    ratios.append(f"- {RUNS[name].label} / {RUNS[peer].label}: time "
                                  f"**{ours['seconds'] / theirs['seconds']:.2f}×**, peak RSS "
                                  f"**{ours['peak_rss_bytes'] / theirs['peak_rss_bytes']:.2f}×**{ptxt}")
            tables.append(f"**{bits} bit**, group {model.group_size}, sym\n\n"
                          "| run | settings | wall time (s) | peak RSS (GiB) | ppl | vs fp | KLD mean | KLD 99% | top-1 agree |\n"
                          "|---|---|---|---|---|---|---|---|---|\n"
                          + "\n".join(lines) + ("\n\nleanfoem / peer:\n" + "\n".join(ratios) if ratios else ""))
        if not tables:
            return None
        text = self.eval_text(model)
        shape = " / ".join(f"{w} windows of {n} tokens" for w, n in sorted(windows_seen)) or "–"
        fp_note = (f"fp perplexity by `leanfoem eval` {fp_ppl:.4f}, by transformers in-process (tools/peers.py ppl, the "
                   f"same windows) {fp_tf:.4f} ({(fp_tf / fp_ppl - 1) * 100:+.3f}%)." if fp_ppl and fp_tf else
                   "fp perplexity: not measured yet (`--runs fp`).")
        peer_versions = ", ".join(f"{k} {v}" for k, v in (versions or {}).get("peer", {}).items())
        benches.discard(None)
        return f"""Command: `{'`; `'.join(sorted(benches))}` ({machine_line()}; peers in the reference venv: {peer_versions or '?'};
GPTQMODEL_CPU_WORKERS=2; leanfoem at {', '.join(sorted(commits)) or '–'}). Load average (1 min) before the runs: {min(loads):.2f}–{max(loads):.2f}.
{model.title}; the same {model.nsamples} × {model.seqlen} calibration rows ({model.calib_name}) handed to both
tools as token ids; damping 0.05 × mean diag(H); no act-order, GPTQModel's GAR off (its GPTQ default, which
its FOEM path ignores). GPTQModel runs marked (fp32) load the layers in fp32 (`dtype=torch.float32`), as leanfoem
computes on the CPU; GPTQModel's own choice on the CPU is bf16, which this CPU (AVX2, no AVX512-BF16) runs several
times slower. bitsandbytes NF4 (4 bit only) needs no calibration: the decoder's linear layers in NF4,
embeddings, norms and the tied head in fp32, fp32 compute.
Each quantization in its own process, one at a time; wall time and peak RSS (ru_maxrss) are that process's;
GPTQModel's one-time C++ kernel build is done in an untimed warm-up. Perplexity: `leanfoem eval` on each
checkpoint (NF4: transformers in-process, same protocol), {shown([str(text)])}: the first {shape}
(`--eval-seqlen {self.args.eval_seqlen}` capped at the model's context, `--eval-windows {self.args.eval_windows or 'all'}`).
{fp_note} Example: `{shown(eval_example) if eval_example else '–'}`.

{chr(10).join(t + chr(10) for t in tables)}
<details><summary>Exact quantization commands</summary>

{chr(10).join(commands)}

</details>
"""

    def write_docs(self, models: list[Model], bits_list: list[int]) -> None:
        for model in models:
            body = self.section(model, bits_list)
            if body is None:
                print(f"no cached results for {model.key}: its section is left alone")
                continue
            print(body)
            if self.args.write_docs or self.args.docs_only:
                title = f"Quantizers compared on {'SmolLM2-135M' if model.key == 'smollm2' else 'the demo model'}"
                replace_section(ROOT / "docs" / "BENCHMARKS.md", title, body)


def kld_cells(e: dict) -> str:
    """KLD mean, KLD 99% and top-1 agreement of one evaluation, as table cells ('–' where not measured)."""
    if "kld_mean" not in e:
        return "– | – | –"
    return f"{e['kld_mean']:.4f} | {e['kld_p99']:.3f} | {e['top1_agreement']:.2%}"


def shown(cmd: list[str]) -> str:
    """A command as the docs show it: paths inside this repository relative to its root (where they run)."""
    return shlex.join(cmd).replace(str(ROOT) + "/", "")


def parse_list(text: str, allowed, what: str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (choose from {', '.join(map(str, allowed))})")
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,demo")
    parser.add_argument("--bits", default="3,4")
    parser.add_argument("--runs", default=None, help=f"comma-separated; default: {FP}, "
                        + ", ".join(n for n, r in RUNS.items() if r.default)
                        + "; also: " + ", ".join(n for n, r in RUNS.items() if not r.default))
    parser.add_argument("--eval-windows", type=int, default=None, help="score the first N windows (default: all)")
    parser.add_argument("--eval-seqlen", type=int, default=2048, help="tokens a window (capped by the model)")
    parser.add_argument("--demo-eval-text", type=Path, default=None,
                        help="evaluation text for the demo model (default: wikitext-2 test, like SmolLM2)")
    parser.add_argument("--calib-seed", type=int, default=0,
                        help="which calibration windows are drawn (leanfoem's --seed); another seed is another "
                             "calibration set: give it its own --workdir, the cache keeps one set a model")
    parser.add_argument("--python", default=sys.executable, help="python that runs leanfoem")
    parser.add_argument("--ref-python", default="/work/venv-ref/bin/python",
                        help="python with gptqmodel 7.7.0 and bitsandbytes")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "leanfoem-bench-compare")
    parser.add_argument("--write-docs", action="store_true", help="write the docs/BENCHMARKS.md sections")
    parser.add_argument("--docs-only", action="store_true", help="run nothing; write the sections from the cache")
    args = parser.parse_args()
    for name in ("demo_eval_text", "data", "workdir"):  # children run elsewhere (GPTQModel in a scratch dir)
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())
    models = [MODELS[m] for m in parse_list(args.models, MODELS, "model")]
    bits_list = [int(b) for b in parse_list(args.bits, ("3", "4"), "bit width")]
    default_runs = [FP] + [n for n, r in RUNS.items() if r.default]
    runs = parse_list(args.runs, [FP, *RUNS], "run") if args.runs else default_runs
    args.workdir.mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    if not args.docs_only:
        try:
            bench.run_all(models, bits_list, runs)
        except KeyboardInterrupt:
            sys.exit(f"interrupted: finished runs are cached in {args.workdir}; the same command carries on "
                     "(the interrupted run starts over)")
    bench.write_docs(models, bits_list)


if __name__ == "__main__":
    main()
