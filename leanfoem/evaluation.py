"""`leanfoem eval`: perplexity of a full-precision or GPTQ checkpoint, streamed one block at a time.

Why it exists: the quality cost of quantization must be measurable on the machine that quantized, for a
model larger than its card. The same BlockRunner as quantization runs every window through block i
before block i+1 (each block read once); GPTQ blocks are dequantized on the fly (any GPTQ checkpoint:
leanfoem's, GPTQModel's, AutoGPTQ's), a run of input features at a time; the lm_head is applied in vocab
chunks, never as a full [tokens, vocab] logits tensor. The hidden states of all windows live in host RAM
(one batch at a time goes to the device), or in a memory-mapped file when they exceed half the available
RAM (wikitext-2 at 2048 tokens on a 70B: ~140 windows × 2048 × 8192 × 2 bytes = 4.7 GB per boundary).
A mixture-of-experts block's routed experts are never loaded whole (DeepSeek-V3: 22.5 GB per block):
`expert_evaluation.py` reads, dequantizes and applies them a group of `expert_group` experts at a time, each group
once per block for all windows. In host RAM the experts' inputs take the place of the block's outputs (two
boundaries' worth at most, as for a dense block); their routed sum lives in a work file of the temporary directory
(the page cache holds it while RAM allows).

What must stay true (the protocol): the text is tokenized once with the model's tokenizer and its default
special tokens, cut into consecutive non-overlapping windows of `seqlen` tokens (the tail is dropped),
and perplexity = exp(mean next-token NLL over all windows), each window scored on its own. The steps
(ModelSource, final_hidden_states, Head) are shared with `divergence.py` (`eval --reference`), which runs
two models over the same windows by this protocol. Every pass over a block runs the same batches of windows,
and the figures do not depend on the expert group size, or on where the stores live, by a single bit.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from accelerate.utils import set_module_tensor_to_device
from transformers import AutoConfig, AutoTokenizer

from . import expert_evaluation
from .activations import ActivationReader, ActivationWriter
from .architectures import architecture_for, scale_logits
from .blocks import BlockRunner
from .checkpoint_reader import CheckpointError, CheckpointReader
from .models import resolve_model_dir
from .packing import dense_tensors
from .pipeline import compute_dtype, resolve_device
from .source_formats import refuse_stored_quantization

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
    """The GPTQ settings of a GPTQ checkpoint; None for a full-precision or fp8 one (the reader dequantizes fp8)."""
    q = refuse_stored_quantization(config, readable=("gptq",))
    if q is None or q.get("quant_method") != "gptq":
        return None
    return {"bits": q["bits"], "format": q.get("checkpoint_format", "gptq")}


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
                        device: str = "auto", batch_tokens: int = 4096, spill_bytes: int | None = None,
                        expert_group: int | None = None) -> dict:
    """Perplexity of `model` (fp or GPTQ) on `text`: see the module docstring for the protocol.

    `spill_bytes`: hidden states of all windows larger than this go to a memory-mapped file in a temporary
    directory instead of host RAM (default: half of the memory available now). `expert_group`: routed experts
    applied together in an MoE block (None: as many as fit, `expert_evaluation.group_size`)."""
    started = time.time()
    source = ModelSource(model)
    seqlen = source.context(seqlen)
    ids = source.token_ids(text)
    count = window_count(ids, seqlen, windows)
    torch_device = resolve_device(device)
    runner = source.runner(torch_device)
    if spill_bytes is None:
        spill_bytes = psutil.virtual_memory().available // 2
    with tempfile.TemporaryDirectory(prefix="leanfoem-eval-") as tmp:
        store_bytes = count * seqlen * source.config.hidden_size * runner.dtype.itemsize
        spill_dir = Path(tmp) if store_bytes > spill_bytes else None
        hidden = final_hidden_states(runner, source.gptq, ids, count, seqlen, spill_dir, batch_tokens,
                                     work_dir=Path(tmp), expert_group=expert_group)
        nll = _head_nll(runner, source.arch, hidden, count, ids, seqlen)
        hidden.drop()
    tokens = count * (seqlen - 1)
    return {"perplexity": math.exp(nll / tokens), "nll": nll / tokens, "tokens": tokens, "windows": count,
            "seqlen": seqlen, "seconds": round(time.time() - started, 3), "model": str(source.model_dir),
            "quantized": source.gptq is not None, "device": str(torch_device), "spilled": spill_dir is not None}


class ModelSource:
    """A checkpoint opened for evaluation: its directory, config (the skeleton is built dense), GPTQ settings
    (None for a full-precision one) and architecture entry."""

    def __init__(self, model: str):
        self.model_dir = resolve_model_dir(model)
        self.config = AutoConfig.from_pretrained(self.model_dir)
        self.gptq = gptq_settings(self.config)
        if hasattr(self.config, "quantization_config"):
            del self.config.quantization_config  # the skeleton is built dense; blocks are dequantized as they load
        self.arch = architecture_for(self.config)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)

    def context(self, seqlen: int) -> int:
        """`seqlen` capped at the model's context: windows fit it."""
        return min(seqlen, getattr(self.config, "max_position_embeddings", None) or seqlen)

    def token_ids(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer(text)["input_ids"], dtype=torch.long)

    def runner(self, device: torch.device) -> BlockRunner:
        return BlockRunner(self.config, CheckpointReader(self.model_dir), self.arch, device,
                           compute_dtype(device, self.config))


def window_count(ids: torch.Tensor, seqlen: int, windows: int | None) -> int:
    available = ids.numel() // seqlen
    if available < 1:
        raise CheckpointError(f"evaluation text too short: {ids.numel()} tokens, one window needs {seqlen}")
    return available if windows is None else min(windows, available)


def final_hidden_states(runner: BlockRunner, gptq: dict | None, ids: torch.Tensor, count: int, seqlen: int,
                        spill_dir: Path | None, batch_tokens: int, name: str = "inputs", *, work_dir: Path,
                        expert_group: int | None = None) -> _HiddenStates:
    """The hidden states of every window after the last block (before the final norm): every window through
    block i before block i+1, so each block is read and loaded once; an MoE block's routed experts a group of
    `expert_group` at a time (`expert_evaluation.py`; None: as many as fit), their routed sums in `work_dir`."""
    windows = _Windows(count, seqlen, max(1, batch_tokens // seqlen), runner.device, work_dir, spill_dir, name)
    hidden = windows.store(f"{name}-00000", runner.config.hidden_size, runner.dtype)
    for k in range(count):
        hidden.put(k, runner.block_inputs(ids[k * seqlen:(k + 1) * seqlen])[0])
    hidden.seal()
    runner.release_embedding()
    for index in range(runner.num_blocks):
        if expert_evaluation.runs_in_groups(runner.layers[index]):
            results = expert_evaluation.block_outputs(runner, index, gptq, hidden, windows, expert_group)
        else:
            results = _dense_block_outputs(runner, index, gptq, hidden, windows)
        outputs = windows.store(f"{name}-{index + 1:05d}", runner.config.hidden_size, runner.dtype)
        for k, batch in results:
            for j, row in enumerate(batch):
                outputs.put(k + j, row)
        outputs.seal()
        hidden.drop()
        hidden = outputs
        runner.unload(index)
    return hidden


def _dense_block_outputs(runner: BlockRunner, index: int, gptq: dict | None, hidden: _HiddenStates, windows):
    """(first window, output batch) of block `index`, loaded whole, for every batch of windows."""
    block = runner.load(index, dense_tensors(runner.source_tensors(index), gptq))
    for k, batch in windows.batches(hidden, runner.dtype):
        yield k, runner.forward(block, index, batch)


@dataclass
class _Windows:
    """How the windows go through a block: `count` windows of `seqlen` tokens in batches of `per_batch` windows, the
    same batches in every pass over a block (an MoE block's bits rely on it), and where their stores live (host RAM,
    or files in `spill_dir`) and the work files of MoE blocks (`work_dir`)."""
    count: int
    seqlen: int
    per_batch: int
    device: torch.device
    work_dir: Path
    spill_dir: Path | None
    name: str

    def store(self, name: str, width: int, dtype: torch.dtype) -> _HiddenStates:
        return _HiddenStates(self.count, self.seqlen, width, dtype, self.spill_dir, name)

    def batches(self, store: _HiddenStates, dtype: torch.dtype):
        """(first window, [windows, seqlen, width] on the device in `dtype`) per batch."""
        for k in range(0, self.count, self.per_batch):
            batch = torch.stack([store.get(j) for j in range(k, min(k + self.per_batch, self.count))])
            yield k, batch.to(device=self.device, dtype=dtype)


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

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    def logits(self, x: torch.Tensor, v0: int, v1: int) -> torch.Tensor:
        """fp32 logits of vocab ids v0:v1 for the normed hidden states `x`, scaled as the family's head does."""
        return scale_logits(self.config, x @ self.weight[v0:v1].float().T)

    def chunks(self, x: torch.Tensor, chunk: int = VOCAB_CHUNK):
        """(first vocab id, fp32 logits) per vocab chunk of the normed hidden states `x`."""
        for v0 in range(0, self.vocab, chunk):
            yield v0, self.logits(x, v0, v0 + chunk)


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
