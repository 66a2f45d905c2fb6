"""`leanfoem plan`: the memory and disk budget of a quantization run, from config.json alone (DESIGN §4).

Why it exists: a 70B run takes a night; finding out at block 79 (or at the first down_proj factorisation)
that the card or the RAM is too small wastes it. The planner reads only the model's shapes and the run's
settings, forecasts the peaks of every phase of `pipeline.QuantizeRun` and picks the batch size that fits.
`quantize` calls `plan()` + `check_fits()` before it reads a single weight.

The model follows what the pipeline does (pipeline.py, hessian.py, solver.py), phase by phase:
- start: the tokenizer and the tokenized calibration text (the high-water mark of small models: the SmolLM2
  tokenizer alone is ~190 MiB, tokenizing a 3 MB text ~450 MiB more, measured here); the encodings are handed
  back afterwards (`release_freed_memory`), the tokenizer's own memory mostly is not, so it stays in every phase;
- first inputs: `embed_tokens` read on the host (stored dtype, plus the shard pages while it is read);
- each block: its stored tensors read on the host, the block on the device in the compute dtype (fp32 on
  the CPU, the checkpoint's half type on CUDA), one sub-group's Hessian H (fp32 n×n) at a time, then
  the factorisation (CPU/LAPACK: H + one fp64 n×n; CUDA/torch: H + two fp64 n×n), then the column loop
  of the widest layer (U, W and W₀ fp32, codes, the dequantized copy); a forward batch of
  `batch_tokens` tokens (MLP intermediates dominate: ~3 × intermediate values per token);
- GPTAQ doubles the Hessian (the cross term C), keeps a native copy of the block and a second store,
  and builds P = α·triu(C·Uᵀ)·U with ~5 n×n fp32 matrices alive;
- the activation stores are .npy files in OUT/.leanfoem, at most three per stream alive at once (the inputs of
  the block, the kept inputs of o_proj and the hidden states after the attention branch; then those and the
  inputs of block i+1; twice that with GPTAQ), plus, on the CPU, the kept inputs of down_proj in the MLP
  branch when they fit in RAM. They are written with pwrite and read with pread, so they never count in the
  resident set: the plan says "ram" when the page cache can hold them next to the rest of the host budget
  (fast), and "file" when they must stream from disk (correct, slower);
- the end: the tensors outside the blocks (embedding, lm_head if untied, final norm) read and written.

What must stay true: `plan()` needs a config (a `PretrainedConfig`, a dict, or a directory holding
config.json) and nothing else — no weights, no tokenizer, no accelerator. Every number it prints is a
sum of named items (`Plan.items`), so a forecast that is off can be traced to the item that is off.
The fixed overheads below were measured on this project's CPU machine (see docs/BENCHMARKS.md,
"Memory planner accuracy", tools/bench_planner.py): forecasts are meant to be within ±30%.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

GIB = 1 << 30
MIB = 1 << 20

# Measured on the CPU machine (tools/bench_planner.py): python + torch + transformers + leanfoem imported.
RUNTIME_BASE = 270 * MIB
# Appears with the first block: BLAS / oneDNN thread buffers, the modeling code and its caches (measured: 60-90 MiB).
COMPUTE_RUNTIME = 80 * MIB
# The host side of a CUDA process (driver, cudart, cuBLAS/cuDNN images): not measurable here; typical value.
CUDA_HOST_OVERHEAD = 1 * GIB
# CUDA context + cuBLAS workspaces + allocator slack on the card (outside torch's allocated bytes).
CUDA_CONTEXT = 768 * MIB
# A fast tokenizer loaded by transformers: a fixed part plus a part that grows with the vocabulary.
TOKENIZER_FIXED = 140 * MIB
TOKENIZER_PER_VOCAB = 1024
# Tokenizing a text in one call keeps the encodings (ids, offsets, words) of the whole stream: bytes per byte.
TOKENIZE_PER_TEXT_BYTE = 150
# The Hessian accumulator converts inputs to fp32 in chunks of this many tokens (hessian.HessianAccumulator).
HESSIAN_CHUNK_TOKENS = 8192
# Rows of the dequantize / pack loops (solver.QuantResult.dequantized, packing.pack_rows).
COLUMN_CHUNK = 1024
SOLVER_BLOCK = 128
DEFAULT_BATCH_TOKENS = 4096
DEFAULT_CALIBRATION_BYTES = 300_000  # the bundled leanfoem/demo/calibration.txt


class PlanDoesNotFit(ValueError):
    """The run cannot fit the memory budget; the message is one line with the numbers."""


@dataclass
class Shapes:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    stored_bytes: int          # bytes per stored weight value (2 for bf16/fp16, 4 for fp32)
    max_positions: int | None
    qkv_bias: bool
    qk_norm: bool

    @property
    def linears(self) -> dict[str, tuple[int, int]]:
        """(out, in) of every quantized linear of a block."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    @property
    def subgroups(self) -> list[tuple[tuple[str, ...], int]]:
        """Sub-groups in quantization order and the width n of their shared input (the Hessian's size)."""
        q = self.heads * self.head_dim
        return [(("q_proj", "k_proj", "v_proj"), self.hidden), (("o_proj",), q),
                (("gate_proj", "up_proj"), self.hidden), (("down_proj",), self.intermediate)]

    @property
    def linear_params(self) -> int:
        return sum(r * n for r, n in self.linears.values())

    @property
    def other_params(self) -> int:
        """Norms and biases of a block (copied as they are)."""
        extra = 2 * self.hidden
        if self.qkv_bias:
            extra += (self.heads + 2 * self.kv_heads) * self.head_dim
        if self.qk_norm:
            extra += 2 * self.head_dim
        return extra

    @property
    def block_params(self) -> int:
        return self.linear_params + self.other_params

    @property
    def outside_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden


def shapes_from_config(config) -> Shapes:
    c = _config_dict(config)
    text = c.get("text_config") or {}
    get = lambda k, default=None: c.get(k, text.get(k, default))  # noqa: E731
    hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
    head_dim = get("head_dim") or hidden // heads
    dtype = str(get("dtype") or get("torch_dtype") or "bfloat16").removeprefix("torch.")
    model_type = str(get("model_type", ""))
    return Shapes(hidden=hidden, intermediate=int(get("intermediate_size")), layers=int(get("num_hidden_layers")),
                  heads=heads, kv_heads=int(get("num_key_value_heads") or heads), head_dim=int(head_dim),
                  vocab=int(get("vocab_size")), tied=bool(get("tie_word_embeddings", False)),
                  stored_bytes=4 if dtype in ("float32", "float") else 2,
                  max_positions=get("max_position_embeddings"),
                  qkv_bias=bool(get("attention_bias", False)) or model_type == "qwen2",
                  qk_norm=model_type.startswith("qwen3"))


def _config_dict(config) -> dict:
    if isinstance(config, dict):
        return config
    if isinstance(config, (str, Path)):
        path = Path(config)
        path = path / "config.json" if path.is_dir() else path
        return json.loads(path.read_text())
    return config.to_dict()


@dataclass
class Item:
    name: str
    bytes: int
    where: str       # "device", "host" or "disk"
    phase: str       # the phase in which it is alive at the peak


@dataclass
class Plan:
    device: str                     # "cpu" or "cuda"
    compute_dtype: str
    device_peak_bytes: int          # on CUDA: the card incl. context; on the CPU: the block work (part of host)
    device_peak_phase: str
    host_peak_bytes: int            # resident set forecast (what /usr/bin/time calls max RSS)
    host_peak_phase: str
    host_required_bytes: int        # the part the kernel cannot drop (= host_peak_bytes: stores are page cache)
    disk_output_bytes: int
    disk_work_bytes: int
    disk_bytes: int
    batch_tokens: int               # the --batch-tokens to run with
    rows_per_batch: int
    seqlen: int
    calibration_tokens: int
    hessian_chunk_tokens: int
    hessian_width: int              # the widest Hessian (down_proj's input)
    activation_store: str           # "ram" (mapped files stay hot) or "file" (pages stream from disk)
    store_bytes: int                # one activation store
    stores: int                     # stores alive at a block boundary (2, or 4 with GPTAQ)
    keeps_mlp_inputs: bool          # down_proj's inputs kept in a work file (CPU, when it fits in RAM)
    gpu_memory: int | None
    host_memory: int | None
    fits: bool
    reasons: list[str] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)
    device_phases: dict[str, int] = field(default_factory=dict)   # forecast of every phase, for tracing
    host_phases: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_size(text: str | int | float | None) -> int | None:
    """'24GiB', '24G', '24GB', '24000MiB', '1.5T', or a number of bytes."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?)([bB]?)\s*", text)
    if not m:
        raise ValueError(f"cannot read the size {text!r} (examples: 24GiB, 32G, 64000MB)")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    power = " KMGT".index(unit) if unit else 0
    base = 1024 if (binary or (unit and not m.group(4))) else 1000  # "24G" = GiB like nvidia-smi/free; "24GB" = 10⁹
    return int(value * base ** power)


def format_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("TiB", 1 << 40), ("GiB", GIB), ("MiB", MIB), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def plan(config, *, device: str = "cuda", gpu_memory: int | str | None = None, host_memory: int | str | None = None,
         nsamples: int = 128, seqlen: int = 2048, bits: int = 4, group_size: int = 128, method: str = "foem",
         alpha: float = 0.0, beta: float = 0.2, batch_tokens: int | None = None, calib_bytes: int | None = None,
         checkpoint_format: str = "gptq", compute_dtype: str | None = None) -> Plan:
    """The budget of `leanfoem quantize` for this config and these settings.

    `device`: "cpu" or "cuda" (a "cuda:N" works too). `gpu_memory`/`host_memory`: the budgets, bytes or
    strings like "24GiB" (None: not checked). `batch_tokens=None` lets the planner choose the largest power-of-two
    batch that fits (≤ 16384 tokens on CUDA, ≤ 4096 on the CPU, ≥ one row); a given value is kept and
    checked. `calib_bytes`: size of the calibration text file (its tokenization is a peak of small runs; default the bundled text).
    `compute_dtype`: the forward dtype ("float32", "bfloat16", ...; None: fp32 on the CPU, half on CUDA).
    """
    del checkpoint_format  # same sizes in both formats
    shapes = config if isinstance(config, Shapes) else shapes_from_config(config)
    kind = "cpu" if str(device).startswith("cpu") else "cuda"
    gpu_budget, host_budget = parse_size(gpu_memory), parse_size(host_memory)
    gptaq = method == "gptaq" or alpha > 0
    if method == "gptq" or method == "gptaq":
        beta = 0.0
    seqlen = min(seqlen, shapes.max_positions or seqlen)
    calib_bytes = DEFAULT_CALIBRATION_BYTES if calib_bytes is None else calib_bytes
    compute = (compute_dtype, 4 if compute_dtype == "float32" else 2) if compute_dtype else \
        ("float32", 4) if kind == "cpu" else ("half (bf16/fp16 as stored)", 2)
    if batch_tokens is not None:
        return _plan_with(shapes, kind, gpu_budget, host_budget, nsamples, seqlen, bits, group_size, method,
                          gptaq, beta, batch_tokens, calib_bytes, compute)
    # On CUDA a larger batch feeds the card better (up to 16384 tokens); on the CPU it only costs memory.
    largest = 1 << 14 if kind == "cuda" else DEFAULT_BATCH_TOKENS
    chosen = None
    for tokens in [1 << k for k in range(14, 5, -1)]:
        if tokens > largest:
            continue
        chosen = _plan_with(shapes, kind, gpu_budget, host_budget, nsamples, seqlen, bits, group_size, method,
                            gptaq, beta, max(tokens, seqlen), calib_bytes, compute)
        if chosen.fits:
            return chosen
    return chosen  # the smallest batch: does not fit, and says why


def _plan_with(s: Shapes, kind, gpu_budget, host_budget, nsamples, seqlen, bits, group_size, method, gptaq, beta,
               batch_tokens, calib_bytes, compute: tuple[str, int]) -> Plan:
    compute_name, c = compute                         # the forward dtype and its bytes
    h, inter = s.hidden, s.intermediate
    rows = min(nsamples, max(1, batch_tokens // seqlen))  # pipeline._batches: whole rows, at least one
    bt = rows * seqlen                                 # tokens in one forward batch
    tokens = nsamples * seqlen
    n_max = max(n for _, n in s.subgroups)
    # the layers of a sub-group are solved as one stacked matrix (pipeline._quantize_group)
    r_max, n_solve = max(((sum(s.linears[m][0] for m in names), n) for names, n in s.subgroups),
                         key=lambda rn: rn[1] * (rn[1] + rn[0]))
    block = s.block_params * c
    stored_block = s.block_params * s.stored_bytes
    store = tokens * h * c
    streams = 2 if gptaq else 1
    stores = 3 * streams  # per stream: block inputs, kept o_proj inputs, after-attention states (pipeline._advance)
    # On the CPU the down_proj's inputs are kept too (a file intermediate/hidden stores wide, alive in the MLP
    # branch next to three stores) when that fits in RAM: reading them back costs far less than the gate/up
    # forward that would recompute them. On CUDA recomputing them is the cheaper side.
    wide_store = tokens * inter * c
    mlp_branch_store = 3 * store + wide_store
    items: list[Item] = []

    # -- the block work (device on CUDA, host on the CPU) --------------------------------------------------------
    dev_phases: dict[str, list[tuple[str, int]]] = {}
    blocks = [("block weights (compute dtype)", block)] + ([("native block copy (GPTAQ)", block)] if gptaq else [])
    fwd_per_token = c * (5 * h + 3 * (s.heads + s.kv_heads) * s.head_dim + 3 * inter) + 8 * h
    forward = bt * fwd_per_token + rows * s.heads * seqlen * 8  # + sdpa (flash / memory-efficient) workspace
    batch_in = bt * h * c
    chunk = min(HESSIAN_CHUNK_TOKENS, bt) * n_max * 4 if c != 4 else 0
    hess = n_max * n_max * 4
    cross = hess if gptaq else 0
    dev_phases["hessian pass"] = blocks + [
        ("H fp32 (widest sub-group)", hess), ("GPTAQ cross term fp32", cross),
        ("forward batch (activations, MLP intermediates, sdpa)", forward * (2 if gptaq else 1)),
        ("batch inputs", batch_in * (2 if gptaq else 1)),
        ("fp32 chunk of inputs", chunk * (3 if gptaq else 1))]
    fp64 = n_max * n_max * 8
    dev_phases["factorisation (down_proj)"] = blocks + [
        ("H fp32", hess), ("GPTAQ cross term fp32", cross),
        ("fp64 factorisation buffers", fp64 if kind == "cpu" else 2 * fp64)]
    if gptaq:
        dev_phases["GPTAQ P = α·triu(C·Uᵀ)·U"] = blocks + [("U, C, copy of C, two products (fp32)", 5 * hess)]
    rn = r_max * n_solve
    u = n_solve * n_solve * 4
    solve = rn * (4 + (4 if beta else 0) + 1) + SOLVER_BLOCK * r_max * 4 * 6
    dequant = rn * 1 + rn * 4 + COLUMN_CHUNK * r_max * 4 * 3
    dev_phases["column loop (widest layer)"] = blocks + [
        ("U fp32", u), ("GPTAQ P fp32", u if gptaq else 0),
        ("W, W₀ fp32, codes, block temporaries", max(solve, dequant))]
    dev_phases["propagation"] = blocks + [("forward batch", forward), ("batch inputs and outputs", 2 * batch_in)]
    if kind == "cuda":
        for parts in dev_phases.values():
            parts.append(("CUDA context, cuBLAS workspace", CUDA_CONTEXT))
    dev_totals = {phase: sum(b for _, b in parts) for phase, parts in dev_phases.items()}
    dev_phase = max(dev_totals, key=dev_totals.get)
    device_peak = dev_totals[dev_phase]
    items += [Item(name, b, "device" if kind == "cuda" else "host", dev_phase) for name, b in dev_phases[dev_phase] if b]

    # -- host ------------------------------------------------------------------------------------------------------
    base = RUNTIME_BASE + (CUDA_HOST_OVERHEAD if kind == "cuda" else 0)
    tokenizer = TOKENIZER_FIXED + TOKENIZER_PER_VOCAB * s.vocab
    embed = s.vocab * h * s.stored_bytes
    outside = s.outside_params * s.stored_bytes
    packed_block = _packed_bytes(s, bits, group_size)
    host_phases: dict[str, list[tuple[str, int]]] = {
        "tokenizing the calibration text": [("tokenizer", tokenizer),
                                            ("encodings of the calibration text", TOKENIZE_PER_TEXT_BYTE * calib_bytes)],
        "first inputs (embedding)": [("embed_tokens + its shard pages while read", 2 * embed),
                                     ("rows being written to the first activation store", seqlen * h * c)],
        "reading a block": [("block tensors as stored + shard pages while read", 2 * stored_block)],
        "block work": [("BLAS / oneDNN buffers, modeling code", COMPUTE_RUNTIME),
                       ("block tensors as stored (norms, biases kept)", s.other_params * s.stored_bytes),
                       ("packed layers of the block so far", packed_block)],
        "writing the tensors outside the blocks": [("embedding / lm_head / norm + serialised copy", 2 * outside)],
    }
    if kind == "cpu":
        host_phases["block work"] += dev_phases[dev_phase]
    else:
        host_phases["block work"] += [("a batch read from the store (rows + stacked copy)", 2 * batch_in),
                                      ("one output row copied back", seqlen * h * c)]
    for phase, parts in host_phases.items():  # the tokenizer's memory is not handed back (measured: ~all of it)
        if phase != "tokenizing the calibration text":
            parts.insert(0, ("tokenizer memory kept by the allocator", tokenizer))
    for parts in host_phases.values():
        parts.insert(0, ("python, torch, transformers" + (", CUDA libraries" if kind == "cuda" else ""), base))
    host_totals = {phase: sum(b for _, b in parts) for phase, parts in host_phases.items()}
    # The activation stores are files written with pwrite and read with pread (activations.py): the process holds
    # only the batch it works on (counted above); the page cache holds the stores while RAM allows ("ram": fast),
    # else they stream from disk ("file": correct, slower). Neither counts in the resident set.
    required_phase = max(host_totals, key=host_totals.get)
    required = host_totals[required_phase]
    in_ram = host_budget is None or max(required, host_totals["block work"] + stores * store) <= host_budget
    keeps_mlp_inputs = in_ram and kind == "cpu" and (
        host_budget is None or host_totals["block work"] + streams * mlp_branch_store <= host_budget)
    work_stores = streams * max(3 * store, mlp_branch_store if keeps_mlp_inputs else 0)
    host_phase = max(host_totals, key=host_totals.get)
    host_peak = host_totals[host_phase]
    items += [Item(name, b, "host", host_phase) for name, b in host_phases[host_phase] if b]

    # -- disk --------------------------------------------------------------------------------------------------------
    disk_output = s.layers * (packed_block + s.other_params * 2) + outside
    disk_work = work_stores
    items += [Item("output checkpoint", disk_output, "disk", "end"),
              Item(f"work files: {stores} activation stores" + (" + kept down_proj inputs" if keeps_mlp_inputs else ""),
                   disk_work, "disk", "block boundary")]

    reasons = []
    if kind == "cuda" and gpu_budget is not None and device_peak > gpu_budget:
        reasons.append(f"device peak {format_size(device_peak)} ({dev_phase}) exceeds the GPU budget "
                       f"{format_size(gpu_budget)}")
    if host_budget is not None and required > host_budget:
        reasons.append(f"host peak {format_size(required)} ({required_phase}) exceeds the host budget "
                       f"{format_size(host_budget)}")
    return Plan(device=kind, compute_dtype=compute_name,
                device_peak_bytes=int(device_peak), device_peak_phase=dev_phase, host_peak_bytes=int(host_peak),
                host_peak_phase=host_phase, host_required_bytes=int(required), disk_output_bytes=int(disk_output),
                disk_work_bytes=int(disk_work), disk_bytes=int(disk_output + disk_work), batch_tokens=int(bt),
                rows_per_batch=rows, seqlen=seqlen, calibration_tokens=tokens,
                hessian_chunk_tokens=min(HESSIAN_CHUNK_TOKENS, bt), hessian_width=n_max,
                activation_store="ram" if in_ram else "file", store_bytes=int(store), stores=stores,
                keeps_mlp_inputs=keeps_mlp_inputs,
                gpu_memory=gpu_budget, host_memory=host_budget, fits=not reasons, reasons=reasons, items=items,
                device_phases={k: int(v) for k, v in dev_totals.items()},
                host_phases={k: int(v) for k, v in host_totals.items()})


def _packed_bytes(s: Shapes, bits: int, group_size: int) -> int:
    """Bytes of one block's packed linear layers: qweight, qzeros, scales (fp16), g_idx."""
    total = 0
    for r, n in s.linears.values():
        groups = 1 if group_size == -1 else math.ceil(n / group_size)
        total += n * r * bits // 8 + groups * r * bits // 8 + groups * r * 2 + n * 4
    return total


def check_fits(p: Plan) -> None:
    """Raises PlanDoesNotFit (a ValueError) with a one-line message when the plan exceeds its budgets."""
    if not p.fits:
        raise PlanDoesNotFit("the run does not fit: " + "; ".join(p.reasons)
                             + " (see `leanfoem plan`; lower --nsamples/--seqlen or use a machine with more memory)")


def format_plan(p: Plan, model: str = "") -> str:
    lines = [f"leanfoem plan{' for ' + model if model else ''}: device {p.device}, compute dtype {p.compute_dtype}"]
    dev = "card" if p.device == "cuda" else "block work, part of host"
    lines.append(f"  device peak   {format_size(p.device_peak_bytes):>11}  ({dev}; at: {p.device_peak_phase})"
                 + (f"  budget {format_size(p.gpu_memory)}" if p.device == "cuda" and p.gpu_memory else ""))
    lines.append(f"  host peak     {format_size(p.host_peak_bytes):>11}  (at: {p.host_peak_phase}; the activation "
                 f"files live in the page cache, not in this)"
                 + (f"  budget {format_size(p.host_memory)}" if p.host_memory else ""))
    lines.append(f"  disk          {format_size(p.disk_bytes):>11}  (output {format_size(p.disk_output_bytes)}, "
                 f"work files {format_size(p.disk_work_bytes)}, freed at the end)")
    lines.append(f"  calibration   {p.calibration_tokens} tokens (rows of {p.seqlen}); forward batch {p.batch_tokens} "
                 f"tokens ({p.rows_per_batch} rows) -> --batch-tokens {p.batch_tokens}")
    lines.append(f"  Hessian       widest {p.hessian_width}x{p.hessian_width}, accumulated in fp32 chunks of "
                 f"{p.hessian_chunk_tokens} tokens, one sub-group at a time")
    lines.append(f"  activations   {p.stores} stores of {format_size(p.store_bytes)} as files: "
                 + ("the page cache keeps them in RAM" if p.activation_store == "ram" else "streamed from disk")
                 + ("; down_proj inputs kept (no gate/up recompute)" if p.keeps_mlp_inputs else ""))
    lines.append("  largest items at the peaks:")
    for item in sorted(p.items, key=lambda i: -i.bytes)[:12]:
        lines.append(f"    {format_size(item.bytes):>11}  {item.where:<6} {item.name}")
    lines.append("  fits: yes" if p.fits else "  fits: NO — " + "; ".join(p.reasons))
    return "\n".join(lines)


def load_config(model: str) -> dict:
    """config.json of `model` (a directory, a config.json file, 'demo', or a hub repo id: only config.json is
    fetched) — never the weights."""
    from .checkpoint_reader import CheckpointError
    from .models import DEMO, _looks_like_repo_id, demo_model_dir
    path = demo_model_dir() if model == DEMO else Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file() and _looks_like_repo_id(model):
        try:
            from huggingface_hub import hf_hub_download
            path = Path(hf_hub_download(model, "config.json"))
        except Exception as exc:
            raise CheckpointError(f"cannot fetch config.json of {model} from the Hugging Face hub (offline, or no "
                                  f"such repo?): {type(exc).__name__}") from None
    if not path.is_file():
        raise CheckpointError(f"no config.json for --model {model}")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"unreadable {path}: {exc}") from None


def budgets_for(device: str, gpu_memory, host_memory) -> tuple[str, int | None, int | None]:
    """The device kind and the budgets to plan for: given values, else this machine's card and RAM."""
    import psutil
    gpu, host = parse_size(gpu_memory), parse_size(host_memory)
    if device == "auto":
        device = "cuda" if gpu is not None or _cuda_available() else "cpu"
    kind = "cpu" if device.startswith("cpu") else "cuda"
    if kind == "cuda" and gpu is None and _cuda_available():
        import torch
        index = int(device.split(":")[1]) if ":" in device else 0
        gpu = torch.cuda.get_device_properties(index).total_memory
    if host is None:
        host = psutil.virtual_memory().total
    return kind, gpu, host


def _cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False
