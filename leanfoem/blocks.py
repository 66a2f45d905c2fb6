"""One decoder block at a time: a model skeleton on the meta device, blocks materialised from the shards.

Why it exists: this is how a 70B model runs on a 24 GB card (DESIGN §2). Nothing here knows an
architecture beyond the names in `architectures.py`; the blocks are the real transformers modules.

What must stay true:
- the skeleton is built under `accelerate.init_empty_weights()` and run with `use_cache=False` (a
  DynamicCache in the captured arguments would grow with every block call);
- the inputs of block 0 and the keyword arguments each block takes (position embeddings, masks: per layer
  type where the family interleaves them) are captured by replacing every layer with a module that records
  its call and hands its input on, each distinct set of arguments kept once;
- the block structure the pipeline walks is verified on the first block, before it is trusted;
- a block holds weights only between `load()` and `unload()` (parts of it less, after `release()`); after
  `unload()` it is back on meta. Its experts are loaded only when their stored tensors are handed to `load()`
  (tests compare against that whole-block forward); quantization (`expert_weights`) and evaluation
  (`expert_evaluation.py`) read them a group at a time and never put them in the module;
- tensors are read and written under their stored names (`layout.py`); the model's names are used only to find
  the module a tensor belongs to;
- every float tensor read is checked for NaN/Inf, naming the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from transformers import AutoModelForCausalLM

from . import structure as block_structure
from .architectures import Architecture
from .checkpoint_reader import CheckpointError, CheckpointReader
from .experts import RoutedCall, expert_modules
from .layout import BlockLayout, StoredLayout, fuse
from .structure import BlockStructure, Branch, StructureError, derive, verify


class _Captured(Exception):
    pass


class _Recorder(torch.nn.Module):
    """Stands in for one decoder layer: records what the model passes it and hands the hidden states on unchanged;
    the last one stops the forward (the final norm is not materialised). Attributes the model's loop reads from a
    layer (e.g. `attention_type`) are the real layer's."""

    def __init__(self, layer, last: bool):
        super().__init__()
        object.__setattr__(self, "_layer", layer)
        self.last, self.hidden_states, self.kwargs = last, None, None

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise StructureError("cannot capture the decoder layers' arguments: the model passes them positionally")
        self.hidden_states = hidden_states
        self.kwargs = {k: v for k, v in kwargs.items() if k not in _PER_CALL}
        if self.last:
            raise _Captured
        return hidden_states


_PER_CALL = ("past_key_values", "cache", "use_cache")  # the skeleton runs without a cache


@dataclass
class LayerCalls:
    """The keyword arguments each decoder layer receives for one row length, each distinct set stored once:
    families interleaving sliding and full attention pass `causal_mask_mapping[layer_types[i]]` (and Gemma 3 local
    or global rotary tables) per layer, so layer 0's call is not every layer's."""
    distinct: list[dict]
    of_layer: list[int]


class BlockRunner:
    def __init__(self, config, reader: CheckpointReader, arch: Architecture, device: torch.device,
                 dtype: torch.dtype):
        self.config, self.reader, self.arch = config, reader, arch
        self.device, self.dtype = device, dtype
        with init_empty_weights():
            # eager experts: the loop `experts.add_routed` reproduces (the default grouped_mm sums differently)
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=arch.attention,
                                                          experts_implementation="eager")
        self.model.eval()
        self.stored_layout = StoredLayout(self.model)
        self._layouts: dict[int, BlockLayout] = {}
        base_name, _, _ = arch.layers.rpartition(".")
        try:
            self.base = self.model.get_submodule(base_name)
            self.layers = self.model.get_submodule(arch.layers)
        except AttributeError:
            raise StructureError(f"unsupported architecture {type(self.model).__name__}: its decoder layers are not "
                                 f"at {arch.layers} (an override in architectures.py can say where)") from None
        for module in self.base.children():  # buffers outside the blocks (rotary inv_freq, embed scale) stay real
            if module is not self.layers:
                for name, buffer in module.named_buffers():
                    if buffer.device.type != "meta":
                        set_module_tensor_to_device(module, name, device)
        self._embedding = None
        self._calls: dict[int, LayerCalls] = {}
        self._structures: dict[tuple, BlockStructure] = {}   # per kind of block (dense first layers, MoE layers)
        self._verified: set[tuple] = set()

    @property
    def num_blocks(self) -> int:
        return len(self.layers)

    # -- inputs of block 0 --------------------------------------------------------------------------
    def embed_weight(self) -> torch.Tensor:
        if self._embedding is None:
            key = self._module_name(self.model.get_input_embeddings()) + ".weight"
            self._embedding = check_finite(key, self.reader.tensor(key))
        return self._embedding

    def _module_name(self, module) -> str:
        return next(k for k, m in self.model.named_modules() if m is module)

    def block_inputs(self, ids: torch.Tensor) -> torch.Tensor:
        """Hidden states entering block 0 for one row of token ids, [1, len, hidden]: the model's own embedding
        module (some scale inside it) and whatever its forward does before the first layer (multipliers)."""
        embedding = self.model.get_input_embeddings()
        if embedding.weight.device.type == "meta":  # on the device until release_embedding()
            set_module_tensor_to_device(embedding, "weight", self.device, value=self.embed_weight(), dtype=self.dtype)
        with torch.no_grad():
            embeds = embedding(ids[None].to(self.device)).to(self.dtype)
        hidden, calls = self._run_recorders(embeds)
        self._calls.setdefault(ids.numel(), calls)
        return hidden

    def layer_kwargs(self, index: int, length: int) -> dict:
        """Keyword arguments decoder layer `index` takes for a row of `length` tokens (computed once per length)."""
        if length not in self._calls:
            embeds = torch.zeros((1, length, self.config.hidden_size), device=self.device, dtype=self.dtype)
            self._calls[length] = self._run_recorders(embeds)[1]
        calls = self._calls[length]
        return calls.distinct[calls.of_layer[index]]

    def release_embedding(self) -> None:
        self._embedding = None
        self.model.get_input_embeddings().to("meta")

    def _run_recorders(self, embeds: torch.Tensor):
        real = list(self.layers)
        recorders = [_Recorder(layer, last=i == len(real) - 1) for i, layer in enumerate(real)]
        for i, recorder in enumerate(recorders):
            self.layers[i] = recorder
        try:
            with torch.no_grad():
                self.base(inputs_embeds=embeds, use_cache=False)
        except _Captured:
            pass
        finally:
            for i, layer in enumerate(real):
                self.layers[i] = layer
        distinct, of_layer, seen = [], [], {}
        for recorder in recorders:
            if recorder.kwargs is None:
                raise StructureError(f"cannot capture the decoder layers' arguments: layer {len(of_layer)} is "
                                     "never called")
            key = tuple((k, id(v)) for k, v in recorder.kwargs.items())
            if key not in seen:
                seen[key] = len(distinct)
                distinct.append(recorder.kwargs)
            of_layer.append(seen[key])
        return recorders[0].hidden_states, LayerCalls(distinct, of_layer)

    # -- blocks -------------------------------------------------------------------------------------
    def layout(self, index: int, names: list[str] | None = None) -> BlockLayout:
        """How block `index`'s tensors are stored (names, per-expert pieces), checked complete against the model.
        `names`: the block's stored names as the caller sees them instead of the checkpoint's (evaluation names a GPTQ
        checkpoint's packed linears by their `.weight`, `packing.weight_names`)."""
        if names is not None:
            return self._laid_out(index, names)
        if index not in self._layouts:
            self._layouts[index] = self._laid_out(index, self.reader.names(self.arch.block_prefix(index)))
        return self._layouts[index]

    def _laid_out(self, index: int, names: list[str]) -> BlockLayout:
        prefix = self.arch.block_prefix(index)
        if not names:
            raise CheckpointError(f"the checkpoint holds no tensor of block {index} ({prefix}*)")
        layout = self.stored_layout.block(prefix, names)
        _check_experts_complete(self.layers[index], layout, prefix)
        return layout

    def source_tensors(self, index: int, experts: bool = True) -> dict[str, torch.Tensor]:
        """The block's tensors as stored, keyed by full stored name; NaN/Inf rejected. `experts=False` leaves the
        per-expert tensors out (quantization reads them a group at a time)."""
        prefix = self.arch.block_prefix(index)
        names = self.reader.names(prefix) if experts else [prefix + n for n in self.layout(index).plain.values()]
        if not names:
            raise CheckpointError(f"the checkpoint holds no tensor of block {index} ({prefix}*)")
        return {name: check_finite(name, tensor) for name, tensor in self.reader.tensors(names).items()}

    def load(self, index: int, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
        """Block `index` on the device in the compute dtype, from its stored tensors (full names); its experts too
        when their tensors are among them, else they stay on meta (quantization and evaluation read them a group at
        a time)."""
        block, prefix = self.layers[index], self.arch.block_prefix(index)
        layout = self.stored_layout.block(prefix, list(tensors))
        expected = set(block.state_dict(keep_vars=True))  # parameters and persistent buffers (score biases)
        if layout.fused:
            _check_experts_complete(block, layout, prefix)
        else:  # experts not handed in: their parameters stay on meta
            expected -= {f"{path}.{name}" for path in expert_modules(block) for name in ("gate_up_proj", "down_proj")}
        missing = sorted(expected - layout.plain.keys() - layout.fused.keys())
        if missing:
            raise CheckpointError(f"tensor {prefix + missing[0]} is missing from the checkpoint")
        for local, stored in layout.plain.items():
            if local in expected:
                set_module_tensor_to_device(block, local, self.device, value=tensors[prefix + stored], dtype=self.dtype)
        for local, param in layout.fused.items():
            value = fuse([[tensors[prefix + n] for n in param.stored(e)] for e in sorted(param.pieces)])
            set_module_tensor_to_device(block, local, self.device, value=value, dtype=self.dtype)
        return block

    def expert_weights(self, index: int, path: str, experts: range, part: str) -> torch.Tensor:
        """One 3-D parameter (`part`: "gate_up_proj" [G, 2I, H] or "down_proj" [G, H, I]) of experts `experts` of the
        experts module `path`, read from the shards, on the device in the compute dtype."""
        prefix, param = self.arch.block_prefix(index), self.layout(index).fused[f"{path}.{part}"]
        names = [[prefix + n for n in param.stored(e)] for e in experts]
        read = self.reader.tensors([n for pieces in names for n in pieces])
        value = fuse([[check_finite(n, read.pop(n)) for n in pieces] for pieces in names])
        return value.to(device=self.device, dtype=self.dtype)

    def expert_names(self, index: int, path: str, expert: int) -> tuple[list[str], list[str]]:
        """Full stored names (without `.weight`) of one expert's gate/up pieces (in row order) and down projection."""
        prefix, layout = self.arch.block_prefix(index), self.layout(index)
        return tuple([prefix + n[: -len(".weight")] for n in layout.fused[path + suffix].stored(expert)]
                     for suffix in (".gate_up_proj", ".down_proj"))

    def unload(self, index: int) -> None:
        self.layers[index].to("meta")

    @staticmethod
    def release(block: torch.nn.Module, names) -> None:
        """Sends these modules of a loaded block back to meta: a branch that has run for the last time need not
        hold its weights while the rest of the block is solved (hidden 2048: 112 MiB at the down_proj's peak)."""
        for name in names:
            block.get_submodule(name).to("meta")

    def checked_structure(self, index: int, block: torch.nn.Module, row: torch.Tensor,
                          expert_group: int | None = None) -> BlockStructure:
        """The block structure, derived on the first block of each kind this runner loads (dense first layers and MoE
        layers differ) and verified bit for bit on it and on the first block of every other distinct layer call
        (sliding or full attention), on the real row `row`. Experts are verified on their first group of
        `expert_group` experts (all when None), read from the shards for it."""
        hidden = row[None].to(device=self.device, dtype=self.dtype)
        kwargs = self.layer_kwargs(index, hidden.shape[1])
        kind = tuple((name, type(m).__name__) for name, m in block.named_modules())
        if kind not in self._structures:
            self._structures[kind] = derive(block, hidden, kwargs)
        structure = self._structures[kind]
        call = (kind, self._calls[hidden.shape[1]].of_layer[index])
        if call not in self._verified:
            group = {}
            for path in structure.experts:
                count = block.get_submodule(path).num_experts
                first = range(min(expert_group or count, count))
                group[path] = (0, *(self.expert_weights(index, path, first, p) for p in ("gate_up_proj", "down_proj")))
            verify(block, structure, hidden, kwargs, f"block {index}", group)
            self._verified.add(call)
        return structure

    def forward(self, block: torch.nn.Module, index: int, hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = block(hidden, **self.layer_kwargs(index, hidden.shape[1]))
        return out[0] if isinstance(out, tuple) else out

    # -- one residual branch at a time (structure.Branch) ----------------------------------------------
    def branch_output(self, block, index: int, branch: Branch, hidden: torch.Tensor,
                      routed: dict | None = None) -> torch.Tensor:
        """The hidden states after the branch; its experts answer with `routed` (path -> forward)."""
        return block_structure.branch_output(block, branch, hidden, self.layer_kwargs(index, hidden.shape[1]), routed)

    def routed_call(self, block, index: int, branch: Branch, path: str, hidden: torch.Tensor,
                    routed: dict | None = None) -> RoutedCall:
        """The inputs and routing the experts module `path` receives for these hidden states (the branch's other experts
        modules answering with `routed`, path -> forward; zeros where it has none)."""
        return block_structure.routed_call(block, branch, path, hidden, self.layer_kwargs(index, hidden.shape[1]),
                                           routed)

    def output_from_kept(self, block, index: int, branch: Branch, hidden, kept) -> torch.Tensor:
        return block_structure.output_from_kept(block, branch, hidden, kept, self.layer_kwargs(index, hidden.shape[1]))

    def input_of(self, block, index: int, branch: Branch, module_name: str, hidden: torch.Tensor) -> torch.Tensor:
        """The input that `module_name` inside the branch receives; the forward stops right there."""
        return block_structure.input_of(block, branch, module_name, hidden, self.layer_kwargs(index, hidden.shape[1]))


def _check_experts_complete(block, layout: BlockLayout, prefix: str) -> None:
    """Every experts module is stored per expert, and every expert has all its pieces (a missing one is named)."""
    for path, module in expert_modules(block).items():
        for local in (path + ".gate_up_proj", path + ".down_proj"):
            param = layout.fused.get(local)
            if param is None:
                raise CheckpointError(f"the checkpoint does not store {prefix + local} per expert (as "
                                      f"{prefix + path}.N.*.weight); leanfoem reads experts one by one")
            width = max(len(pieces) for pieces in param.pieces.values())
            for expert in range(module.num_experts):
                for slot, name in enumerate(param.pieces.get(expert, [None] * width)):
                    if name is None:
                        raise CheckpointError(f"tensor {prefix + _sibling_name(param, slot, expert)} is missing "
                                              "from the checkpoint")


def _sibling_name(param, slot: int, expert: int) -> str:
    """The stored name a missing piece would have: another expert's, with the expert number replaced."""
    other, pieces = next((e, p) for e, p in param.pieces.items() if p[slot] is not None)
    return pieces[slot].replace(f".{other}.", f".{expert}.", 1)


def check_finite(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise CheckpointError(f"tensor {name} holds NaN or Inf values")
    return tensor
