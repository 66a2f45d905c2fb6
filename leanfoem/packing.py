"""GPTQ int32 packing (DESIGN §5), the layout transformers, vLLM and GPTQModel read.

Why it exists: the on-disk format is a bit stream, not a tensor op any library offers.

What must stay true:
- values are packed as one little-endian bit stream per 32 values: value k of a run starts at bit
  bits·k, lowest index in the lowest bits; for 3 bits, 32 values fill 3 words and values 10 and 21
  straddle word boundaries;
- qweight packs along in_features ([in·bits/32, out]); qzeros along out_features ([groups, out·bits/32]);
- checkpoint_format "gptq" stores z − 1 (masked to `bits`), "gptq_v2" stores z;
- reading back (`dense_tensors`, `dequantize_chunked`) gives `unpack_gptq`'s float32 weight bit for bit, however
  many input features are dequantized at a time.
"""

from __future__ import annotations

import torch

FORMATS = ("gptq", "gptq_v2")
PACKED_PARTS = ("qweight", "qzeros", "scales", "g_idx")  # one packed linear
DEQUANT_COLUMNS = 1024  # input features dequantized at a time (a multiple of 32)


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


def dense_tensors(tensors: dict[str, torch.Tensor], gptq: dict | None) -> dict[str, torch.Tensor]:
    """A block's tensors with every packed GPTQ linear replaced by its dequantized `.weight` (float32)."""
    if gptq is None:
        return tensors
    out = dict(tensors)
    for name in [n for n in tensors if n.endswith(".qweight")]:
        base = name[: -len(".qweight")]
        parts = {k: out.pop(f"{base}.{k}") for k in PACKED_PARTS}
        out[base + ".weight"] = dequantize_chunked(parts, gptq["bits"], gptq["format"])
    return out


def weight_names(names: list[str]) -> list[str]:
    """Stored names with every packed linear named by the `.weight` it dequantizes to: how transformers' conversion
    mapping (`layout.py`) recognises a GPTQ checkpoint's per-expert tensors."""
    packed = tuple(f".{part}" for part in PACKED_PARTS[1:])
    return [n[: -len(".qweight")] + ".weight" if n.endswith(".qweight") else n for n in names
            if not n.endswith(packed)]


def stored_names(weight: str, stored: set[str]) -> list[str]:
    """The stored tensors a `.weight` of `weight_names(stored)` is read from: itself, or its packed parts."""
    if weight in stored:
        return [weight]
    base = weight[: -len(".weight")]
    return [f"{base}.{part}" for part in PACKED_PARTS]


def dequantize_chunked(parts: dict[str, torch.Tensor], bits: int, checkpoint_format: str,
                       columns: int = DEQUANT_COLUMNS) -> torch.Tensor:
    """`unpack_gptq` over runs of `columns` input features: its int64 temporaries are ~6× the dense layer
    (a 70B down_proj: ~6 GB at once), per run they stay small. Runs are multiples of 32 inputs, which fill
    `bits` whole qweight rows in every bit width (3 bit included)."""
    qweight, g_idx = parts["qweight"], parts["g_idx"]
    n = g_idx.numel()
    out = torch.empty((qweight.shape[1], n), dtype=torch.float32)
    for start in range(0, n, columns):
        stop = min(start + columns, n)
        chunk = {"qweight": qweight[start * bits // 32: stop * bits // 32], "qzeros": parts["qzeros"],
                 "scales": parts["scales"], "g_idx": g_idx[start:stop]}
        out[:, start:stop] = unpack_gptq(chunk, bits, checkpoint_format)
    return out


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
