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

Mixture-of-experts models (config fields, not family names: `Shapes.blocks` tells dense blocks from MoE ones, MLA
attention from GQA). An MoE block's attention and shared expert(s) are planned as a dense block's sub-groups; its
routers stay unquantized (copied). Its routed experts are processed in groups of `Plan.expert_group` experts,
each group's peak being the largest of (`_expert_phases`):
- the group's weights in the compute dtype, next to the block's other weights;
- the gate/up Hessian state: with `expert_calibration="all"` one H×H fp32 Hessian for the whole block (every
  expert sees every token) and its fp32 factor U kept across the groups; with "routed" one H×H per expert;
- the stacked gate/up solve ([G·2I, H]: W, W₀ and the solver's temporaries, as for a dense sub-group), the G
  down_proj Hessians (I×I fp32) with one fp64 factorisation at a time, the stacked down_proj solve [G·H, I];
- the forward of one batch through one expert at a time (3·I values per token) and its fp32 routed outputs.
On the host an MoE block adds the group's tensors as stored (FP8 sources, `quantization_config.quant_method`
"fp8": one byte per weight plus the block scales, and one tensor dequantized at a time), the packed experts of the
block so far, the routing of all calibration tokens (top-k ids and weights), and two work files that live in the
page cache like the activation stores: the experts' inputs (T×H, compute dtype) and the fp32 sum of their routed
outputs (T×H). The group is the largest that fits both budgets, a divisor of the expert count when possible
(`_expert_group`); when one expert per group does not fit, the plan says so with the numbers.

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
# The quantizer's passes over an experts module's inputs read them in windows of whole rows, up to this many tokens
# (at least one row), whatever the forward batch: each expert's sums (its Hessian, its routed output) then group its
# tokens the same way on every run, and the checkpoint does not depend on the batch that memory allowed.
EXPERT_WINDOW_TOKENS = 4096
# Rows of the dequantize / pack loops (solver.QuantResult.dequantized, packing.pack_rows).
COLUMN_CHUNK = 1024
SOLVER_BLOCK = 128
DEFAULT_BATCH_TOKENS = 4096
DEFAULT_CALIBRATION_BYTES = 300_000  # the bundled leanfoem/demo/calibration.txt


class PlanDoesNotFit(ValueError):
    """The run cannot fit the memory budget; the message is one line with the numbers."""


@dataclass(frozen=True)
class LatentAttention:
    """Multi-head latent attention (MLA): queries and keys/values pass through low-rank projections."""
    q_lora_rank: int | None    # None: one q_proj [heads·qk, H] instead of q_a_proj / q_b_proj
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class Block:
    """One kind of decoder block, without its routed experts: the linears quantized as sub-groups (attention,
    then the dense MLP or the shared expert), in quantization order, and what is copied as it is.
    A dense model has one kind; a mixture-of-experts model has MoE blocks and possibly dense ones."""
    kind: str                                            # "dense" or "MoE"
    count: int                                           # blocks of this kind in the model
    linears: dict[str, tuple[int, int]]                  # (out, in) of every quantized linear
    subgroups: list[tuple[tuple[str, ...], int]]         # sub-groups and the width n of their shared input
    other_params: int                                    # norms, biases, routers: copied as they are
    mlp_width: int                                       # the dense MLP's intermediate (0: none)
    routed: bool                                         # has routed experts

    @property
    def linear_params(self) -> int:
        return sum(r * n for r, n in self.linears.values())

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params


@dataclass
class Shapes:
    """What the budget needs to know of a model, from its config: the dense fields, MLA attention when the
    config has LoRA ranks, routed and shared experts when it has an expert count, and the FP8 source format."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    stored_bytes: int          # bytes per stored value outside FP8 linears (2 for bf16/fp16, 4 for fp32)
    max_positions: int | None
    latent: LatentAttention | None = None
    experts: int = 0                # routed experts of an MoE block (0: a dense model)
    expert_intermediate: int = 0
    top_k: int = 0
    shared_experts: int = 0         # shared experts, fused into one dense MLP of `shared_intermediate`
    shared_intermediate: int = 0
    shared_gate: bool = False       # a [1, H] sigmoid gate on the shared expert's output
    moe_layers: int = 0
    fp8_block: tuple[int, int] | None = None   # FP8 source: the block one weight_scale_inv value scales

    @property
    def attention_linears(self) -> dict[str, tuple[int, int]]:
        h, m = self.hidden, self.latent
        if m is None:
            q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
            return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q)}
        qk, heads = m.qk_nope_head_dim + m.qk_rope_head_dim, self.heads
        queries = ({"q_proj": (heads * qk, h)} if m.q_lora_rank is None else
                   {"q_a_proj": (m.q_lora_rank, h), "q_b_proj": (heads * qk, m.q_lora_rank)})
        return {**queries, "kv_a_proj_with_mqa": (m.kv_lora_rank + m.qk_rope_head_dim, h),
                "kv_b_proj": (heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank),
                "o_proj": (h, heads * m.v_head_dim)}

    @property
    def attention_subgroups(self) -> list[tuple[tuple[str, ...], int]]:
        """The attention's sub-groups in quantization order and their input width; with MLA, the query and the
        key/value down-projections share the block's normed input, then each up-projection has its own."""
        m = self.latent
        if m is None:
            return [(("q_proj", "k_proj", "v_proj"), self.hidden), (("o_proj",), self.heads * self.head_dim)]
        if m.q_lora_rank is None:
            queries = [(("q_proj", "kv_a_proj_with_mqa"), self.hidden)]
        else:
            queries = [(("q_a_proj", "kv_a_proj_with_mqa"), self.hidden), (("q_b_proj",), m.q_lora_rank)]
        return queries + [(("kv_b_proj",), m.kv_lora_rank), (("o_proj",), self.heads * m.v_head_dim)]

    @property
    def attention_width(self) -> int:
        """Values per token of the attention's projected states (the forward's activations); with MLA, the
        queries and kv_b_proj's up-projected keys and values."""
        m = self.latent
        if m is None:
            return (self.heads + self.kv_heads) * self.head_dim
        return self.heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.qk_nope_head_dim + m.v_head_dim)

    @property
    def attention_other_params(self) -> int:
        """Norms and biases of a block's attention branch and its two residual norms (all a dense block copies)."""
        extra = 2 * self.hidden
        if self.latent is None:  # q/k/v biases and q/k norms, counted whether the family has them or not: the config
            # does not always say (Qwen2's biases are in its modeling code), and the bound is ~0.01% of a block
            extra += (self.heads + 2 * self.kv_heads) * self.head_dim + 2 * self.head_dim
        if self.latent is not None:  # q_a_layernorm, kv_a_layernorm
            extra += (self.latent.q_lora_rank or 0) + self.latent.kv_lora_rank
        return extra

    def _mlp(self, width: int, prefix: str = "") -> tuple[dict, list]:
        h = self.hidden
        linears = {f"{prefix}gate_proj": (width, h), f"{prefix}up_proj": (width, h), f"{prefix}down_proj": (h, width)}
        return linears, [((f"{prefix}gate_proj", f"{prefix}up_proj"), h), ((f"{prefix}down_proj",), width)]

    @property
    def linears(self) -> dict[str, tuple[int, int]]:
        """(out, in) of every quantized linear of a dense block."""
        return {**self.attention_linears, **self._mlp(self.intermediate)[0]}

    @property
    def subgroups(self) -> list[tuple[tuple[str, ...], int]]:
        """Sub-groups of a dense block in quantization order and the width n of their shared input."""
        return self.attention_subgroups + self._mlp(self.intermediate)[1]

    @property
    def expert_linears(self) -> dict[str, tuple[int, int]]:
        """(out, in) of one routed expert's linears, as stored (one tensor each)."""
        return self._mlp(self.expert_intermediate)[0]

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden * self.expert_intermediate

    @property
    def blocks(self) -> list[Block]:
        """The kinds of decoder block of this model, dense ones first."""
        kinds = []
        if self.layers > self.moe_layers:
            kinds.append(Block("dense", self.layers - self.moe_layers, self.linears, self.subgroups,
                               self.attention_other_params, self.intermediate, routed=False))
        if self.moe_layers:
            linears, subgroups = dict(self.attention_linears), list(self.attention_subgroups)
            if self.shared_intermediate:
                mlp, groups = self._mlp(self.shared_intermediate, "shared_expert.")
                linears.update(mlp)
                subgroups += groups
            # the router [E, H] (and a score-correction bias [E]), the shared expert's gate [1, H]
            router = self.experts * (self.hidden + 1) + (self.hidden if self.shared_gate else 0)
            kinds.append(Block("MoE", self.moe_layers, linears, subgroups, self.attention_other_params + router,
                               self.shared_intermediate, routed=True))
        return kinds

    @property
    def outside_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def stored_linear_bytes(self, params: int) -> int:
        """Bytes of `params` linear weights as stored: FP8 values plus one fp32 scale per block, or the dtype."""
        if self.fp8_block is None:
            return params * self.stored_bytes
        return params + 4 * math.ceil(params / (self.fp8_block[0] * self.fp8_block[1]))


# Config fields, first match wins: transformers' MoE families spell the same fact differently.
_EXPERT_COUNT = ("n_routed_experts", "num_local_experts", "num_experts", "moe_num_experts")
_EXPERT_WIDTH = ("moe_intermediate_size", "expert_intermediate_size")
_TOP_K = ("num_experts_per_tok", "moe_topk", "top_k")


def shapes_from_config(config) -> Shapes:
    c = _config_dict(config)
    text = c.get("text_config") or {}
    get = lambda k, default=None: c.get(k, text.get(k, default))  # noqa: E731
    first = lambda names, default=None: next((get(k) for k in names if get(k)), default)  # noqa: E731
    hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
    head_dim = get("head_dim") or hidden // heads
    dtype = str(get("dtype") or get("torch_dtype") or "bfloat16").removeprefix("torch.")
    layers, intermediate = int(get("num_hidden_layers")), int(get("intermediate_size"))
    experts = int(first(_EXPERT_COUNT, 0))
    expert_width = int(first(_EXPERT_WIDTH, intermediate)) if experts else 0  # else intermediate_size wide
    shared_count, shared_width = _shared_expert(get, experts, expert_width)
    return Shapes(hidden=hidden, intermediate=intermediate, layers=layers,
                  heads=heads, kv_heads=int(get("num_key_value_heads") or heads), head_dim=int(head_dim),
                  vocab=int(get("vocab_size")), tied=bool(get("tie_word_embeddings", False)),
                  stored_bytes=4 if dtype in ("float32", "float") else 2,
                  max_positions=get("max_position_embeddings"),
                  latent=_latent_attention(get),
                  experts=experts, expert_intermediate=expert_width, top_k=int(first(_TOP_K, 1)) if experts else 0,
                  shared_experts=shared_count, shared_intermediate=shared_width,
                  shared_gate=bool(experts and get("shared_expert_intermediate_size")),
                  moe_layers=_moe_layer_count(get, experts, layers), fp8_block=_fp8_block(get))


def _latent_attention(get) -> LatentAttention | None:
    """MLA when the config names a key/value LoRA rank (its `head_dim`, if any, is then the rope part only)."""
    if not get("kv_lora_rank"):
        return None
    return LatentAttention(q_lora_rank=get("q_lora_rank") or None, kv_lora_rank=int(get("kv_lora_rank")),
                           qk_nope_head_dim=int(get("qk_nope_head_dim")), qk_rope_head_dim=int(get("qk_rope_head_dim")),
                           v_head_dim=int(get("v_head_dim")))


def _shared_expert(get, experts: int, expert_width: int) -> tuple[int, int]:
    """(count, fused width) of the shared expert(s): one MLP of its own width, or n experts' widths fused."""
    if not experts:
        return 0, 0
    if get("shared_expert_intermediate_size"):
        return 1, int(get("shared_expert_intermediate_size"))
    count = int(get("n_shared_experts") or get("num_shared_experts") or 0)
    return count, count * expert_width


def _moe_layer_count(get, experts: int, layers: int) -> int:
    """How many layers route to experts: an explicit per-layer list (`mlp_layer_types`), else the rules of
    transformers' MoE decoder layers (the first `first_k_dense_replace` layers dense, `mlp_only_layers` dense,
    every `decoder_sparse_step`-th layer routed)."""
    if not experts:
        return 0
    types = get("mlp_layer_types")
    if types:
        return sum(t == "sparse" for t in types[:layers])
    first_dense, dense = int(get("first_k_dense_replace") or 0), set(get("mlp_only_layers") or [])
    step = int(get("decoder_sparse_step") or 1)
    return sum(i >= first_dense and i not in dense and (i + 1) % step == 0 for i in range(layers))


def _fp8_block(get) -> tuple[int, int] | None:
    """The block of one `weight_scale_inv` value when the checkpoint stores FP8 linears, else None."""
    q = get("quantization_config") or {}
    if q.get("quant_method") != "fp8":
        return None
    return tuple(q.get("weight_block_size") or (128, 128))


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
    experts: int = 0                  # routed experts per MoE block (0: a dense model)
    expert_intermediate: int = 0
    top_k: int = 0
    shared_experts: int = 0           # fused into one dense MLP of shared_intermediate
    shared_intermediate: int = 0
    expert_group: int | None = None   # experts loaded, accumulated and solved together (None: no experts)
    expert_groups: int = 0            # groups per MoE block (the last one shorter when expert_group does not divide)
    expert_calibration: str | None = None   # "all" (every expert sees every token) or "routed"
    moe_blocks: int = 0
    dense_blocks: int = 0
    expert_files_bytes: int = 0       # work files of an MoE block: the experts' inputs + the routed-output accumulator
    source_fp8: bool = False          # linears stored as FP8 with block scales, dequantized tensor by tensor
    nproc: int = 1                    # processes of a torchrun job; the numbers above are one rank's
    reduction_bytes: int = 0          # rank 0's buffer for the partial sums the other ranks send it
    rank0_device_peak_bytes: int = 0  # rank 0: the peaks above plus that buffer
    rank0_host_peak_bytes: int = 0

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
         alpha: float = 0.0, beta: float | str = 0.2, batch_tokens: int | None = None, calib_bytes: int | None = None,
         checkpoint_format: str = "gptq", expert_calibration: str = "all", expert_group: int | None = None,
         compute_dtype: str | None = None, nproc: int = 1) -> Plan:
    """The budget of `leanfoem quantize` for this config and these settings.

    `device`: "cpu" or "cuda" (a "cuda:N" works too). `gpu_memory`/`host_memory`: the budgets, bytes or
    strings like "24GiB" (None: not checked). `batch_tokens=None` lets the planner choose the largest power-of-two
    batch that fits (≤ 16384 tokens on CUDA, ≤ 4096 on the CPU, ≥ one row); a given value is kept and
    checked. `calib_bytes`: size of the calibration text file (its tokenization is a peak of small runs; default the bundled text).
    Mixture-of-experts models: `expert_calibration` "all" (every expert's statistics from all calibration tokens)
    or "routed" (from the tokens routed to it); `expert_group=None` lets the planner choose how many experts are
    loaded and solved together (`_expert_group`), a given value is kept and checked.
    `compute_dtype`: the forward dtype ("float32", "bfloat16", ...; None: fp32 on the CPU, half on CUDA).
    `beta="auto"` counts `--beta auto`'s held-out statistics.
    `nproc`: processes of a torchrun job (`distributed.py`): each holds its share of the rows, rank 0 also a buffer
    for the partial Hessian sums it receives; the plan is one rank's, rank 0's peaks apart.
    """
    del checkpoint_format  # same sizes in both formats
    if expert_calibration not in ("all", "routed"):
        raise ValueError(f"expert_calibration must be 'all' or 'routed', not {expert_calibration!r}")
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

    rows = -(-nsamples // nproc)  # a rank's share of the calibration rows (the largest share)

    def at(tokens: int, group: int | None) -> Plan:
        p = _plan_with(shapes, kind, gpu_budget, host_budget, rows, seqlen, bits, group_size, method, gptaq,
                       beta, tokens, calib_bytes, compute, group, expert_calibration)
        return _with_ranks(p, nproc, gptaq) if nproc > 1 else p

    if batch_tokens is not None:
        batches = [batch_tokens]
    else:  # on CUDA a larger batch feeds the card better (up to 16384 tokens); on the CPU it only costs memory
        largest = 1 << 14 if kind == "cuda" else DEFAULT_BATCH_TOKENS
        batches = [max(tokens, seqlen) for tokens in (1 << k for k in range(14, 5, -1)) if tokens <= largest]
    group = None
    if shapes.moe_layers:
        # Fewer groups first (each group is one more pass over the experts' inputs), then the largest batch.
        group = (min(max(1, expert_group), shapes.experts) if expert_group is not None
                 else _expert_group(lambda g: at(batches[-1], g).fits, shapes.experts))
        if group is None:
            refused = at(batches[-1], 1)
            refused.reasons = [f"even with one expert per group, {reason}" for reason in refused.reasons]
            return refused
    chosen = None
    for tokens in batches:
        chosen = at(tokens, group)
        if chosen.fits:
            return chosen
    return chosen  # the smallest batch: does not fit, and says why


def _with_ranks(p: Plan, nproc: int, gptaq: bool) -> Plan:
    """A rank's plan (`p`, for its share of the rows) with rank 0's extra: the buffer that receives each other rank's
    partial sums of the widest Hessian (and GPTAQ cross term), counted on top of its peaks (conservative: it lives
    between the Hessian pass and the factorisation). On the CPU the device is the host."""
    p.nproc, p.reduction_bytes = nproc, p.hessian_width ** 2 * 4 * (2 if gptaq else 1)
    p.rank0_device_peak_bytes = p.device_peak_bytes + p.reduction_bytes
    p.rank0_host_peak_bytes = p.host_required_bytes + (p.reduction_bytes if p.device == "cpu" else 0)
    p.items.append(Item("rank 0: buffer for the other ranks' partial Hessian sums", p.reduction_bytes,
                        "device" if p.device == "cuda" else "host", "Hessian reduction"))
    if p.device == "cuda" and p.gpu_memory is not None and p.rank0_device_peak_bytes > p.gpu_memory:
        p.reasons.append(f"rank 0's device peak {format_size(p.rank0_device_peak_bytes)} exceeds the GPU budget "
                         f"{format_size(p.gpu_memory)}")
    if p.host_memory is not None and p.rank0_host_peak_bytes > p.host_memory:
        p.reasons.append(f"rank 0's host peak {format_size(p.rank0_host_peak_bytes)} exceeds the host budget "
                         f"{format_size(p.host_memory)}")
    p.fits = not p.reasons
    return p


def _expert_group(fits, experts: int) -> int | None:
    """The expert-group size, or None when not even one expert fits. Memory grows with the group, so the largest
    group that fits is found by bisection; then a divisor of the expert count is preferred (equal groups) unless
    the largest divisor that fits is under half that size (a prime count): then the fewest, balanced groups."""
    if not fits(1):
        return None
    low, high = 1, experts
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    divisor = max(d for d in range(1, low + 1) if experts % d == 0)
    return divisor if 2 * divisor >= low else math.ceil(experts / math.ceil(experts / low))


def _plan_with(s: Shapes, kind, gpu_budget, host_budget, nsamples, seqlen, bits, group_size, method, gptaq, beta,
               batch_tokens, calib_bytes, compute: tuple[str, int], group=None, calibration="all") -> Plan:
    compute_name, c = compute                         # the forward dtype and its bytes
    h = s.hidden
    rows = min(nsamples, max(1, batch_tokens // seqlen))  # pipeline.batches: whole rows, at least one
    bt = rows * seqlen                                 # tokens in one forward batch
    tokens = nsamples * seqlen
    moe = bool(s.moe_layers)
    blocks = s.blocks
    store = tokens * h * c
    streams = 2 if gptaq else 1
    stores = 3 * streams  # per stream: block inputs, kept o_proj inputs, after-attention states (pipeline._advance)
    # On the CPU the down_proj's inputs are kept too (a file intermediate/hidden stores wide, alive in the MLP
    # branch next to three stores) when that fits in RAM: reading them back costs far less than the gate/up
    # forward that would recompute them. On CUDA recomputing them is the cheaper side.
    keep_width = max(b.mlp_width for b in blocks)
    wide_store = tokens * keep_width * c
    mlp_branch_store = 3 * store + wide_store
    # An MoE block adds two work files: the experts' inputs (compute dtype) and the fp32 sum of their routed outputs.
    expert_files = tokens * h * (c + 4) if moe else 0
    batch_in = bt * h * c
    items: list[Item] = []

    # -- the block work (device on CUDA, host on the CPU) --------------------------------------------------------
    by_kind: dict[str, dict[str, list[tuple[str, int]]]] = {}
    for b in blocks:
        phases = {(f"{b.kind} blocks: " if moe else "") + name: parts
                  for name, parts in _block_phases(s, b, kind, c, bt, rows, seqlen, gptaq, beta).items()}
        if b.routed:  # the expert passes read their inputs in fixed windows of whole rows, not forward batches
            window = min(nsamples, max(1, EXPERT_WINDOW_TOKENS // seqlen)) * seqlen
            phases.update(_expert_phases(s, b, kind, c, window, group, calibration, gptaq, beta))
        if kind == "cuda":
            for parts in phases.values():
                parts.append(("CUDA context, cuBLAS workspace", CUDA_CONTEXT))
        by_kind[b.kind] = phases
    dev_phases = {name: parts for phases in by_kind.values() for name, parts in phases.items()}
    dev_totals = {phase: sum(b for _, b in parts) for phase, parts in dev_phases.items()}
    dev_phase = max(dev_totals, key=dev_totals.get)
    device_peak = dev_totals[dev_phase]
    items += [Item(name, b, "device" if kind == "cuda" else "host", dev_phase) for name, b in dev_phases[dev_phase] if b]

    # -- host ------------------------------------------------------------------------------------------------------
    base = RUNTIME_BASE + (CUDA_HOST_OVERHEAD if kind == "cuda" else 0)
    tokenizer = TOKENIZER_FIXED + TOKENIZER_PER_VOCAB * s.vocab
    embed = s.vocab * h * s.stored_bytes
    outside = s.outside_params * s.stored_bytes
    host_phases: dict[str, list[tuple[str, int]]] = {
        "tokenizing the calibration text": [("tokenizer", tokenizer),
                                            ("encodings of the calibration text", TOKENIZE_PER_TEXT_BYTE * calib_bytes)],
        "first inputs (embedding)": [("embed_tokens + its shard pages while read", 2 * embed),
                                     ("rows being written to the first activation store", seqlen * h * c)],
    }
    for b in blocks:
        phases = by_kind[b.kind]
        peak = max(phases, key=lambda name: dev_totals[name])
        label = f" ({b.kind} blocks)" if moe else ""
        host_phases.update(_host_block_phases(s, b, kind, c, bt, seqlen, tokens, bits, group_size, group,
                                              calibration, gptaq, phases[peak], label, beta == "auto"))
    host_phases["writing the tensors outside the blocks"] = [("embedding / lm_head / norm + serialised copy",
                                                              2 * outside)]
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
    block_work = max(total for phase, total in host_totals.items()
                     if phase.startswith(("block work", "reading an expert group")))
    in_ram = host_budget is None or max(required, block_work + stores * store + expert_files) <= host_budget
    keeps_mlp_inputs = in_ram and kind == "cpu" and keep_width > 0 and (
        host_budget is None or block_work + streams * mlp_branch_store <= host_budget)
    work_stores = streams * max(3 * store, mlp_branch_store if keeps_mlp_inputs else 0) + expert_files
    host_phase = max(host_totals, key=host_totals.get)
    host_peak = host_totals[host_phase]
    items += [Item(name, b, "host", host_phase) for name, b in host_phases[host_phase] if b]

    # -- disk --------------------------------------------------------------------------------------------------------
    packed_expert = _packed_bytes(s.expert_linears, bits, group_size) if moe else 0
    disk_output = sum(b.count * (_packed_bytes(b.linears, bits, group_size) + b.other_params * 2
                                 + (s.experts * packed_expert if b.routed else 0)) for b in blocks) + outside
    disk_work = work_stores
    items += [Item("output checkpoint", disk_output, "disk", "end"),
              Item(f"work files: {stores} activation stores" + (" + kept down_proj inputs" if keeps_mlp_inputs else "")
                   + (" + the experts' inputs and their routed-output accumulator" if moe else ""),
                   disk_work, "disk", "block boundary")]

    reasons = []
    if kind == "cuda" and gpu_budget is not None and device_peak > gpu_budget:
        reasons.append(f"device peak {format_size(device_peak)} ({dev_phase}) exceeds the GPU budget "
                       f"{format_size(gpu_budget)}")
    if host_budget is not None and required > host_budget:
        reasons.append(f"host peak {format_size(required)} ({required_phase}) exceeds the host budget "
                       f"{format_size(host_budget)}")
    widths = [n for b in blocks for _, n in b.subgroups] + ([h, s.expert_intermediate] if moe else [])
    return Plan(device=kind, compute_dtype=compute_name,
                device_peak_bytes=int(device_peak), device_peak_phase=dev_phase, host_peak_bytes=int(host_peak),
                host_peak_phase=host_phase, host_required_bytes=int(required), disk_output_bytes=int(disk_output),
                disk_work_bytes=int(disk_work), disk_bytes=int(disk_output + disk_work), batch_tokens=int(bt),
                rows_per_batch=rows, seqlen=seqlen, calibration_tokens=tokens,
                hessian_chunk_tokens=min(HESSIAN_CHUNK_TOKENS, bt), hessian_width=max(widths),
                activation_store="ram" if in_ram else "file", store_bytes=int(store), stores=stores,
                keeps_mlp_inputs=keeps_mlp_inputs,
                gpu_memory=gpu_budget, host_memory=host_budget, fits=not reasons, reasons=reasons, items=items,
                device_phases={k: int(v) for k, v in dev_totals.items()},
                host_phases={k: int(v) for k, v in host_totals.items()},
                experts=s.experts if moe else 0, expert_intermediate=s.expert_intermediate if moe else 0,
                top_k=s.top_k if moe else 0, shared_experts=s.shared_experts, shared_intermediate=s.shared_intermediate,
                expert_group=group,
                expert_groups=math.ceil(s.experts / group) if group else 0,
                expert_calibration=calibration if moe else None, moe_blocks=s.moe_layers,
                dense_blocks=s.layers - s.moe_layers,
                expert_files_bytes=int(expert_files), source_fp8=s.fp8_block is not None)


def _block_phases(s: Shapes, b: Block, kind, c, bt, rows, seqlen, gptaq, beta) -> dict[str, list[tuple[str, int]]]:
    """Device phases of a block's sub-groups outside the routed experts (all of a dense block's): the Hessian
    pass, the factorisation of the widest Hessian, the column loop of the largest stacked solve, propagation."""
    h = s.hidden
    n_max = max(n for _, n in b.subgroups)
    widest = next(names for names, n in b.subgroups if n == n_max)[-1]
    # the layers of a sub-group are solved as one stacked matrix (pipeline._quantize_group)
    r_max, n_solve = max(((sum(b.linears[m][0] for m in names), n) for names, n in b.subgroups),
                         key=lambda rn: rn[1] * (rn[1] + rn[0]))
    block = b.params * c
    name = "block weights without the experts (compute dtype)" if b.routed else "block weights (compute dtype)"
    weights = [(name, block)] + ([("native block copy (GPTAQ)", block)] if gptaq else [])
    # an MoE block's forward runs its shared expert, then its routed experts one at a time, and scores the router
    mlp = b.mlp_width + (s.expert_intermediate if b.routed else 0)
    fwd_per_token = c * (5 * h + 3 * s.attention_width + 3 * mlp) + 8 * h + (8 * s.experts if b.routed else 0)
    forward = bt * fwd_per_token + rows * s.heads * seqlen * 8  # + sdpa (flash / memory-efficient) workspace
    batch_in = bt * h * c
    chunk = min(HESSIAN_CHUNK_TOKENS, bt) * n_max * 4 if c != 4 else 0
    hess = n_max * n_max * 4
    cross = hess if gptaq else 0
    # --beta auto (beta_choice.py): the held-out rows' H (and cross term) beside the fit rows', then all rows' too
    held = (hess + cross) if beta == "auto" else 0
    phases = {"hessian pass": weights + [
        ("H fp32 (widest sub-group)", hess), ("GPTAQ cross term fp32", cross),
        ("held-out rows' H fp32 (--beta auto)", held),
        ("forward batch (activations, MLP intermediates, sdpa)", forward * (2 if gptaq else 1)),
        ("batch inputs", batch_in * (2 if gptaq else 1)),
        ("fp32 chunk of inputs", chunk * (3 if gptaq else 1))]}
    fp64 = n_max * n_max * 8
    phases[f"factorisation ({widest})"] = weights + [
        ("H fp32", hess), ("GPTAQ cross term fp32", cross),
        ("held-out rows' H, all rows' H fp32 (--beta auto; in host memory on a GPU)", 2 * held if kind == "cpu" else 0),
        ("fp64 factorisation buffers", fp64 if kind == "cpu" else 2 * fp64)]
    if gptaq:
        phases["GPTAQ P = α·triu(C·Uᵀ)·U"] = weights + [("U, C, copy of C, two products (fp32)", 5 * hess)]
    u = n_solve * n_solve * 4
    phases["column loop (widest layer)"] = weights + [
        ("U fp32", u), ("GPTAQ P fp32", u if gptaq else 0),
        ("W, W₀ fp32, codes, block temporaries", _solver_bytes(r_max, n_solve, beta)),
        ("held-out rows' H, all rows' H (on the CPU), a candidate's weights fp32 (--beta auto)",
         (2 if kind == "cpu" else 1) * n_solve * n_solve * 4 * (2 if gptaq else 1) + r_max * n_solve * 4
         if beta == "auto" else 0)]
    phases["propagation"] = weights + [("forward batch", forward), ("batch inputs and outputs", 2 * batch_in)]
    return phases


def _solver_bytes(r: int, n: int, beta: float) -> int:
    """The column loop of an r×n stacked solve (W, W₀ with FOEM's first-order term, codes, block temporaries), or
    its dequantize step, whichever is larger (solver.py)."""
    rn = r * n
    solve = rn * (4 + (4 if beta else 0) + 1) + SOLVER_BLOCK * r * 4 * 6
    dequant = rn * 1 + rn * 4 + COLUMN_CHUNK * r * 4 * 3
    return max(solve, dequant)


def _gate_up_state(s: Shapes, group: int, calibration: str, gptaq: bool) -> list[tuple[str, int]]:
    """The gate/up Hessian state alive through an expert group. "all": every expert sees every token, so one
    H×H Hessian serves the whole block and its factor U lives across the groups; "routed": one per expert."""
    h, k = s.hidden, 2 if gptaq else 1  # GPTAQ keeps a cross term next to every Hessian
    if calibration == "all":
        return [("gate/up Hessian H×H fp32, one for all the block's experts", k * h * h * 4),
                ("its upper factor U fp32, kept across the groups", h * h * 4)]
    return [(f"gate/up Hessians H×H fp32, one per expert of the group ({group})", k * group * h * h * 4)]


def _expert_phases(s: Shapes, b: Block, kind, c, bt, group, calibration, gptaq, beta) -> dict[str, list]:
    """Device phases of one group of `group` routed experts: their stacked gate/up solve, their down_proj
    Hessians and solve, and the forward that feeds them, one expert at a time, `bt` tokens (a window) at once."""
    h, i, g, k = s.hidden, s.expert_intermediate, group, 2 if gptaq else 1
    fp64 = 1 if kind == "cpu" else 2  # fp64 n×n buffers of one factorisation (LAPACK / torch), one at a time
    experts = g * s.expert_params * c
    block = [("block weights without the experts (compute dtype)", b.params * c)]
    # from the gate/up solve on: the group's quantized gate/up and its down weights as read (expert_quantizer.py
    # drops the gate/up weights as read once they are laid out for the column loop), and the group's codes
    weights = block + [(f"weights of {g} experts (compute dtype)", experts),
                       (f"codes of {g} experts' solves (uint8), until packed", g * s.expert_params)] + (
              [("native copy of the group (GPTAQ)", experts)] if gptaq else [])
    gate_up = _gate_up_state(s, g, calibration, gptaq)
    down = [(f"down_proj Hessians I×I fp32, one per expert of the group ({g})", k * g * i * i * 4)]
    chunk = min(HESSIAN_CHUNK_TOKENS, bt) * max(h, i) * 4 if c != 4 else 0
    gate_up_p = (h * h * 4 if calibration == "all" else g * h * h * 4) if gptaq else 0
    return {
        "expert group: forward, one expert at a time": weights + gate_up + down + [
            ("window inputs", bt * h * c), ("one expert's intermediates (gate, up, product)", bt * 3 * i * c),
            ("routed outputs of the window (fp32)", bt * h * 4), ("fp32 chunk of inputs", chunk)],
        "expert group: gate/up factorisation": block + gate_up + [("fp64 factorisation buffers", fp64 * h * h * 8)],
        "expert group: gate/up column loop (experts stacked)": block + gate_up + [
            ("GPTAQ P fp32", gate_up_p), ("W, W₀ fp32, codes, block temporaries", _solver_bytes(g * 2 * i, h, beta))],
        "expert group: down_proj factorisation": weights + gate_up + down + [
            ("fp64 factorisation buffers", fp64 * i * i * 8)],
        "expert group: down_proj column loop (one expert at a time)": weights + gate_up + down + [
            ("GPTAQ P fp32", i * i * 4 if gptaq else 0),
            ("W, W₀ fp32, codes, block temporaries", _solver_bytes(h, i, beta))],
    }


def _host_block_phases(s: Shapes, b: Block, kind, c, bt, seqlen, tokens, bits, group_size, group, calibration,
                       gptaq, device_peak_parts, label, beta_auto) -> dict[str, list[tuple[str, int]]]:
    """Host phases of one kind of block: reading it, its work (on the CPU: the device's peak phase), and for an
    MoE block reading an expert group (its tensors as stored, an FP8 tensor dequantized one at a time). With a GPU,
    `--beta auto` parks the widest held-out and all-rows Hessians in host memory during the factorisation."""
    h = s.hidden
    packed = _packed_bytes(b.linears, bits, group_size)
    if b.routed:
        packed += s.experts * _packed_bytes(s.expert_linears, bits, group_size)
    stored = s.stored_linear_bytes(b.linear_params) + b.other_params * s.stored_bytes
    reading = [("block tensors as stored + shard pages while read", 2 * stored)]
    if s.fp8_block:
        reading.append(("one FP8 tensor dequantized (fp32 product, bf16 copy)",
                        6 * max(r * n for r, n in b.linears.values())))
    routing = [("routing of the calibration tokens (top-k ids int32, weights fp32)", tokens * s.top_k * 8)] \
        if b.routed else []
    common = [("BLAS / oneDNN buffers, modeling code", COMPUTE_RUNTIME),
              ("block tensors as stored (norms, biases kept)", b.other_params * s.stored_bytes),
              ("packed layers of the block so far" + (" (all its experts)" if b.routed else ""), packed)] + routing
    if kind == "cpu":
        work = common + device_peak_parts
    else:
        work = common + [("a batch read from the store (rows + stacked copy)", 2 * bt * h * c),
                         ("one output row copied back", seqlen * h * c)] + (
                        [("routed outputs read back and summed (fp32)", 2 * bt * h * 4)] if b.routed else []) + (
                        [("held-out rows' H, all rows' H fp32, parked (--beta auto)",
                          2 * (2 if gptaq else 1) * max(n for _, n in b.subgroups) ** 2 * 4)] if beta_auto else [])
    phases = {"reading a block" + label: reading, "block work" + label: work}
    if b.routed:
        source = group * s.stored_linear_bytes(s.expert_params)
        held = [("the block's tensors without the experts, as stored", stored)]
        if kind == "cpu":  # what lives across the groups on the "device"
            held += [("block weights without the experts (compute dtype)", b.params * c)]
            held += _gate_up_state(s, group, calibration, gptaq) if calibration == "all" else []
        phases["reading an expert group"] = common + held + [
            (f"the group's {group} experts as stored + shard pages while read", 2 * source),
            ("one FP8 tensor dequantized (fp32 product, bf16 copy)",
             6 * h * s.expert_intermediate if s.fp8_block else 0)]
    return phases


def _packed_bytes(linears: dict[str, tuple[int, int]], bits: int, group_size: int) -> int:
    """Bytes of packed linear layers: qweight, qzeros, scales (fp16), g_idx."""
    total = 0
    for r, n in linears.values():
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
    lines += _format_experts(p)
    if p.nproc > 1:
        lines.append(f"  per rank      {p.nproc} processes, each with at most {p.calibration_tokens // p.seqlen} "
                     f"calibration rows: the figures above are one rank's (on CUDA, one card each)")
        lines.append(f"  rank 0        device peak {format_size(p.rank0_device_peak_bytes)}, host peak "
                     f"{format_size(p.rank0_host_peak_bytes)} (+{format_size(p.reduction_bytes)}: the other ranks' "
                     f"partial Hessian sums, received one rank at a time)")
        lines.append(f"  work files    {format_size(p.disk_work_bytes)} per rank, in each rank's OUT/.leanfoem "
                     f"({format_size(p.nproc * p.disk_work_bytes)} together on a shared file system); the output "
                     f"is written by rank 0 alone")
        if p.device == "cpu":
            lines.append(f"  this machine  {p.nproc} ranks on one host need about "
                         f"{format_size(p.rank0_host_peak_bytes + (p.nproc - 1) * p.host_required_bytes)} together")
    lines.append("  largest items at the peaks:")
    for item in sorted(p.items, key=lambda i: -i.bytes)[:12]:
        lines.append(f"    {format_size(item.bytes):>11}  {item.where:<6} {item.name}")
    lines.append("  fits: yes" if p.fits else "  fits: NO — " + "; ".join(p.reasons))
    return "\n".join(lines)


def _format_experts(p: Plan) -> list[str]:
    """The expert and FP8-source lines of a plan (none for a dense bf16 model)."""
    lines = []
    if p.experts:
        shared = (f" (+{p.shared_experts} shared of {p.shared_intermediate // p.shared_experts})"
                  if p.shared_experts else "")
        groups = f"{p.expert_groups} group{'s' if p.expert_groups > 1 else ''}"
        lines.append(f"  experts       {p.experts} routed of {p.expert_intermediate}{shared} per block, "
                     f"top-{p.top_k}: groups of {p.expert_group} experts ({groups})")
        tokens = "all calibration tokens" if p.expert_calibration == "all" else "the tokens routed to it"
        lines.append(f"                {p.moe_blocks} of {p.moe_blocks + p.dense_blocks} blocks route to experts; "
                     f"each expert's statistics from {tokens}; work files of the experts' inputs and routed "
                     f"outputs {format_size(p.expert_files_bytes)}")
    if p.source_fp8:
        lines.append("  source        FP8 linears with block scales: read as stored, dequantized to bf16 one tensor "
                     "at a time")
    return lines


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
