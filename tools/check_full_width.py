"""Full-width check of the native code under a 70B run: the Hessian accumulation and the fp64 factorisation of a
Llama-3-70B down_proj (n = 28672), at several BLAS thread counts, each in its own process.

    python tools/check_full_width.py [--n 28672] [--tokens 2048] [--threads 1 2 4] [--json]

Why it exists: one 28672-wide ssyrk crashed the process (SIGSEGV) in scipy's multi-threaded OpenBLAS on an
AVX-512 Xeon, while the same call passed on an AMD EPYC and at 8192 wide; the test suite's matrices are a few
hundred wide and cannot see such a failure. This runs what `quantize` runs for the widest Hessian of a 70B block,
with the code of leanfoem.hessian (HessianAccumulator, inverse_upper_factor), and reports per thread count: ok or
the signal that killed it, the seconds of each step, the peak RSS, and how close U·(H + λI)·Uᵀ is to the identity
on a sample of rows. Peak memory is about 4·n² fp32 + n² fp64 values (16.5 GB at n = 28672): run it alone.
It takes minutes per thread count (the fp64 Cholesky and triangular inverse are ~n³/3 flops each), so it stays out
of the test suite; run it on every new kind of machine and record the result with the CPU model in
docs/BENCHMARKS.md ("Full-width native check").
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def run_one(n: int, tokens: int, sample_rows: int = 64) -> dict:
    """In this process: accumulate H over `tokens` random inputs, factorise it, check U on sampled rows."""
    import torch
    from leanfoem.hessian import HessianAccumulator, inverse_upper_factor
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, n, generator=g)
    timings = {}
    start = time.perf_counter()
    accumulator = HessianAccumulator(n)
    accumulator.add_batch(x)
    hessian, _ = accumulator.scaled()
    timings["hessian_s"] = time.perf_counter() - start
    del x
    start = time.perf_counter()
    factor = inverse_upper_factor(hessian, 0.01)
    timings["factor_s"] = time.perf_counter() - start
    damping = factor.damp * torch.diagonal(hessian).double().mean().item()
    rows = torch.randperm(n, generator=g)[:sample_rows]
    u = factor.upper[rows].double()                        # U[r, :]
    uh = torch.zeros_like(u)
    for k in range(0, n, 2048):  # U[r, :]·H by row blocks of H: a whole fp64 copy of H would be another 6.6 GB
        uh += u[:, k:k + 2048] @ hessian[k:k + 2048].double()
    product = uh @ u.T + damping * (u @ u.T)  # rows and columns r of U·(H + λI)·Uᵀ
    worst = (product - torch.eye(len(rows), dtype=torch.float64)).abs().max().item()
    return {**timings, "identity_error": worst, "damp": factor.damp,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def run_isolated(n: int, tokens: int, threads: int) -> dict:
    """One thread count in a child process, so a crash in native code is a result, not the end of the check."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-X", "faulthandler", __file__, "--child", "--n", str(n), "--tokens", str(tokens)]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    result = {"threads": threads, "wall_s": round(time.perf_counter() - start, 1)}
    if done.returncode == 0:
        return {**result, "status": "ok", **json.loads(done.stdout.splitlines()[-1])}
    cause = f"killed by {signal.Signals(-done.returncode).name}" if done.returncode < 0 else f"exit {done.returncode}"
    where = [line.strip() for line in done.stderr.splitlines() if line.strip().startswith("File")][:3]
    return {**result, "status": cause, "where": where}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=28672)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.child:
        faulthandler.enable()
        import torch
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        print(json.dumps(run_one(args.n, args.tokens)))
        return
    print(f"CPU: {cpu_model()}; n = {args.n}, {args.tokens} tokens", flush=True)
    results = []
    for threads in args.threads:
        r = run_isolated(args.n, args.tokens, threads)
        results.append(r)
        if r["status"] == "ok":
            print(f"threads {threads}: ok  Hessian {r['hessian_s']:.1f} s  factor {r['factor_s']:.1f} s  "
                  f"|U(H+λI)Uᵀ − I| {r['identity_error']:.1e}  peak RSS {r['peak_rss_gib']:.1f} GiB", flush=True)
        else:
            print(f"threads {threads}: {r['status']}  {' | '.join(r['where'])}", flush=True)
    if args.json:
        print(json.dumps({"cpu": cpu_model(), "n": args.n, "tokens": args.tokens, "runs": results}))
    sys.exit(0 if all(r["status"] == "ok" for r in results) else 1)


if __name__ == "__main__":
    main()
