"""The solver against an independent, plainly written fp64 implementation of DESIGN §3."""

import pytest
import torch

from leanfoem import FactorizationError, quantize_weight
from leanfoem.hessian import _all_finite, inverse_upper_factor
from leanfoem.solver import prepare_hessian, quantize_prepared, solve_columns


def correlated_inputs(tokens, n, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    scale = torch.logspace(-1, 0.5, n, dtype=torch.float64)
    return (torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix + 0.3 * torch.randn(
        tokens, n, generator=g, dtype=torch.float64)) * scale


def make_problem(rows=48, n=160, seed=0, dead=(5,)):
    g = torch.Generator().manual_seed(seed + 1)
    x = correlated_inputs(4 * n, n, seed)
    x[:, list(dead)] = 0
    native = x + 0.05 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    w = torch.randn(rows, n, generator=g, dtype=torch.float64) * 0.05
    h = 2 * x.T @ x / x.shape[0]
    cross = 2 * (native - x).T @ x / x.shape[0]
    return w, h, cross, x


def oracle_grid(cols, bits, sym):
    """Per-row grid of one group; cols [rows, g]."""
    maxq = 2**bits - 1
    lo = torch.clamp(cols.min(dim=1).values, max=0)
    hi = torch.clamp(cols.max(dim=1).values, min=0)
    if sym:
        hi = torch.maximum(hi, -lo)
        lo = -hi
    both_zero = (lo == 0) & (hi == 0)
    lo[both_zero], hi[both_zero] = -1, 1
    scale = torch.clamp_min((hi - lo) / maxq, 2.0**-24)
    zero = torch.full_like(scale, (maxq + 1) // 2) if sym else torch.clamp(torch.round(-lo / scale), 0, maxq)
    return scale, zero


def oracle(w, h, *, bits, group_size, sym, alpha=0.0, beta=0.0, cross=None, damp=0.01, block=128):
    """Column by column with every update applied at once (no lazy blocks), textbook inverse.

    Returns the codes [rows, n], each row's loss, and each code's tie margin: the distance of w/s (+ z) from the
    nearest rounding boundary (a half-integer), in grid steps. A margin of ~1e-15 is a tie that only the last bit
    of w decides: the max-|w| entry of a symmetric group sits exactly at ±maxq/2 by construction."""
    w, h = w.double().clone(), h.double().clone()
    rows, n = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diag(h).mean() * torch.eye(n, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    p = torch.zeros_like(u)
    if alpha:
        cross = cross.double().clone()
        cross[:, dead] = 0
        p = alpha * torch.triu(cross @ u.T, diagonal=1) @ u
    w0 = w.clone()
    group = n if group_size == -1 else group_size
    codes = torch.zeros(rows, n, dtype=torch.long)
    margins = torch.zeros(rows, n, dtype=torch.float64)
    row_losses = torch.zeros(rows, dtype=torch.float64)
    for c in range(n):
        block_end = min((c // block + 1) * block, n)
        if c % block == 0:
            at_block_start = w.clone()  # what the reference reads group grids from
        if c % group == 0:
            scale, zero = oracle_grid(at_block_start[:, c:c + group], bits, sym)
        col = w[:, c].clone()
        code = torch.clamp(torch.round(col / scale) + zero, 0, 2**bits - 1)
        q = scale * (code - zero)
        codes[:, c] = code.long()
        margins[:, c] = ((col / scale) - torch.floor(col / scale) - 0.5).abs()
        d = u[c, c]
        row_losses += (col - q) ** 2 / d**2
        err = ((col - q) - beta * (col - w0[:, c])) / d
        inside, outside = slice(c + 1, block_end), slice(block_end, n)
        w[:, inside] -= torch.outer(err, u[c, inside]) - torch.outer(col, p[c, inside])
        after_step = col - err * d  # the column as the lazy update of the reference sees it
        w[:, outside] -= torch.outer(err, u[c, outside]) - torch.outer(after_step, p[c, outside])
        if beta and c + 1 < block_end:
            w[:, c + 1] -= beta * (w[:, c + 1] - w0[:, c + 1])
    return codes, row_losses, margins


def summation_order_differences(codes, row_losses, oracle_codes, oracle_row_losses, margins, tie=1e-9):
    """What separates the solver's result from the oracle's beyond the order of summation (empty: nothing).

    The two sum the same fp64 terms in different orders (the oracle applies every update at once as a rank-1
    update, the solver lazily as one GEMM per block), so on another BLAS a code at a tie can round the other way.
    The error feedback then carries that flip along the rest of its row (rows are independent), so: a row whose
    codes all agree must have the oracle's loss to 1e-9; a row that differs must first differ at a tie."""
    problems = []
    for r in range(codes.shape[0]):
        differ = torch.nonzero(codes[r] != oracle_codes[r]).flatten()
        if len(differ) == 0:
            if row_losses[r] != pytest.approx(oracle_row_losses[r].item(), rel=1e-9):
                problems.append(f"row {r}: same codes, loss {row_losses[r]:.12g} vs {oracle_row_losses[r]:.12g}")
        elif margins[r, differ[0]] > tie:
            problems.append(f"row {r}: first differs at column {differ[0]}, {margins[r, differ[0]]:.2g} from a tie")
    return problems


CASES = [
    dict(bits=4, group_size=128, sym=True, beta=0.0),
    dict(bits=4, group_size=128, sym=True, beta=0.2),
    dict(bits=3, group_size=64, sym=False, beta=0.1),
    dict(bits=2, group_size=32, sym=False, beta=0.25),
    dict(bits=8, group_size=-1, sym=True, beta=0.2),
    dict(bits=4, group_size=48, sym=False, beta=0.2, alpha=0.25),
    dict(bits=3, group_size=128, sym=True, beta=0.0, alpha=0.25),
]


def fp64_solution(case, w, h, cross, *, beta=None, swap_u_columns=None):
    """The loop under test, run in fp64 with the oracle's own factor; `beta` and `swap_u_columns` plant defects."""
    hd = h.clone()
    dead = torch.diag(hd) == 0
    hd[dead, dead] = 1
    hd += 0.01 * torch.diag(hd).mean() * torch.eye(hd.shape[0], dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(hd), upper=True)
    wt = w.T.contiguous().clone()
    wt[dead] = 0
    gptaq = None
    if case.get("alpha"):
        c = cross.clone()
        c[:, dead] = 0
        gptaq = case["alpha"] * torch.triu(c @ u.T, diagonal=1) @ u
    if swap_u_columns:
        i, j = swap_u_columns
        u[:, [i, j]] = u[:, [j, i]]
    return solve_columns(wt, u, bits=case["bits"], group_size=case["group_size"], sym=case["sym"],
                         beta=case["beta"] if beta is None else beta, gptaq=gptaq)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_column_loop_matches_independent_oracle_in_fp64(case):
    """Equal to the oracle up to the order of summation (see summation_order_differences)."""
    w, h, cross, _ = make_problem(n=288)  # 288 = two full blocks and a ragged third
    res = fp64_solution(case, w, h, cross)
    codes, row_losses, margins = oracle(w, h, cross=cross, **case)
    assert summation_order_differences(res.codes.long().T, res.row_losses, codes, row_losses, margins) == []
    differing_rows = (res.codes.long().T != codes).any(dim=1).sum().item()
    assert differing_rows <= 0.1 * w.shape[0]  # ties are rare: ~one per (row, group) whose max |w| starts a block


@pytest.mark.parametrize("defect", ["beta ignored", "U columns 100 and 101 swapped", "U columns 200 and 230 swapped"])
def test_the_fp64_comparison_still_catches_a_wrong_solver(defect):
    """The tolerance of the comparison above lets ties go either way, and nothing else."""
    case = CASES[1]  # 4 bit, g128, FOEM β = 0.2
    w, h, cross, _ = make_problem(n=288)
    planted = dict(beta=0.0) if defect == "beta ignored" else \
        dict(swap_u_columns=tuple(int(c) for c in defect.split()[2::2]))
    res = fp64_solution(case, w, h, cross, **planted)
    codes, row_losses, margins = oracle(w, h, cross=cross, **case)
    problems = summation_order_differences(res.codes.long().T, res.row_losses, codes, row_losses, margins)
    assert len(problems) > w.shape[0] // 2


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_quantize_weight_fp32_agrees_with_oracle(case):
    w, h, cross, _ = make_problem(n=288, seed=3)
    alpha = case.get("alpha", 0.0)
    method = "foem" if case["beta"] or not alpha else "gptaq"
    codes, row_losses, _ = oracle(w, h, cross=cross, **case)
    loss = row_losses.sum().item()
    res = quantize_weight(w.float(), h.float(), method=method, cross=cross.float(), damp=0.01,
                          **{k: v for k, v in case.items()})
    differing = (res.codes.long().T != codes).float().mean().item()
    assert differing < 0.01
    assert res.loss == pytest.approx(loss, rel=0.01)
    assert res.damp == 0.01


def test_beta_zero_is_gptq_exactly():
    w, h, _, _ = make_problem(seed=5)
    foem = quantize_weight(w.float(), h.float(), method="foem", beta=0.0, group_size=32)
    gptq = quantize_weight(w.float(), h.float(), method="gptq", group_size=32)
    assert torch.equal(foem.codes, gptq.codes) and foem.loss == gptq.loss
    beta = quantize_weight(w.float(), h.float(), method="foem", beta=0.2, group_size=32)
    assert not torch.equal(beta.codes, gptq.codes)


@pytest.mark.parametrize("method", ["rtn", "foem"])
def test_stacked_layers_split_back_into_their_own_solutions(method):
    """A sub-group's layers share H: stacked along the output rows they are solved in one column loop (the loop is
    row-separable), and split() gives each layer what solving it alone gives."""
    w, h, _, _ = make_problem(rows=96, seed=11)
    first, second = w[:64].float(), w[64:].float()
    kw = dict(method=method, bits=4, group_size=32, beta=0.2)
    alone = [quantize_weight(first, h.float(), **kw), quantize_weight(second, h.float(), **kw)]
    parts = quantize_weight(torch.cat([first, second]), h.float(), **kw).split([64, 32])
    for part, single in zip(parts, alone):
        assert torch.equal(part.codes, single.codes) and torch.equal(part.scales, single.scales)
        assert torch.equal(part.zeros, single.zeros) and torch.equal(part.dequantized, single.dequantized)
        assert part.loss == pytest.approx(single.loss, rel=1e-9)
        assert part.g_idx.data_ptr() != parts[0].g_idx.data_ptr() or part is parts[0]  # own tensors for a shard
    with pytest.raises(ValueError, match="add up to"):
        quantize_weight(first, h.float(), **kw).split([32, 16])


def test_solve_in_the_callers_storage_only_when_told():
    """The pipeline stacks a sub-group's weights in the solver's [in, out] layout and lets the loop work in them
    (overwrite=True: one copy fewer at the block's peak); anyone else's weight is left as it was, whatever its layout."""
    w, h, _, _ = make_problem(rows=64, seed=5)
    prepared = prepare_hessian(h.float(), damp=0.01, desc_act=False)
    kw = dict(bits=4, group_size=32, sym=True, method="foem", beta=0.2)
    stacked = w.float().T.contiguous()  # [in, out]: its transpose is the weight, and is a free view of it
    before = stacked.clone()
    kept = quantize_prepared(stacked.T, prepared, **kw)
    assert torch.equal(stacked, before)
    spent = quantize_prepared(stacked.T, prepared, overwrite=True, **kw)
    assert not torch.equal(stacked, before)  # the loop's updates landed in the caller's storage
    assert torch.equal(spent.codes, kept.codes) and torch.equal(spent.scales, kept.scales)


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_and_foem_beat_round_to_nearest_on_correlated_inputs(bits):
    g = torch.Generator().manual_seed(7)
    mix = torch.randn(256, 256, generator=g) / 16
    x = torch.randn(1024, 256, generator=g) @ mix + 0.3 * torch.randn(1024, 256, generator=g)
    w, h = torch.randn(64, 256, generator=g) * 0.05, x.T @ x

    def output_error(res):
        return ((w - res.dequantized) @ x.T).square().sum().item()

    rtn = output_error(quantize_weight(w, h, method="rtn", bits=bits, group_size=64))
    gptq = output_error(quantize_weight(w, h, method="gptq", bits=bits, group_size=64))
    foem = output_error(quantize_weight(w, h, method="foem", beta=0.1, bits=bits, group_size=64))
    assert gptq < 0.8 * rtn
    assert foem < 0.8 * rtn


def test_desc_act_permutes_columns_and_records_group_of_each_input():
    w, h, _, _ = make_problem(n=256, seed=11, dead=())
    res = quantize_weight(w.float(), h.float(), method="gptq", desc_act=True, group_size=64)
    order = torch.argsort(torch.diag(h), descending=True, stable=True)
    expected = torch.empty(256, dtype=torch.int32)
    expected[order] = torch.arange(256, dtype=torch.int32) // 64
    assert torch.equal(res.g_idx, expected)
    assert res.desc_act
    # the packed layer reproduces the dequantized weights through g_idx
    g = res.g_idx.long()
    manual = res.scales.float()[g] * (res.codes.float() - res.zeros.float()[g])
    assert torch.equal(manual.T, res.dequantized)


def test_dead_inputs_get_zero_weight_columns():
    w, h, _, _ = make_problem(seed=13, dead=(5, 77))
    res = quantize_weight(w.float(), h.float(), method="foem", group_size=32)
    assert torch.all(res.dequantized[:, [5, 77]] == 0)


def test_partial_last_group():
    w, h, _, _ = make_problem(n=576 // 4, seed=17)  # 144 inputs, group 128 → one full and one partial group
    res = quantize_weight(w.float(), h.float(), group_size=128)
    assert res.scales.shape == (2, w.shape[0])
    assert res.g_idx.tolist() == [0] * 128 + [1] * 16


def test_ill_conditioned_hessian_factorised_in_fp64_without_extra_damping():
    n = 256
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    h = basis @ torch.diag(torch.logspace(-10, 0, n, dtype=torch.float64)) @ basis.T
    h = (h + h.T) / 2
    assert torch.linalg.cholesky_ex(h.float()).info.item() != 0, "fp32 must reject this H for the test to mean anything"
    w = torch.randn(32, n, generator=g) * 0.05
    res = quantize_weight(w, h, damp=0.0, method="gptq", group_size=64)
    assert res.damp == 0.0 and res.stats["damp_tried"] == [0.0]
    assert torch.isfinite(res.dequantized).all()


def test_damping_raised_in_steps_and_reported():
    n = 64
    h = -0.1 * torch.eye(n, dtype=torch.float64)
    h[0, 0] = 100.0  # mean diag 1.46: H + λI is indefinite until λ > 0.1
    f = inverse_upper_factor(h, 0.01)
    assert f.damp > 0.01 and f.tried[0] == 0.01 and f.tried[-1] == f.damp


def test_unfactorisable_hessian_raises_instead_of_falling_back():
    h = torch.full((32, 32), float("nan"))
    with pytest.raises(FactorizationError, match="NaN"):
        quantize_weight(torch.randn(8, 32), h, method="gptq", group_size=32)
    h = torch.eye(32)
    h[31, 5] = float("inf")
    with pytest.raises(FactorizationError, match="NaN or Inf"):
        inverse_upper_factor(h, 0.01)
    assert not _all_finite(h, rows=4) and _all_finite(torch.eye(32), rows=4)
    h = torch.full((32, 32), 3e38)  # every entry finite, their sum is not: the row blocks decide
    assert _all_finite(h, rows=4)
    h[31, 3] = float("-inf")
    assert not _all_finite(h, rows=4)
    h = -torch.eye(32) * 100
    h[0, 0] = 3300.0  # mean diag 3.125: even damping of 1.0 × mean cannot lift the rest above 0
    with pytest.raises(FactorizationError, match="failed at every damping"):
        quantize_weight(torch.randn(8, 32), h, method="gptq", group_size=32)


def test_bad_arguments_are_named():
    w, h = torch.randn(8, 32), torch.eye(32)
    with pytest.raises(ValueError, match="bits"):
        quantize_weight(w, h, bits=5)
    with pytest.raises(ValueError, match="method"):
        quantize_weight(w, h, method="awq")
    with pytest.raises(ValueError, match="cross"):
        quantize_weight(w, h, method="gptaq", alpha=0.25)
    with pytest.raises(ValueError, match="hessian must be"):
        quantize_weight(w, torch.eye(16))
    with pytest.raises(ValueError, match="NaN"):
        quantize_weight(w * float("nan"), h)


def test_accelerator_factorisation_path_agrees_with_lapack():
    """The torch path (used on GPUs) against the LAPACK path (CPU), run here on the CPU."""
    from leanfoem.hessian import _factor_lapack, _factor_torch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1500, 700, generator=g)
    h = x.T @ x
    damping = 0.01 * h.diagonal().mean().item()
    u_lapack, cond_lapack = _factor_lapack(h.clone(), damping, overwrite=False)
    target = h.clone()
    u_torch, cond_torch = _factor_torch(target, damping, overwrite=True)
    assert u_torch.data_ptr() == target.data_ptr()  # U written into H's storage
    assert torch.allclose(u_torch, u_lapack, rtol=1e-5, atol=1e-7)
    assert cond_torch == pytest.approx(cond_lapack, rel=1e-9)
    hd = h.double() + damping * torch.eye(700, dtype=torch.float64)
    assert torch.allclose(u_torch.double().T @ u_torch.double() @ hd, torch.eye(700, dtype=torch.float64), atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tile", [None, 64, 100])
def test_hessian_accumulation_by_tiles_equals_the_plain_gram(monkeypatch, dtype, tile):
    """H = (2/T)·Σ XᵀX, whether one syrk call fills it (SmolLM2's widths) or tiles do (wider than GRAM_TILE: no BLAS
    call wider than that, see hessian._add_gram); summed in another order, so to a stated tolerance."""
    import leanfoem.hessian as hessian
    if tile:
        monkeypatch.setattr(hessian, "GRAM_TILE", tile)
        monkeypatch.setattr(hessian, "GRAM_TILE_TOKENS", 48)  # the token pieces of a diagonal tile, ragged too
    x = correlated_inputs(300, 230, seed=2).to(dtype)  # 230 = three full 64-tiles and a ragged fourth
    accumulator = hessian.HessianAccumulator(230, dtype=dtype, chunk_tokens=128)
    accumulator.add_batch(x[:100])
    accumulator.add_batch(x[100:].reshape(4, 50, 230))
    h, _ = accumulator.scaled()
    expected = 2 * x.double().T @ x.double() / 300
    assert torch.equal(h, h.T)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert (h.double() - expected).abs().max().item() <= tolerance * expected.abs().max().item()


def test_wide_cpu_factorisation_by_tiles_agrees_with_lapack_whole(monkeypatch):
    """Wider than FACTOR_WHOLE, the CPU factor goes by tiles (no library call wider than one: see
    hessian._factor_blocked). Against LAPACK on the whole matrix: the same U to fp32 rounding, zero below the
    diagonal, written into H's storage when allowed, and a matrix that is not positive definite is refused."""
    import leanfoem.hessian as hessian
    monkeypatch.setattr(hessian, "FACTOR_BLOCK", 64)
    x = correlated_inputs(400, 230, seed=4).float()  # 230 = three full tiles and a ragged fourth
    h = x.T @ x
    damping = 0.01 * h.diagonal().double().mean().item()
    whole, condition = hessian._factor_lapack(h.clone(), damping, overwrite=False)
    target = h.clone()
    tiled, tiled_condition = hessian._factor_blocked(target, damping, overwrite=True)
    assert tiled.data_ptr() == target.data_ptr()
    assert torch.equal(torch.tril(tiled, -1), torch.zeros_like(tiled))
    assert (tiled - whole).abs().max().item() <= 1e-6 * whole.abs().max().item()
    assert tiled_condition == pytest.approx(condition, rel=1e-9)
    indefinite = h.clone()
    indefinite[200, 200] = -1.0
    assert hessian._factor_blocked(indefinite, 0.0, overwrite=False) is None
    monkeypatch.setattr(hessian, "FACTOR_WHOLE", 100)  # and inverse_upper_factor takes this path past FACTOR_WHOLE
    factor = inverse_upper_factor(h.clone(), 0.01)
    assert (factor.upper - whole).abs().max().item() <= 1e-6 * whole.abs().max().item()
