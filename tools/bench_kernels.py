"""GPU timings of the fused kernels against the torch code they replace.

    python tools/bench_kernels.py --json results.json            # on a CUDA machine
    python tools/bench_kernels.py --from-json results.json --write-docs   # anywhere: the docs section

For each layer (out × in) it builds H from random correlated inputs (low-rank mixing + noise, 4096 tokens),
factorises it once (fp64, leanfoem.hessian) and times the FOEM column loop (4 bit, group 128, sym, β = 0.2)
three ways: `leanfoem.solver.solve_columns` as it is (torch, addr_), the block loop around
`kernels.reference.block_step` (torch), and the block loop around the fused `kernels.block_step.block_step`.
Lazy updates are the same torch addmm in the last two. Also: GPTQ packing (torch vs kernel) and
x @ Wᵀ for 2048 tokens (unpack + matmul vs the fused dequant matmul). Each timing is the best of `--repeat`
runs after a warm-up (Triton compiles on the first call).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

SECTION = "Kernels on GPU"


def layer(out: int, n: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    tokens, rank = 4096, 512
    basis = torch.randn(rank, n, device="cuda", generator=g) / rank**0.5
    x = torch.randn(tokens, rank, device="cuda", generator=g) @ basis
    x += 0.3 * torch.randn(tokens, n, device="cuda", generator=g)
    x *= torch.logspace(-1, 0.5, n, device="cuda")
    h = x.T @ x * (2 / tokens)
    del x, basis
    w = torch.randn(out, n, device="cuda", generator=g) * 0.02
    return w, h


def block_loop(step, wt, upper, *, bits, group_size, sym, beta, **kw):
    columns, rows = wt.shape
    group = columns if group_size == -1 else group_size
    original = wt.clone() if beta else None
    codes = torch.empty((columns, rows), dtype=torch.uint8, device=wt.device)
    scales = torch.empty((-(-columns // group), rows), dtype=wt.dtype, device=wt.device)
    zeros = torch.empty_like(scales)
    loss = torch.zeros((), dtype=torch.float64, device=wt.device)
    for b0 in range(0, columns, 128):
        b1 = min(b0 + 128, columns)
        errors, block, scaled = step(wt, upper, b0, b1, codes, scales, zeros, bits=bits, group=group, sym=sym,
                                     beta=beta, original=original, **kw)
        loss += scaled.double().square().sum()
        if b1 < columns:
            wt[b1:].addmm_(upper[b0:b1, b1:].T, errors, alpha=-1)
    return codes, loss.item()


def best_of(fn, repeat):
    times, result = [], None
    for _ in range(repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times), result


def bench_layer(out: int, n: int, repeat: int, tiles: list[tuple[int, int]]) -> dict:
    from leanfoem.kernels.block_step import block_step as fused
    from leanfoem.kernels.reference import block_step as reference
    from leanfoem.hessian import inverse_upper_factor
    from leanfoem.solver import solve_columns

    w, h = layer(out, n)
    torch.cuda.synchronize()
    t = time.perf_counter()
    upper = inverse_upper_factor(h, 0.01).upper
    torch.cuda.synchronize()
    factor_s = time.perf_counter() - t
    del h
    wt0 = w.T.contiguous()
    kw = dict(bits=4, group_size=128, sym=True, beta=0.2)
    row = {"layer": f"{out}x{n}", "factor_s": factor_s}

    solver_s, res = best_of(lambda: solve_columns(wt0.clone(), upper, **kw), repeat)
    row["solver_s"] = solver_s
    ref_s, (ref_codes, ref_loss) = best_of(lambda: block_loop(reference, wt0.clone(), upper, **kw), repeat)
    row["reference_s"] = ref_s
    sweep = {}
    for tile, warps in tiles:
        block_loop(fused, wt0.clone(), upper, tile=tile, num_warps=warps, **kw)  # compile
        s, (codes, loss) = best_of(lambda: block_loop(fused, wt0.clone(), upper, tile=tile, num_warps=warps, **kw),
                                   repeat)
        sweep[f"tile{tile}-warps{warps}"] = s
        print(f"  {out}x{n} fused tile {tile} warps {warps}: {s:.3f} s", flush=True)
    best = min(sweep, key=sweep.get)
    tile, warps = (int(v) for v in best.replace("tile", "").split("-warps"))
    fused_s, (codes, loss) = best_of(lambda: block_loop(fused, wt0.clone(), upper, tile=tile, num_warps=warps, **kw),
                                     repeat)
    row.update(fused_s=fused_s, fused_config=best, sweep=sweep,
               codes_differing_vs_reference=(codes != ref_codes).float().mean().item(),
               codes_differing_vs_solver=(codes != res.codes).float().mean().item(),
               loss_fused=loss, loss_reference=ref_loss, loss_solver=res.loss)
    row.update(bench_pack(res))
    row.update(bench_matmul(res, repeat))
    print(json.dumps(row), flush=True)
    return row


def bench_pack(res) -> dict:
    from leanfoem.kernels.pack import pack_gptq as fused_pack
    from leanfoem.packing import pack_gptq

    args = (res.codes, res.zeros, res.scales, res.g_idx, res.bits)
    fused_pack(*args)
    torch_s, expected = best_of(lambda: pack_gptq(*args), 3)
    fused_s, got = best_of(lambda: fused_pack(*args), 3)
    return {"pack_torch_s": torch_s, "pack_fused_s": fused_s,
            "pack_identical": all(torch.equal(got[k], expected[k]) for k in expected)}


MATMUL_CONFIGS = [(64, 64, 32, 4, 3), (128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 3),
                  (128, 64, 64, 4, 4), (128, 256, 32, 8, 3)]  # block_m, block_n, block_k, warps, stages


def bench_matmul(res, repeat, tokens: int = 2048) -> dict:
    from leanfoem.kernels.dequant import gptq_matmul
    from leanfoem.packing import unpack_gptq

    packed = res.pack()
    x = torch.randn(tokens, res.codes.shape[0], device="cuda", dtype=torch.float16)
    torch_s, expected = best_of(lambda: x @ unpack_gptq(packed, res.bits).half().T, repeat)
    sweep = {}
    for bm, bn, bk, warps, stages in MATMUL_CONFIGS:
        kw = dict(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
        gptq_matmul(x, packed, res.bits, **kw)
        sweep[f"{bm}x{bn}x{bk}-w{warps}-s{stages}"] = (best_of(lambda: gptq_matmul(x, packed, res.bits, **kw), repeat),
                                                       kw)
    best = min(sweep, key=lambda k: sweep[k][0][0])
    (fused_s, got), _ = sweep[best]
    err = ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
    return {"matmul_tokens": tokens, "matmul_unpack_torch_s": torch_s, "matmul_fused_s": fused_s,
            "matmul_rel_maxdiff": err, "matmul_config": best,
            "matmul_sweep": {k: v[0][0] for k, v in sweep.items()}}


def render(results: dict) -> str:
    lines = [
        f"Device: {results['device']}; torch {results['torch']}, triton {results['triton']}.",
        "",
        f"Command: `{results['command']}` (then `python tools/bench_kernels.py --from-json results.json "
        "--write-docs` to write this section).",
        "",
        "FOEM column loop (4 bit, group 128, sym, β = 0.2, H from 4096 correlated random tokens, fp64 factor "
        "not included), best of the repeats, seconds:",
        "",
        "| layer (out × in) | factor (fp64) | solver.solve_columns (torch) | reference block loop (torch) | "
        "fused block loop (Triton) | speed-up vs solver | codes ≠ reference | best config |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["layers"]:
        lines.append(f"| {r['layer']} | {r['factor_s']:.2f} | {r['solver_s']:.3f} | {r['reference_s']:.3f} | "
                     f"{r['fused_s']:.3f} | {r['solver_s'] / r['fused_s']:.1f}× | "
                     f"{r['codes_differing_vs_reference']:.1e} | {r['fused_config']} |")
    lines += ["", "Packing (codes → qweight/qzeros) and x @ Wᵀ from the packed layer (fp16, 2048 tokens), seconds:", "",
              "| layer | pack torch | pack Triton | identical | unpack + matmul torch | fused dequant matmul | rel. max diff "
              "| best config (m×n×k, warps, stages) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results["layers"]:
        lines.append(f"| {r['layer']} | {r['pack_torch_s']:.4f} | {r['pack_fused_s']:.4f} | {r['pack_identical']} | "
                     f"{r['matmul_unpack_torch_s']:.4f} | {r['matmul_fused_s']:.4f} | {r['matmul_rel_maxdiff']:.1e} | "
                     f"{r['matmul_config']} |")
    sweeps = "; ".join(f"{r['layer']}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["sweep"].items())
                       for r in results["layers"])
    lines += ["", f"Fused loop by tile (output features per program) and warps, seconds: {sweeps}.", "",
              "\"codes ≠ reference\" is the fraction of codes that differ from the torch reference on the same GPU: "
              "torch on CUDA divides by a Python scalar as a product with its reciprocal (fit_grid's (max−min)/maxq), "
              "the kernel divides (as torch does on the CPU), so a rare group scale lands on the neighbouring fp16 "
              "value and that row then takes its own path. Against the CPU reference the kernel is bit-exact "
              "(tests/test_kernels.py); the loss differs from the GPU reference's by < 1e-4 (relative).", "",
              "The fused loop's time on the 28672-input layer is mostly the lazy fp32 `addmm_` to the right "
              "(~6.7 TFLOP over the layer), which both loops share. The fused dequant matmul never materialises the "
              "dense W (0.94 GB in fp32 for the down_proj), but at 2048 tokens unpacking to fp16 and calling cuBLAS "
              "is as fast on 4096×4096 and ~3× faster on 8192×28672: use it where the memory is there."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4096x4096,8192x28672", help="out x in, comma separated")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--tiles", default="8x1,16x2,32x4", help="tile x warps configurations of the fused loop")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--from-json", type=Path, help="render these results instead of measuring")
    ap.add_argument("--write-docs", action="store_true", help=f"replace the '## {SECTION}' section of docs/BENCHMARKS.md")
    args = ap.parse_args()
    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        import triton

        tiles = [tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",")]
        results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "command": "python tools/bench_kernels.py " + " ".join(sys.argv[1:]), "layers": []}
        for size in args.sizes.split(","):
            out, n = (int(v) for v in size.split("x"))
            results["layers"].append(bench_layer(out, n, args.repeat, tiles))
            torch.cuda.empty_cache()
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    text = render(results)
    print(text)
    if args.write_docs:
        from benchdoc import replace_section

        replace_section(ROOT / "docs" / "BENCHMARKS.md", SECTION, text)


if __name__ == "__main__":
    main()
