"""GPTQ int32 packing (DESIGN §5), the layout transformers, vLLM and GPTQModel read.

Why it exists: the on-disk format is a bit stream, not a tensor op any library offers.

What must stay true:
- values are packed as one little-endian bit stream per 32 values: value k of a run starts at bit
  bits·k, lowest index in the lowest bits; for 3 bits, 32 values fill 3 words and values 10 and 21
  straddle word boundaries;
- qweight packs along in_features ([in·bits/32, out]); qzeros along out_features ([groups, out·bits/32]);
- checkpoint_format "gptq" stores z − 1 (masked to `bits`), "gptq_v2" stores z.
"""

from __future__ import annotations

import torch

FORMATS = ("gptq", "gptq_v2")


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer values [n, m] (0 ≤ v < 2**bits) along dim 0 into int32 [n·bits/32, m]."""
    n = values.shape[0]
    if n % 32:
        raise ValueError(f"cannot pack {n} values along a dimension that is not a multiple of 32")
    chunk = 256  # bounds the int64 temporaries to 256 rows at a time (a 5632-wide layer: 11 MiB each)
    if n > chunk:
        return torch.cat([pack_rows(values[i:i + chunk], bits) for i in range(0, n, chunk)])
    runs = values.to(torch.int64).reshape(n // 32, 32, *values.shape[1:])
    words = torch.zeros((n // 32, bits, *values.shape[1:]), dtype=torch.int64, device=values.device)
    for k in range(32):
        start = bits * k
        word, shift = divmod(start, 32)
        words[:, word] |= (runs[:, k] << shift) & 0xFFFFFFFF
        if shift + bits > 32:  # the value straddles into the next word
            words[:, word + 1] |= runs[:, k] >> (32 - shift)
    words = words.reshape(n * bits // 32, *values.shape[1:])
    return _as_int32(words)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_rows: int32 [n·bits/32, m] → int64 values [n, m]."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    runs = words.reshape(-1, bits, *packed.shape[1:])
    mask = (1 << bits) - 1
    values = []
    for k in range(32):
        word, shift = divmod(bits * k, 32)
        v = runs[:, word] >> shift
        if shift + bits > 32:
            v = v | (runs[:, word + 1] << (32 - shift))
        values.append(v & mask)
    return torch.stack(values, dim=1).reshape(-1, *packed.shape[1:])


def pack_gptq(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
              checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """codes [in, out], zeros [groups, out] (true z), scales fp16 [groups, out] → GPTQ tensors."""
    if checkpoint_format not in FORMATS:
        raise ValueError(f"checkpoint_format must be one of {FORMATS}, not {checkpoint_format!r}")
    stored_zeros = zeros.to(torch.int64)
    if checkpoint_format == "gptq":
        stored_zeros = (stored_zeros - 1) & ((1 << bits) - 1)
    return {
        "qweight": pack_rows(codes, bits),
        "qzeros": pack_rows(stored_zeros.T, bits).T.contiguous(),
        "scales": scales.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def unpack_gptq(tensors: dict[str, torch.Tensor], bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """Dequantized float32 weight [out, in] of a packed GPTQ layer."""
    codes = unpack_rows(tensors["qweight"], bits).float()
    zeros = unpack_rows(tensors["qzeros"].T.contiguous(), bits).T
    if checkpoint_format == "gptq":
        zeros = (zeros + 1) & ((1 << bits) - 1)
    g = tensors["g_idx"].long()
    scales = tensors["scales"].float()
    return (scales[g] * (codes - zeros.float()[g])).T.contiguous()


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
