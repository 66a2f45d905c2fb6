"""GPTQ packing against a separate bit-level decoder written from DESIGN §5."""

import pytest
import torch

from leanfoem import quantize_weight
from leanfoem.packing import pack_gptq, unpack_gptq


def read_bits(words, bit_position, bits):
    """Value stored at `bit_position` of a little-endian stream of 32-bit words (python ints)."""
    value = 0
    for b in range(bits):
        pos = bit_position + b
        word = words[pos // 32] & 0xFFFFFFFF
        value |= ((word >> (pos % 32)) & 1) << b
    return value


def decode_qweight(qweight, bits, n_in):
    rows, out = qweight.shape
    codes = [[0] * n_in for _ in range(out)]
    for j in range(out):
        column = [int(v) for v in qweight[:, j]]
        for k in range(n_in):
            codes[j][k] = read_bits(column, k * bits, bits)
    return torch.tensor(codes).T  # [in, out]


def decode_qzeros(qzeros, bits, out):
    return torch.tensor([[read_bits([int(v) for v in row], j * bits, bits) for j in range(out)] for row in qzeros])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_pack_round_trips_through_an_independent_decoder(bits, fmt):
    g = torch.Generator().manual_seed(bits)
    n_in, out, groups = 96, 64, 3
    codes = torch.randint(0, 2**bits, (n_in, out), generator=g, dtype=torch.uint8)
    zeros = torch.randint(1, 2**bits, (groups, out), generator=g, dtype=torch.int32)
    zeros[0, 0] = 0  # the "gptq" format stores z - 1: z = 0 wraps to the top code
    scales = torch.rand(groups, out, generator=g).half()
    g_idx = torch.arange(n_in, dtype=torch.int32) // 32
    packed = pack_gptq(codes, zeros, scales, g_idx, bits, fmt)
    assert packed["qweight"].dtype == torch.int32 and packed["qweight"].shape == (n_in * bits // 32, out)
    assert packed["qzeros"].dtype == torch.int32 and packed["qzeros"].shape == (groups, out * bits // 32)
    assert torch.equal(decode_qweight(packed["qweight"], bits, n_in), codes.long())
    stored = decode_qzeros(packed["qzeros"], bits, out)
    expected = (zeros.long() - 1) % 2**bits if fmt == "gptq" else zeros.long()
    assert torch.equal(stored, expected)
    assert torch.equal(packed["scales"], scales) and torch.equal(packed["g_idx"], g_idx)


def test_three_bit_values_straddle_word_boundaries():
    codes = torch.zeros(32, 32, dtype=torch.uint8)
    codes[10, 0] = 0b111  # bits 30..32: two in word 0, one in word 1
    codes[21, 0] = 0b101  # bits 63..65: one in word 1, two in word 2
    q = pack_gptq(codes, torch.ones(1, 32, dtype=torch.int32), torch.ones(1, 32).half(),
                  torch.zeros(32, dtype=torch.int32), 3)["qweight"][:, 0].tolist()
    assert [w & 0xFFFFFFFF for w in q] == [0b11 << 30, 1 | (1 << 31), 0b10]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("sym", [True, False])
def test_solver_result_packs_to_its_dequantized_weights(bits, fmt, sym):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 160, generator=g)
    w = torch.randn(64, 160, generator=g) * 0.05
    res = quantize_weight(w, x.T @ x, bits=bits, group_size=64, sym=sym, desc_act=not sym)
    packed = res.pack(fmt)
    assert torch.equal(unpack_gptq(packed, bits, fmt), res.dequantized)
