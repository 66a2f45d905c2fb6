"""How a source checkpoint stores its weights: full precision, FP8 in scaled blocks (read dequantized), or a stored
quantization leanfoem refuses.

Why it exists: DeepSeek-V3/R1, GLM-4.5-FP8 and the Qwen3 FP8 releases ship only in FP8. Each linear's `weight` is
float8_e4m3fn and `weight_scale_inv` holds one float per block of config.json's
`quantization_config.weight_block_size` ([128, 128]): W = fp8 · scale, block-wise, the last blocks padded for the
scale grid and cut after. Reading them dequantized lets the official checkpoints quantize without a conversion step
and without anything downstream (pipeline, eval, the tensors copied as they are) knowing about FP8.

What must stay true:
- a dequantized weight is the product in fp32 rounded once to bf16 (the dtype these releases declare and compute
  in), as transformers' own FP8 dequantization computes it: `Fp8Dequantize` on 128-aligned weights, and on every
  weight its block-size-aware `_dequantize_fp8_weight` in fp32. (`Fp8Dequantize` of transformers 5.24 derives the
  block from the scale grid: a 224-row weight with 2 row scales it reads in blocks of 112, wrongly; DeepSeek-V3's
  576-row kv_a_proj_with_mqa it refuses. The padded grid here follows DeepSeek's own `weight_dequant`.)
- one tensor is dequantized at a time, a block of rows at a time (never a whole shard or a whole block);
- a weight stored in FP8 is never read without its scale: a missing, misshapen, non-float or non-finite scale, or
  a non-finite dequantized weight, is a one-line error naming the tensor;
- any other stored quantization (gptq, awq, bitsandbytes, compressed-tensors, mxfp4, fp8 without a two-int block
  size, ...) is refused by `quantize` and `plan` in the same words (`refuse_stored_quantization`).
"""

from __future__ import annotations

import math

import torch

FP8 = "fp8"
SCALE_SUFFIX = "_scale_inv"                       # `X.weight` is scaled by `X.weight_scale_inv`
ACTIVATION_SCALE = ".activation_scale"            # static activation scheme: the fp8 matmul's input scale
FP8_WEIGHT_DTYPE = torch.float8_e4m3fn
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEQUANTIZED_DTYPE = torch.bfloat16


class UnsupportedQuantization(ValueError):
    """The source checkpoint stores its weights in a quantization leanfoem does not read."""


class Fp8FormatError(ValueError):
    """An FP8 weight or its scale is missing, misshapen or not finite (the checkpoint reader reports it)."""


def stored_quantization(config) -> dict | None:
    """The `quantization_config` of a config (a PretrainedConfig, or config.json as a dict), as a dict."""
    q = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config",
                                                                                     None)
    if q is None or isinstance(q, dict):
        return q
    return q.to_dict()


def fp8_block_size(config) -> tuple[int, int] | None:
    """The [rows, columns] of an FP8 source's scale blocks; None when the config declares no fp8 quantization.
    An fp8 layout other than block scales of floats is UnsupportedQuantization."""
    q = stored_quantization(config)
    return _block_size(q) if q is not None and q.get("quant_method") == FP8 else None


def _block_size(q: dict) -> tuple[int, int]:
    """The block size of an fp8 quantization_config, if leanfoem reads its layout."""
    block = q.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise UnsupportedQuantization(f"unsupported source quantization: fp8 with weight_block_size {block!r} "
                                      "(leanfoem reads fp8 weights scaled in blocks of two positive ints, e.g. "
                                      "[128, 128]; per-tensor scales are not supported)")
    experts = q.get("expert_dtype", FP8)
    if experts != FP8:
        raise UnsupportedQuantization(f"unsupported source quantization: fp8 with expert_dtype {experts!r} "
                                      "(leanfoem reads fp8 experts only)")
    return int(block[0]), int(block[1])


def refuse_stored_quantization(config, readable: tuple[str, ...] = ()) -> dict | None:
    """The config's quantization_config when leanfoem reads such a source: none (full precision), fp8 in blocks
    (dequantized as read), or a method in `readable` (eval reads gptq); anything else UnsupportedQuantization."""
    q = stored_quantization(config)
    if q is None:
        return None
    method = q.get("quant_method")
    if method == FP8:
        _block_size(q)
    elif method not in readable:
        kinds = ", ".join(["full-precision", "fp8 block-scaled", *readable])
        raise UnsupportedQuantization(f"unsupported source quantization: config.json declares quant_method "
                                      f"{method!r}; leanfoem reads {kinds} checkpoints only")
    return q


def without_stored_quantization(config):
    """The config a dense model skeleton is built from: checked by `refuse_stored_quantization`, then without its
    quantization_config (transformers 5.24's from_config ignores an fp8 one, but a skeleton must not depend on
    that), in place for a PretrainedConfig, a copy for a dict."""
    refuse_stored_quantization(config)
    if isinstance(config, dict):
        return {k: v for k, v in config.items() if k != "quantization_config"}
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def is_hidden(name: str) -> bool:
    """A tensor of an FP8 source that is part of a weight's storage, not of the model: its scale, and the static
    activation scale, which a weight-only GPTQ model does not use."""
    return name.endswith(SCALE_SUFFIX) or name.endswith(ACTIVATION_SCALE)


def scale_name(name: str) -> str:
    return name + SCALE_SUFFIX


def dequantize(name: str, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The bf16 weight `name` holds: fp8 · scale in fp32, rounded once to bf16, as transformers' Fp8Dequantize
    computes it. A block of rows at a time: the fp32 temporary is `block[0]` rows, not the whole matrix."""
    _check_pair(name, weight, scale, block)
    rows, cols = weight.shape
    block_rows, block_cols = block
    per_column = scale.float().repeat_interleave(block_cols, dim=1)[:, :cols]  # [row blocks, cols]: padding cut
    out = torch.empty((rows, cols), dtype=DEQUANTIZED_DTYPE)
    for i, start in enumerate(range(0, rows, block_rows)):
        out[start:start + block_rows] = weight[start:start + block_rows].float().mul_(per_column[i])
    if not _finite(out):
        raise Fp8FormatError(f"tensor {name} holds NaN or Inf values (after fp8 dequantization)")
    return out


def _finite(tensor: torch.Tensor) -> bool:
    """aminmax propagates NaN and shows ±Inf, in one vectorised pass: on the CPU 20× cheaper than
    isfinite().all(), which would cost more than the dequantization itself."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) and torch.isfinite(high))


def _check_pair(name: str, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> None:
    scale_of = scale_name(name)
    if weight.dtype != FP8_WEIGHT_DTYPE or weight.dim() != 2:
        raise Fp8FormatError(f"tensor {name} has a {_last(scale_of)} but is a {weight.dim()}-d "
                             f"{str(weight.dtype).removeprefix('torch.')} tensor, not a 2-d float8_e4m3fn weight")
    if scale.dtype not in SCALE_DTYPES:
        raise Fp8FormatError(f"tensor {scale_of} is {str(scale.dtype).removeprefix('torch.')}; an fp8 weight's "
                             "scale must be float32, bfloat16 or float16")
    grid = [math.ceil(n / b) for n, b in zip(weight.shape, block)]
    if list(scale.shape) != grid:
        raise Fp8FormatError(f"tensor {scale_of} has shape {list(scale.shape)}; {name} {list(weight.shape)} in "
                             f"blocks of {list(block)} needs {grid}")
    if not _finite(scale):
        raise Fp8FormatError(f"tensor {scale_of} holds NaN or Inf values")


def check_not_fp8(name: str, tensor: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """A tensor read without a scale must not be FP8: its values alone are not the weight."""
    if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        dtype = str(tensor.dtype).removeprefix("torch.")
        if block is None:
            raise Fp8FormatError(f"tensor {name} is stored as {dtype} but config.json declares no fp8 "
                                 "quantization (quant_method fp8 with weight_block_size)")
        raise Fp8FormatError(f"tensor {name} is stored as {dtype} but its {_last(scale_name(name))} is missing "
                             "from the checkpoint")
    return tensor


def _last(name: str) -> str:
    return name.rpartition(".")[2]
