"""`leanfoem eval`: perplexity of a full-precision or GPTQ checkpoint, streamed one block at a time.

Why it exists: the quality cost of quantization must be measurable on the machine that quantized, for a
model larger than its card. The same BlockRunner as quantization runs every window through block i
before block i+1 (each block read once); GPTQ blocks are dequantized on the fly (any GPTQ checkpoint:
leanfoem's, GPTQModel's, AutoGPTQ's); the lm_head is applied in vocab chunks, never as a full
[tokens, vocab] logits tensor.

What must stay true (the protocol): the text is tokenized once with the model's tokenizer and its default
special tokens, cut into consecutive non-overlapping windows of `seqlen` tokens (the tail is dropped),
and perplexity = exp(mean next-token NLL over all windows), each window scored on its own.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device
from transformers import AutoConfig, AutoTokenizer

from .architectures import architecture_for
from .blocks import BlockRunner
from .checkpoint_reader import CheckpointError, CheckpointReader
from .models import resolve_model_dir
from .packing import unpack_gptq
from .pipeline import compute_dtype, resolve_device

VOCAB_CHUNK = 8192
NAMED_TEXTS = {"wikitext2": (("wikitext", "wikitext-2-raw-v1"), "test"), "c4": (("allenai/c4", "en"), "validation")}


def default_eval_text() -> str:
    from importlib.resources import files
    return str(files("leanfoem") / "demo" / "eval.txt")


def load_text(source: str) -> str:
    if source in NAMED_TEXTS:
        return _download_text(source)
    path = Path(source)
    if not path.is_file():
        raise CheckpointError(f"evaluation text not found: {source} (a file, or one of {', '.join(NAMED_TEXTS)})")
    return path.read_text(encoding="utf-8")


def _download_text(name: str) -> str:
    try:
        import datasets
        args, split = NAMED_TEXTS[name]
        rows = datasets.load_dataset(*args, split=split)["text"]
    except Exception as exc:
        raise CheckpointError(f"cannot fetch {name!r} (offline, or `datasets` missing?): {type(exc).__name__}") from None
    return "\n\n".join(rows[:3000] if name == "c4" else rows)


def gptq_settings(config) -> dict | None:
    q = getattr(config, "quantization_config", None)
    if q is None:
        return None
    q = q if isinstance(q, dict) else q.to_dict()
    if q.get("quant_method") != "gptq":
        raise CheckpointError(f"unsupported quantization method {q.get('quant_method')!r} (only gptq)")
    return {"bits": q["bits"], "format": q.get("checkpoint_format", "gptq")}


def dense_tensors(tensors: dict[str, torch.Tensor], gptq: dict | None) -> dict[str, torch.Tensor]:
    """A block's tensors with every packed GPTQ linear replaced by its dequantized `.weight`."""
    if gptq is None:
        return tensors
    out = dict(tensors)
    for name in [n for n in tensors if n.endswith(".qweight")]:
        base = name[: -len(".qweight")]
        parts = {k: out.pop(f"{base}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}
        out[base + ".weight"] = unpack_gptq(parts, gptq["bits"], gptq["format"])
    return out


def evaluate_perplexity(model: str, text: str, *, seqlen: int = 2048, windows: int | None = None,
                        device: str = "auto", batch_tokens: int = 4096) -> dict:
    started = time.time()
    model_dir = resolve_model_dir(model)
    config = AutoConfig.from_pretrained(model_dir)
    gptq = gptq_settings(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the skeleton is built dense; blocks are dequantized as they load
    arch = architecture_for(config)
    seqlen = min(seqlen, getattr(config, "max_position_embeddings", None) or seqlen)  # windows fit the context
    ids = torch.tensor(AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"], dtype=torch.long)
    available = ids.numel() // seqlen
    if available < 1:
        raise CheckpointError(f"evaluation text too short: {ids.numel()} tokens, one window needs {seqlen}")
    count = available if windows is None else min(windows, available)
    torch_device = resolve_device(device)
    dtype = compute_dtype(torch_device, config)
    runner = BlockRunner(config, CheckpointReader(model_dir), arch, torch_device, dtype)
    hidden = [runner.block_inputs(ids[k * seqlen:(k + 1) * seqlen]) for k in range(count)]
    runner.release_embedding()
    per_batch = max(1, batch_tokens // seqlen)
    for index in range(runner.num_blocks):
        block = runner.load(index, dense_tensors(runner.source_tensors(index), gptq))
        for k in range(0, count, per_batch):
            batch = torch.cat(hidden[k:k + per_batch])
            for j, row in enumerate(runner.forward(block, batch)):
                hidden[k + j] = row[None]
        runner.unload(index)
    nll = _head_nll(runner, arch, hidden, ids, seqlen)
    tokens = count * (seqlen - 1)
    return {"perplexity": math.exp(nll / tokens), "nll": nll / tokens, "tokens": tokens, "windows": count,
            "seqlen": seqlen, "seconds": round(time.time() - started, 3), "model": str(model_dir)}


def _head_nll(runner: BlockRunner, arch, hidden, ids, seqlen) -> float:
    """Σ next-token NLL over all windows: final norm, then the lm_head in vocab chunks (log-sum-exp)."""
    reader, model = runner.reader, runner.model
    norm = model.get_submodule(arch.final_norm)
    for name, _ in list(norm.named_parameters()):
        set_module_tensor_to_device(norm, name, runner.device, value=reader.tensor(f"{arch.final_norm}.{name}"),
                                    dtype=runner.dtype)
    head_name = f"{arch.lm_head}.weight"
    head = reader.tensor(head_name) if head_name in reader else runner.embed_weight()
    head = head.to(device=runner.device, dtype=torch.float32)
    total = 0.0
    with torch.no_grad():
        for k, h in enumerate(hidden):
            x = norm(h[0]).float()[:-1]
            targets = ids[k * seqlen + 1:(k + 1) * seqlen].to(runner.device)
            lse = torch.full((x.shape[0],), -math.inf, device=runner.device)
            target_logit = torch.empty_like(lse)
            for v0 in range(0, head.shape[0], VOCAB_CHUNK):
                logits = x @ head[v0:v0 + VOCAB_CHUNK].T
                lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
                inside = (targets >= v0) & (targets < v0 + logits.shape[1])
                target_logit[inside] = logits[inside, targets[inside] - v0]
            total += (lse - target_logit).double().sum().item()
    runner.release_embedding()
    return total


def format_result(result: dict, as_json: bool) -> str:
    if as_json:
        return json.dumps(result)
    return (f"perplexity {result['perplexity']:.4f} over {result['windows']} windows of {result['seqlen']} tokens "
            f"({result['tokens']} predicted tokens, {result['seconds']:.1f} s)")
