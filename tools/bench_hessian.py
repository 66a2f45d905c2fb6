"""Time of the CPU Hessian steps by width: the Gram update (one syrk call, GRAM_TILE-wide tiles, 4096-wide tiles,
plain torch gemm) and the fp64 factorisation (LAPACK on the whole matrix against the tiled path).

    python tools/bench_hessian.py [--gram 8192 28672] [--factor 12288] [--tokens 2048] [--repeat 3]

Prints the CPU model and, per width and variant, the minimum and median seconds over --repeat runs, interleaved
(A B C A B C ...) so that drift on a shared machine hits every variant alike. A variant that would make a call
known to crash some BLAS builds (one syrk wider than 24576, docs/BENCHMARKS.md "Full-width native check") is
skipped. Feeds that section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import torch  # noqa: E402

import leanfoem.hessian as hessian  # noqa: E402
from check_full_width import cpu_model  # noqa: E402


def gram_variants(n: int) -> dict:
    def tiled(tile):
        def run(total, x):
            saved, hessian.GRAM_TILE = hessian.GRAM_TILE, tile
            try:
                hessian._add_gram(total, x)
            finally:
                hessian.GRAM_TILE = saved
        return run
    variants = {f"tiles of {hessian.GRAM_TILE} (leanfoem)": tiled(hessian.GRAM_TILE), "tiles of 4096": tiled(4096),
                "torch gemm": lambda total, x: total.addmm_(x.T, x)}
    if n <= 24576:
        variants["one syrk call"] = tiled(n)
    return variants


def factor_variants() -> dict:
    return {"LAPACK whole": hessian._factor_lapack, "tiled (leanfoem above FACTOR_WHOLE)": hessian._factor_blocked}


def timed(repeat: int, variants: dict, run) -> dict:
    times = {name: [] for name in variants}
    for _ in range(repeat):
        for name, variant in variants.items():
            start = time.perf_counter()
            run(variant)
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gram", type=int, nargs="*", default=[8192, 28672])
    parser.add_argument("--factor", type=int, nargs="*", default=[12288])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}; torch threads {torch.get_num_threads()}; {args.tokens} tokens")
    g = torch.Generator().manual_seed(0)
    for n in args.gram:
        x = torch.randn(args.tokens, n, generator=g)
        times = timed(args.repeat, gram_variants(n), lambda variant: variant(torch.zeros(n, n), x))
        for name, t in times.items():
            print(f"gram   n={n:6d}  {name:38s} min {min(t):8.2f} s  median {statistics.median(t):8.2f} s")
    for n in args.factor:
        x = torch.randn(args.tokens, n, generator=g)
        h = x.T @ x
        damping = 0.01 * h.diagonal().double().mean().item()
        times = timed(args.repeat, factor_variants(), lambda variant: variant(h, damping, False))
        for name, t in times.items():
            print(f"factor n={n:6d}  {name:38s} min {min(t):8.2f} s  median {statistics.median(t):8.2f} s")


if __name__ == "__main__":
    main()
