"""The Triton kernels of leanfoem/kernels/ against their pure-torch references.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here before triton is
imported), so the shapes are small; with a GPU they are compiled and run on it, and the references run
on the CPU. Select these tests with `pytest -k kernel`.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton
triton = pytest.importorskip("triton", reason="triton is not installed (pip install 'leanfoem[kernels]')")

from leanfoem.kernels import fused_block_step as fused_block_step_for  # noqa: E402
from leanfoem.kernels.block_step import block_step as fused_block_step  # noqa: E402
from leanfoem.kernels.dequant import dequantize_gptq, gptq_matmul  # noqa: E402
from leanfoem.kernels.pack import pack_gptq as fused_pack_gptq  # noqa: E402
from leanfoem.kernels.reference import block_step as reference_block_step  # noqa: E402
from leanfoem.kernels.reference import gptq_matmul as reference_gptq_matmul  # noqa: E402
from leanfoem.packing import pack_gptq, unpack_gptq  # noqa: E402
from leanfoem.solver import solve_columns  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def make_layer(rows, n, seed, alpha, dtype=torch.float32):
    """Wt [n, rows], U of a damped correlated H, P of the GPTAQ term (or None); fp64 factorisation."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    x = (torch.randn(3 * n, n, generator=g, dtype=torch.float64) @ mix
         + 0.3 * torch.randn(3 * n, n, generator=g, dtype=torch.float64)) * torch.logspace(-1, 0.5, n, dtype=torch.float64)
    h = 2 * x.T @ x / x.shape[0]
    h += 0.01 * torch.diag(h).mean() * torch.eye(n, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    p = None
    if alpha:
        native = x + 0.05 * torch.randn(x.shape, generator=g, dtype=torch.float64)
        cross = 2 * (native - x).T @ x / x.shape[0]
        p = (alpha * torch.triu(cross @ u.T, diagonal=1) @ u).to(dtype)
    wt = (torch.randn(n, rows, generator=g, dtype=torch.float64) * 0.05).to(dtype)
    return wt, u.to(dtype), p


def new_outputs(wt, group):
    columns, rows = wt.shape
    groups = -(-columns // group)
    codes = torch.zeros((columns, rows), dtype=torch.uint8, device=wt.device)
    scales = torch.zeros((groups, rows), dtype=wt.dtype, device=wt.device)
    return codes, scales, scales.clone()


def solve(step, wt, u, p, *, bits, group_size, sym, beta, block_size=128, **kw):
    """The solver's block loop around `step`; returns codes, scales, zeros, loss."""
    wt = wt.clone()
    columns = wt.shape[0]
    group = columns if group_size == -1 else group_size
    original = wt.clone() if beta else None
    codes, scales, zeros = new_outputs(wt, group)
    loss = 0.0
    for b0 in range(0, columns, block_size):
        b1 = min(b0 + block_size, columns)
        errors, block, scaled = step(wt, u, b0, b1, codes, scales, zeros, bits=bits, group=group, sym=sym,
                                     beta=beta, original=original, gptaq=p, **kw)
        loss += float(scaled.double().square().sum())
        if b1 < columns:
            wt[b1:].addmm_(u[b0:b1, b1:].T, errors, alpha=-1)
            if p is not None:
                wt[b1:].addmm_(p[b0:b1, b1:].T, block)
    return codes, scales, zeros, loss


# (bits, group_size, sym, beta, alpha, tile): every bit width, group 32/64/128/per-row and one group (48)
# that starts inside a block and ends in the next, sym/asym, FOEM β and GPTAQ α each on and off
CASES = [
    (4, 128, True, 0.0, 0.0, 64),
    (4, 128, True, 0.2, 0.0, 64),
    (3, 64, False, 0.1, 0.0, 64),
    (2, 32, False, 0.25, 0.0, 64),
    (8, -1, True, 0.2, 0.0, 64),
    (4, 48, False, 0.2, 0.25, 64),
    (3, 128, True, 0.0, 0.25, 64),
    (8, 32, False, 0.0, 0.0, 64),
    (2, -1, True, 0.2, 0.25, 16),   # 37 rows over three programs, the last one 5 rows wide
]


def case_id(case):
    bits, group, sym, beta, alpha, tile = case
    return f"w{bits}g{group}{'sym' if sym else 'asym'}-beta{beta}-alpha{alpha}-tile{tile}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_block_step_kernel_matches_reference_block_by_block(case):
    """Each block: the kernel (on DEVICE) and the reference (on the CPU) from the same state, then the
    reference's lazy update; 37 rows, 160 columns = one full block and a 32-column one."""
    bits, group_size, sym, beta, alpha, tile = case
    wt, u, p = make_layer(37, 160, seed=bits, alpha=alpha)
    columns = wt.shape[0]
    group = columns if group_size == -1 else group_size
    original = wt.clone() if beta else None
    codes, scales, zeros = new_outputs(wt, group)

    def dev(t):
        return None if t is None else t.to(DEVICE).clone()

    for b0 in range(0, columns, 128):
        b1 = min(b0 + 128, columns)
        k_codes, k_scales, k_zeros = dev(codes), dev(scales), dev(zeros)
        k_out = fused_block_step(dev(wt), dev(u), b0, b1, k_codes, k_scales, k_zeros, bits=bits, group=group,
                                 sym=sym, beta=beta, original=dev(original), gptaq=dev(p), tile=tile)
        r_out = reference_block_step(wt, u, b0, b1, codes, scales, zeros, bits=bits, group=group, sym=sym,
                                     beta=beta, original=original, gptaq=p)
        assert torch.equal(k_codes.cpu(), codes), f"codes differ in block {b0}"
        assert torch.equal(k_scales.cpu(), scales) and torch.equal(k_zeros.cpu(), zeros)
        for name, k, r in zip(("errors", "block", "scaled errors"), k_out, r_out):
            assert k.shape == r.shape == (b1 - b0, 37)
            torch.testing.assert_close(k.cpu(), r, rtol=1e-6, atol=1e-7, msg=f"{name} of block {b0}")
        errors, block, _ = r_out
        if b1 < columns:
            wt[b1:].addmm_(u[b0:b1, b1:].T, errors, alpha=-1)
            if p is not None:
                wt[b1:].addmm_(p[b0:b1, b1:].T, block)


@pytest.mark.parametrize("beta,alpha", [(0.2, 0.25)])
def test_block_step_kernel_whole_layer_loop(beta, alpha):
    """The whole solver loop with the kernel vs with the reference, both on DEVICE (lazy updates included)."""
    wt, u, p = make_layer(40, 200, seed=9, alpha=alpha)
    wt, u, p = wt.to(DEVICE), u.to(DEVICE), p.to(DEVICE)
    kw = dict(bits=4, group_size=64, sym=False, beta=beta)
    k_codes, k_scales, k_zeros, k_loss = solve(fused_block_step, wt, u, p, tile=64, **kw)
    r_codes, r_scales, r_zeros, r_loss = solve(reference_block_step, wt, u, p, **kw)
    if INTERPRETED:
        assert torch.equal(k_codes, r_codes) and torch.equal(k_scales, r_scales) and torch.equal(k_zeros, r_zeros)
    else:  # torch on CUDA divides by a scalar as a product with its reciprocal: a rare grid may differ
        assert (k_codes != r_codes).float().mean().item() < 1e-3
    assert k_loss == pytest.approx(r_loss, rel=1e-4)


def test_reference_block_step_kernel_oracle_reproduces_the_solver():
    """The oracle is the solver's block loop factored out: in fp64 both give the same codes and loss."""
    wt, u, p = make_layer(24, 288, seed=4, alpha=0.25, dtype=torch.float64)
    for kw in (dict(bits=3, group_size=48, sym=False, beta=0.2), dict(bits=4, group_size=-1, sym=True, beta=0.0)):
        codes, scales, zeros, loss = solve(reference_block_step, wt, u, p, **kw)
        res = solve_columns(wt.clone(), u, gptaq=p, **kw)
        assert torch.equal(codes, res.codes)
        assert torch.equal(scales.half(), res.scales) and torch.equal(zeros.int(), res.zeros)
        assert loss == pytest.approx(res.loss, rel=1e-9)


def test_fused_block_step_only_for_float32_cuda():
    step = fused_block_step_for(torch.zeros(1, device=DEVICE))
    assert step is (fused_block_step if DEVICE == "cuda" else None)
    assert fused_block_step_for(torch.zeros(1, dtype=torch.float64, device=DEVICE)) is None
    assert fused_block_step_for(torch.zeros(1, device=DEVICE), block_size=256) is None


def test_block_step_kernel_rejects_wide_blocks_and_other_dtypes():
    wt, u, _ = make_layer(8, 160, seed=0, alpha=0.0)
    codes, scales, zeros = new_outputs(wt, 32)
    with pytest.raises(ValueError, match="1..128"):
        fused_block_step(wt, u, 0, 160, codes, scales, zeros, bits=4, group=32, sym=True)
    with pytest.raises(ValueError, match="float32"):
        fused_block_step(wt.double(), u, 0, 128, codes, scales, zeros, bits=4, group=32, sym=True)


def packed_layer(bits, fmt, n_in=96, out=64, seed=0, act_order=False):
    g = torch.Generator().manual_seed(bits * 10 + seed)
    groups = n_in // 32
    codes = torch.randint(0, 2**bits, (n_in, out), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 2**bits, (groups, out), generator=g, dtype=torch.int32)
    zeros[0, 0] = 0  # "gptq" stores z − 1: z = 0 wraps to the top code
    scales = (torch.rand(groups, out, generator=g) * 0.02).half()
    g_idx = torch.arange(n_in, dtype=torch.int32) // 32
    if act_order:
        g_idx = g_idx[torch.randperm(n_in, generator=g)]
    return codes, zeros, scales, g_idx


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_pack_kernel_matches_reference_bit_for_bit(bits, fmt):
    codes, zeros, scales, g_idx = packed_layer(bits, fmt, out=96)
    expected = pack_gptq(codes, zeros, scales, g_idx, bits, fmt)
    got = fused_pack_gptq(codes.to(DEVICE), zeros.to(DEVICE), scales.to(DEVICE), g_idx.to(DEVICE), bits, fmt)
    for name in expected:
        assert got[name].dtype == expected[name].dtype
        assert torch.equal(got[name].cpu(), expected[name]), name


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_dequant_kernel_matches_unpack_and_matmul(bits, fmt):
    codes, zeros, scales, g_idx = packed_layer(bits, fmt, act_order=bits == 3)
    packed = pack_gptq(codes, zeros, scales, g_idx, bits, fmt)
    on_dev = {k: v.to(DEVICE) for k, v in packed.items()}
    weight = unpack_gptq(packed, bits, fmt)
    assert torch.equal(dequantize_gptq(on_dev, bits, fmt).cpu(), weight)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 96, generator=g)  # 37 tokens: a ragged tile
    bias = torch.randn(64, generator=g)
    expected = reference_gptq_matmul(x, packed, bits, fmt, bias=bias)
    got = gptq_matmul(x.to(DEVICE), on_dev, bits, fmt, bias=bias.to(DEVICE)).cpu()
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)
    half = gptq_matmul(x.half().to(DEVICE), on_dev, bits, fmt).cpu()
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), x @ weight.T, rtol=2e-2, atol=2e-2 * scale)


@pytest.mark.skipif(DEVICE != "cuda", reason="a layer this size needs a GPU (the interpreter is too slow)")
def test_block_step_kernel_larger_layer_on_gpu():
    wt, u, p = make_layer(1000, 640, seed=21, alpha=0.25)
    kw = dict(bits=4, group_size=128, sym=True, beta=0.2)
    k_codes, k_scales, k_zeros, k_loss = solve(fused_block_step, wt.cuda(), u.cuda(), p.cuda(), **kw)
    r_codes, r_scales, r_zeros, r_loss = solve(reference_block_step, wt, u, p, **kw)
    assert (k_codes.cpu() != r_codes).float().mean().item() < 1e-3
    assert k_loss == pytest.approx(r_loss, rel=1e-3)
