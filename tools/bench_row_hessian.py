"""The cost of summing Hessians one calibration row at a time (what makes them independent of the forward batch).

    python tools/bench_row_hessian.py [--widths 576 1536 8192 28672] [--rows 4] [--seqlen 512] [--repeat 3]

For each width n, the same inputs X [rows, seqlen, n] (random fp32) go into `HessianAccumulator` two ways,
interleaved (A B A B ...) so drift on a shared machine hits both alike:
- batch: X as one unit, the way a whole forward batch was summed before (one Gram call per 8192 tokens);
- rows: X as `rows` units, one Gram call per row, in row order (what the quantizer does now).
Prints the CPU model and, per width, the minimum and median seconds of each and their ratio. The quantizer sums
one Hessian per distinct linear input of a block (a Llama block: q/k/v, o_proj, gate/up at hidden width, down_proj
at intermediate width), so a block's extra time is the sum of those differences.
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

from check_full_width import cpu_model  # noqa: E402
from leanfoem.hessian import HessianAccumulator  # noqa: E402


def timed(x: torch.Tensor, as_rows: bool) -> float:
    acc = HessianAccumulator(x.shape[-1])
    started = time.perf_counter()
    acc.add_batch(x if as_rows else x.reshape(-1, x.shape[-1]))
    seconds = time.perf_counter() - started
    acc.scaled()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[576, 1536, 8192, 28672])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.rows} rows of {args.seqlen} tokens")
    print("| width | one unit per batch (s, min / median) | one unit per row (s, min / median) | rows / batch (median) |")
    print("| ---: | ---: | ---: | ---: |")
    for n in args.widths:
        x = torch.randn(args.rows, args.seqlen, n, generator=torch.Generator().manual_seed(n))
        times = {False: [], True: []}
        timed(x, True)  # warm-up: BLAS threads, page faults of H
        for _ in range(args.repeat):
            for as_rows in (False, True):
                times[as_rows].append(timed(x, as_rows))
        batch, rows = (statistics.median(times[k]) for k in (False, True))
        print(f"| {n} | {min(times[False]):.3f} / {batch:.3f} | {min(times[True]):.3f} / {rows:.3f} | "
              f"{rows / batch:.2f} |", flush=True)


if __name__ == "__main__":
    main()
