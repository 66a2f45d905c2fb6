"""1 process against 2 torchrun ranks on this machine's CPU, threads split fairly: what docs/BENCHMARKS.md reports.

Runs the real command lines: `leanfoem quantize` in one process with T threads, then `torchrun --standalone
--nproc-per-node 2` with T/2 threads per rank (each rank leaves its run's seconds and the part spent in collectives,
transfers and waiting for the other rank, in LEANFOEM_RANK_TIMES). Both use the same --batch-tokens, one rank's rows,
so the two differ only in the order the Hessians' partial sums are added; the codes are compared and the perplexity
of both checkpoints taken on the bundled evaluation text.

    python tools/bench_ranks.py                       # SmolLM2-135M (tools/smollm2.py), 16 x 256 tokens, 4 bit g64
    python tools/bench_ranks.py --model DIR --nsamples 32 --seqlen 512 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def quantize_cmd(model: str, out: Path, args) -> list[str]:
    return ["-m", "leanfoem", "quantize", "--model", model, "--out", str(out), "--nsamples", str(args.nsamples),
            "--seqlen", str(args.seqlen), "--group-size", str(args.group_size),
            "--batch-tokens", str(args.nsamples // 2 * args.seqlen), "--quiet"]


def timed(cmd: list[str], threads: int, **env) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *cmd], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS=str(threads), **env))
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def codes_equal(a: Path, b: Path) -> float:
    from safetensors.torch import load_file
    from leanfoem.packing import unpack_rows

    def codes(out):
        index = json.loads((out / "model.safetensors.index.json").read_text())
        found = {}
        for shard in sorted(set(index["weight_map"].values())):
            found.update({k: unpack_rows(v, 4) for k, v in load_file(out / shard).items() if k.endswith(".qweight")})
        return found

    x, y = codes(a), codes(b)
    return sum(int((x[k] == y[k]).sum()) for k in x) / sum(x[k].numel() for k in x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M built by tools/smollm2.py")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="threads in all: the one process's, split by ranks")
    parser.add_argument("--control", action="store_true",
                        help="also the one process with T/2 threads: how far rounding alone moves codes and perplexity")
    parser.add_argument("--keep", default=None, metavar="DIR", help="keep the checkpoints in DIR")
    args = parser.parse_args()
    if args.model is None:
        sys.path.insert(0, str(ROOT / "tools"))
        from smollm2 import ensure_smollm2
        args.model = str(ensure_smollm2())
    with tempfile.TemporaryDirectory(prefix="bench-ranks-") as tmp:
        tmp = Path(args.keep) if args.keep else Path(tmp)
        one = timed(quantize_cmd(args.model, tmp / "one", args), args.threads)
        control = timed(quantize_cmd(args.model, tmp / "control", args), max(1, args.threads // 2)) \
            if args.control else None
        two = timed(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                     *quantize_cmd(args.model, tmp / "two", args)], max(1, args.threads // 2),
                    LEANFOEM_RANK_TIMES=str(tmp / "times"))
        ranks = [json.loads((tmp / "times" / f"rank{r}.json").read_text()) for r in range(2)]
        from leanfoem.evaluation import default_eval_text, evaluate_perplexity, load_text
        text = load_text(default_eval_text())
        names = ("one", "two") + (("control",) if args.control else ())
        ppl = [evaluate_perplexity(str(tmp / name), text, seqlen=args.seqlen, windows=8, device="cpu")["perplexity"]
               for name in names]
        equal = codes_equal(tmp / "one", tmp / "two")
        control_equal = codes_equal(tmp / "one", tmp / "control") if args.control else None
    print(f"| run | threads | wall s | in collectives |")
    print(f"|---|---|---|---|")
    print(f"| 1 process | {args.threads} | {one:.1f} | — |")
    shares = ", ".join(f"rank {r['rank']} {r['collective_seconds']:.1f} s of {r['seconds']:.1f} s "
                       f"({r['collective_seconds'] / r['seconds']:.1%})" for r in ranks)
    print(f"| 2 ranks (torchrun, gloo) | {max(1, args.threads // 2)} each | {two:.1f} | {shares} |")
    if args.control:
        print(f"| 1 process (control) | {max(1, args.threads // 2)} | {control:.1f} | — |")
    print(f"speed-up {one / two:.2f}x; codes equal {equal:.4%}; perplexity {ppl[0]:.4f} (1 process) vs "
          f"{ppl[1]:.4f} (2 ranks), {abs(ppl[1] - ppl[0]) / ppl[0]:.3%} apart")
    if args.control:
        print(f"control (rounding alone: the one process with {max(1, args.threads // 2)} thread(s) instead of "
              f"{args.threads}): codes equal {control_equal:.4%}; perplexity {ppl[2]:.4f}, "
              f"{abs(ppl[2] - ppl[0]) / ppl[0]:.3%} apart")


if __name__ == "__main__":
    main()
