"""`leanfoem eval`: perplexity of a full-precision or GPTQ checkpoint, streamed one block at a time.

Why it exists: the quality cost of quantization must be measurable on the machine that quantized, for a
model larger than its card. The same BlockRunner as quantization runs every window through block i
before block i+1 (each block read once); GPTQ blocks are dequantized on the fly (any GPTQ checkpoint:
leanfoem's, GPTQModel's, AutoGPTQ's), a run of input features at a time; the lm_head is applied in vocab
chunks, never as a full [tokens, vocab] logits tensor. The hidden states of all windows live in host RAM
(one batch at a time goes to the device), or in a memory-mapped file when they exceed half the available
RAM (wikitext-2 at 2048 tokens on a 70B: ~140 windows × 2048 × 8192 × 2 bytes = 4.7 GB per boundary).

What must stay true (the protocol): the text is tokenized once with the model's tokenizer and its default
special tokens, cut into consecutive non-overlapping windows of `seqlen` tokens (the tail is dropped),
and perplexity = exp(mean next-token NLL over all windows), each window scored on its own.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import psutil
import torch
from accelerate.utils import set_module_tensor_to_device
from transformers import AutoConfig, AutoTokenizer

from .activations import ActivationReader, ActivationWriter
from .architectures import architecture_for, scale_logits
from .blocks import BlockRunner
from .checkpoint_reader import CheckpointError, CheckpointReader
from .models import resolve_model_dir
from .packing import unpack_gptq
from .pipeline import compute_dtype, resolve_device

VOCAB_CHUNK = 8192
DEQUANT_COLUMNS = 1024  # input features dequantized at a time (a multiple of 32)
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
    """A block's tensors with every packed GPTQ linear replaced by its dequantized `.weight` (float32)."""
    if gptq is None:
        return tensors
    out = dict(tensors)
    for name in [n for n in tensors if n.endswith(".qweight")]:
        base = name[: -len(".qweight")]
        parts = {k: out.pop(f"{base}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}
        out[base + ".weight"] = dequantize_chunked(parts, gptq["bits"], gptq["format"])
    return out


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


class _HiddenStates:
    """Hidden states of every window at one block boundary, in host RAM or (when large) in a memory-mapped
    file of `activations.py`; never on the device as a whole."""

    def __init__(self, count: int, seqlen: int, hidden: int, dtype: torch.dtype, spill_dir: Path | None, name: str):
        self.count, self.dtype = count, dtype
        self.rows: list[torch.Tensor | None] = [None] * count
        self.writer = self.reader = None
        if spill_dir is not None:
            self.writer = ActivationWriter(spill_dir / f"{name}.npy", [seqlen] * count, hidden, dtype)

    def put(self, k: int, row: torch.Tensor) -> None:
        if self.writer is not None:
            self.writer.write(row)
        else:
            self.rows[k] = row.detach().to("cpu")

    def seal(self) -> None:
        if self.writer is not None:
            path, lengths = self.writer.path, list(self.writer.lengths)
            self.writer.finish()
            self.reader = ActivationReader(path, lengths, self.dtype)
            self.writer = None

    def get(self, k: int) -> torch.Tensor:
        return self.reader.row(k) if self.reader is not None else self.rows[k]

    def drop(self) -> None:
        if self.reader is not None:
            path = self.reader.path
            self.reader.close()
            path.unlink(missing_ok=True)
        self.rows = []


def evaluate_perplexity(model: str, text: str, *, seqlen: int = 2048, windows: int | None = None,
                        device: str = "auto", batch_tokens: int = 4096, spill_bytes: int | None = None) -> dict:
    """Perplexity of `model` (fp or GPTQ) on `text`: see the module docstring for the protocol.

    `spill_bytes`: hidden states of all windows larger than this go to a memory-mapped file in a temporary
    directory instead of host RAM (default: half of the memory available now)."""
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
    total_bytes = count * seqlen * config.hidden_size * dtype.itemsize
    if spill_bytes is None:
        spill_bytes = psutil.virtual_memory().available // 2
    with tempfile.TemporaryDirectory(prefix="leanfoem-eval-") as tmp:
        spill_dir = Path(tmp) if total_bytes > spill_bytes else None
        hidden = _HiddenStates(count, seqlen, config.hidden_size, dtype, spill_dir, "inputs-00000")
        for k in range(count):
            hidden.put(k, runner.block_inputs(ids[k * seqlen:(k + 1) * seqlen])[0])
        hidden.seal()
        runner.release_embedding()
        per_batch = max(1, batch_tokens // seqlen)
        for index in range(runner.num_blocks):  # every window through block i before block i+1: one load per block
            block = runner.load(index, dense_tensors(runner.source_tensors(index), gptq))
            outputs = _HiddenStates(count, seqlen, config.hidden_size, dtype, spill_dir, f"inputs-{index + 1:05d}")
            for k in range(0, count, per_batch):
                batch = torch.stack([hidden.get(j) for j in range(k, min(k + per_batch, count))])
                for j, row in enumerate(runner.forward(block, index, batch.to(device=torch_device, dtype=dtype))):
                    outputs.put(k + j, row)
            outputs.seal()
            hidden.drop()
            hidden = outputs
            runner.unload(index)
        nll = _head_nll(runner, arch, hidden, count, ids, seqlen)
        hidden.drop()
    tokens = count * (seqlen - 1)
    return {"perplexity": math.exp(nll / tokens), "nll": nll / tokens, "tokens": tokens, "windows": count,
            "seqlen": seqlen, "seconds": round(time.time() - started, 3), "model": str(model_dir),
            "quantized": gptq is not None, "device": str(torch_device), "spilled": spill_dir is not None}


class Head:
    """The model's head after the last block: final norm, lm_head (tied: the embedding), the family's logit scaling
    (`architectures.scale_logits`), one vocab chunk of fp32 logits at a time; on the device in the compute dtype."""

    def __init__(self, runner: BlockRunner, arch):
        reader, self.config, self.device, self.dtype = runner.reader, runner.config, runner.device, runner.dtype
        self.norm = runner.model.get_submodule(arch.final_norm)
        for name, _ in list(self.norm.named_parameters()):
            set_module_tensor_to_device(self.norm, name, self.device, value=reader.tensor(f"{arch.final_norm}.{name}"),
                                        dtype=self.dtype)
        head_name = f"{arch.lm_head}.weight"
        head = reader.tensor(head_name) if head_name in reader else runner.embed_weight()
        self.weight = head.to(device=self.device, dtype=self.dtype)
        runner.release_embedding()

    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.norm(hidden.to(device=self.device, dtype=self.dtype)).float()

    def chunks(self, x: torch.Tensor):
        """(first vocab id, fp32 logits) per vocab chunk of the normed hidden states `x`."""
        for v0 in range(0, self.weight.shape[0], VOCAB_CHUNK):
            yield v0, scale_logits(self.config, x @ self.weight[v0:v0 + VOCAB_CHUNK].float().T)


def _head_nll(runner: BlockRunner, arch, hidden: _HiddenStates, count: int, ids, seqlen) -> float:
    """Σ next-token NLL over all windows, the logits reduced chunk by chunk (log-sum-exp)."""
    head = Head(runner, arch)
    total = 0.0
    with torch.no_grad():
        for k in range(count):
            x = head.normed(hidden.get(k))[:-1]
            targets = ids[k * seqlen + 1:(k + 1) * seqlen].to(runner.device)
            lse = torch.full((x.shape[0],), -math.inf, device=runner.device)
            target_logit = torch.empty_like(lse)
            for v0, logits in head.chunks(x):
                lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
                inside = (targets >= v0) & (targets < v0 + logits.shape[1])
                target_logit[inside] = logits[inside, targets[inside] - v0]
            total += (lse - target_logit).double().sum().item()
    return total


def format_result(result: dict, as_json: bool) -> str:
    if as_json:
        return json.dumps(result)
    return (f"perplexity {result['perplexity']:.4f} over {result['windows']} windows of {result['seqlen']} tokens "
            f"({result['tokens']} predicted tokens, {result['seconds']:.1f} s)")
