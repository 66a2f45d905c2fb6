"""`leanfoem eval` of a mixture-of-experts block: its routed experts read and applied one group at a time.

Why it exists: a plain forward needs a block's experts loaded whole, 22.5 GB per DeepSeek-V3 block in bf16: more than
a 24 GB card (or a small host) once the rest of the block is there. As in quantization (`expert_quantizer.py`), the
experts module never holds its weights. Per MoE block:
1. the block's other weights are loaded; one pass over every window runs the layer up to its experts module
   (`BlockRunner.routed_call`) and keeps what the module receives: its inputs, in a store like the hidden states'
   (host RAM, or a file when large), and its routing (tokens × top-k, host RAM);
2. group-outer: each group of G experts is read from the shards and dequantized once (fp or GPTQ alike, one expert
   at a time into the group's [G, 2I, H] and [G, H, I] in the compute dtype), then applied to the routed tokens of
   every window with `experts.add_routed`, into the routed sum (`RoutedSum`, a work file the page cache holds while
   RAM allows);
3. one more pass runs the whole layer with the experts module answering with its routed sum (`experts.answer_with`).
The part of the layer before the experts runs twice (steps 1 and 3), as in quantization.

What must stay true:
- the output is the whole-block forward's (all experts loaded, the eager loop) bit for bit, whatever G: the batches
  of windows are that forward's (each expert meets the same tokens in one matmul), `add_routed` is the eager loop op
  for op, and the groups are added in ascending expert order into one accumulator in the dtype the module receives;
  the rest of the block is the layer's own forward with only the experts module's forward substituted (the whole
  layer is one branch), so no derived structure has to be verified;
- each expert is read and dequantized once per block, never per batch; the previous group's weights are dropped
  before the next group is read, so at most G experts' weights exist at once;
- several experts modules in one block are taken in the order the block holds them, each one's inputs collected
  with the earlier ones answering with their sums; a block that calls a later one first is refused, never summed
  from zeros;
- blocks without routed experts, or with experts modules of another form than `add_routed` replays, are not
  handled here: they run whole, as before (`runs_in_groups`).
"""

from __future__ import annotations

import math

import psutil
import torch

from .architectures import UnsupportedArchitecture
from .blocks import BlockRunner, check_finite
from .expert_quantizer import RoutedSum
from .experts import RoutedCall, add_routed, answer_with, expert_modules
from .layout import fuse
from .packing import dense_tensors, stored_names, weight_names
from .structure import Branch, StructureError

# A group's dequantized weights may take this share of the memory free once the block's other weights are loaded;
# the rest holds a batch's activations and the experts' intermediates (and, on the CPU, one expert's float32
# dequantization and the stores).
EXPERT_MEMORY_SHARE = 0.5
PARTS = ("gate_up_proj", "down_proj")


def free_memory(device: torch.device) -> int:
    """Bytes free for new tensors: on CUDA the card's free memory plus what torch's cache holds unused, on the CPU
    the host's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return psutil.virtual_memory().available


def runs_in_groups(block: torch.nn.Module) -> bool:
    """Whether the block's routed experts are applied a group at a time: it holds experts modules of the standard form
    `add_routed` replays (`experts.py`). Other forms (biases, transposed or unconcatenated weights: GPT-OSS, Nemotron-H)
    run whole in the model's own forward, as any dense block does, and as before there was this module."""
    try:
        return bool(expert_modules(block))
    except UnsupportedArchitecture:
        return False


def group_size(module, device: torch.device, dtype: torch.dtype, requested: int | None) -> int:
    """Experts per group: `requested` (at most all of them), else as many as fit their dequantized [2I, H] and [H, I]
    in the compute dtype within EXPERT_MEMORY_SHARE of the memory free now (at least one)."""
    if requested is not None:
        return min(requested, module.num_experts)
    per_expert = sum(math.prod(getattr(module, part).shape[1:]) for part in PARTS) * dtype.itemsize
    return max(1, min(module.num_experts, int(free_memory(device) * EXPERT_MEMORY_SHARE) // per_expert))


class StoredBlock:
    """A block's stored tensors, its experts' apart, for fp and GPTQ checkpoints alike: packed linears are laid out
    under their `.weight` names (all transformers' conversion mapping knows) and read as their packed parts."""

    def __init__(self, runner: BlockRunner, index: int, gptq: dict | None):
        self.runner, self.gptq = runner, gptq
        self.prefix = runner.arch.block_prefix(index)
        names = runner.reader.names(self.prefix)
        self.stored = set(names)
        self.layout = runner.layout(index, weight_names(names) if gptq else None)
        experts = [self.prefix + n for param in self.layout.fused.values() for pieces in param.pieces.values()
                   for n in pieces]
        self.of_experts = {name for weight in experts for name in stored_names(weight, self.stored)}
        self.others = [n for n in names if n not in self.of_experts]

    def _dense(self, weights: list[str]) -> dict[str, torch.Tensor]:
        """These `.weight`s (full names) as float tensors, dequantized where packed; NaN/Inf rejected as read."""
        names = [name for weight in weights for name in stored_names(weight, self.stored)]
        read = self.runner.reader.tensors(names)
        return dense_tensors({name: check_finite(name, read.pop(name)) for name in names}, self.gptq)

    def other_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the block but its experts', dense, keyed by full stored (`.weight`) name."""
        return self._dense(weight_names(self.others) if self.gptq else self.others)

    def expert_weights(self, path: str, part: str, experts: range) -> torch.Tensor:
        """The 3-D parameter `part` of the experts module `path` for `experts`, [G, out, in] on the device in the
        compute dtype, filled one expert at a time (one expert's float32 dequantization on the host at a time), each
        converted as `BlockRunner.load` converts a whole block's."""
        param, out = self.layout.fused[f"{path}.{part}"], None
        for local, expert in enumerate(experts):
            pieces = [self.prefix + n for n in param.stored(expert)]
            dense = self._dense(pieces)
            value = fuse([[dense.pop(name) for name in pieces]])[0].to(self.runner.dtype)
            if out is None:
                out = torch.empty((len(experts), *value.shape), dtype=self.runner.dtype, device=self.runner.device)
            out[local] = value
        return out


def block_outputs(runner: BlockRunner, index: int, gptq: dict | None, hidden, windows, requested: int | None):
    """(first window, output batch) of MoE block `index` for every batch of windows (`windows.batches`, the
    whole-block path's batches), the experts applied a group at a time (module docstring)."""
    stored = StoredBlock(runner, index, gptq)
    block = runner.load(index, stored.other_tensors())  # the experts stay on meta
    paths = list(expert_modules(block))
    layer = Branch((), (), experts=tuple(paths))  # the whole layer, its experts modules substituted
    sums: dict[str, RoutedSum] = {}
    try:
        for number, path in enumerate(paths):
            inputs, route = _collect(runner, index, block, layer, path, paths, sums, hidden, windows)
            try:
                sums[path] = RoutedSum(windows.work_dir / f"{windows.name}-experts-{index:05d}-{number}.bin",
                                       windows.count * windows.seqlen, runner.config.hidden_size, inputs.dtype)
                _add_groups(stored, block.get_submodule(path), path, inputs, route, sums[path], windows, requested)
            finally:
                inputs.drop()
        for k, batch in windows.batches(hidden, runner.dtype):
            start = k * windows.seqlen
            answers = {p: answer_with(s, start) for p, s in sums.items()}
            yield k, runner.branch_output(block, index, layer, batch, answers)
    finally:
        for routed_sum in sums.values():
            routed_sum.close()


def _collect(runner, index, block, layer, path, paths, sums, hidden, windows):
    """One pass over the windows: the inputs the experts module `path` receives (a window store) and its routing
    (top-k experts and weights per token, host RAM); the modules before it answer with their sums."""
    inputs, experts, weights = None, [], []
    for k, batch in windows.batches(hidden, runner.dtype):
        start = k * windows.seqlen
        others = {p: answer_with(s, start) for p, s in sums.items()}
        others.update({p: _called_early(p, path) for p in paths[paths.index(path) + 1:]})
        call = runner.routed_call(block, index, layer, path, batch, others)
        if inputs is None:
            inputs = windows.store(f"{windows.name}-experts-{index:05d}-in", call.hidden.shape[-1], call.hidden.dtype)
        for j, row in enumerate(call.hidden.view(batch.shape[0], batch.shape[1], -1)):
            inputs.put(k + j, row)
        experts.append(call.index.cpu())
        weights.append(call.weights.cpu())
    inputs.seal()
    return inputs, (torch.cat(experts), torch.cat(weights))


def _called_early(later: str, path: str):
    """The forward of an experts module held after `path` while `path`'s inputs are collected: it must not run yet."""
    def forward(hidden, index, weights):
        raise StructureError(f"the block calls its experts module {later} before {path}: leanfoem evaluates experts "
                             "modules in the order the block holds them")
    return forward


def _add_groups(stored: StoredBlock, module, path: str, inputs, route, sums: RoutedSum, windows, requested) -> None:
    """Group-outer: each group's weights read once, added for every window's tokens in ascending expert order."""
    runner = stored.runner
    group = group_size(module, runner.device, runner.dtype, requested)
    experts_of, weights_of = route
    for first in range(0, module.num_experts, group):
        experts = range(first, min(first + group, module.num_experts))
        gate_up, down = (stored.expert_weights(path, part, experts) for part in PARTS)
        for k, batch in windows.batches(inputs, inputs.dtype):
            start, x = k * windows.seqlen, batch.reshape(-1, batch.shape[-1])
            stop = start + x.shape[0]
            call = RoutedCall(x, experts_of[start:stop].to(x.device), weights_of[start:stop].to(x.device))
            acc = sums.read(start, x.shape[0]).to(x.device)
            add_routed(acc, call, module, first, gate_up, down)
            sums.write(start, acc)
        del gate_up, down  # before the next group is read: one group's weights at a time
