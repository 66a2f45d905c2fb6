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
  `unload()` it is back on meta;
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
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=arch.attention)
        self.model.eval()
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
        self.structure: BlockStructure | None = None
        self._verified: set[int] = set()

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
    def source_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """The block's tensors as stored, keyed by full name; NaN/Inf rejected."""
        prefix = self.arch.block_prefix(index)
        names = self.reader.names(prefix)
        if not names:
            raise CheckpointError(f"the checkpoint holds no tensor of block {index} ({prefix}*)")
        return {name: check_finite(name, tensor) for name, tensor in self.reader.tensors(names).items()}

    def load(self, index: int, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
        """Block `index` on the device in the compute dtype, from its source tensors."""
        block = self.layers[index]
        prefix = self.arch.block_prefix(index)
        expected = {prefix + n for n, _ in block.named_parameters()}
        missing = sorted(expected - tensors.keys())
        if missing:
            raise CheckpointError(f"tensor {missing[0]} is missing from the checkpoint")
        for name, tensor in tensors.items():
            local = name[len(prefix):]
            if prefix + local in expected:
                set_module_tensor_to_device(block, local, self.device, value=tensor, dtype=self.dtype)
        return block

    def unload(self, index: int) -> None:
        self.layers[index].to("meta")

    @staticmethod
    def release(block: torch.nn.Module, names) -> None:
        """Sends these modules of a loaded block back to meta: a branch that has run for the last time need not
        hold its weights while the rest of the block is solved (hidden 2048: 112 MiB at the down_proj's peak)."""
        for name in names:
            block.get_submodule(name).to("meta")

    def checked_structure(self, index: int, block: torch.nn.Module, row: torch.Tensor) -> BlockStructure:
        """The block structure, derived on the first block this runner loads and verified bit for bit on it and on
        the first block of every other distinct layer call (sliding or full attention), on the real row `row`."""
        hidden = row[None].to(device=self.device, dtype=self.dtype)
        kwargs = self.layer_kwargs(index, hidden.shape[1])
        if self.structure is None:
            self.structure = derive(block, hidden, kwargs)
        call = self._calls[hidden.shape[1]].of_layer[index]
        if call not in self._verified:
            verify(block, self.structure, hidden, kwargs, f"block {index}")
            self._verified.add(call)
        return self.structure

    def forward(self, block: torch.nn.Module, index: int, hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = block(hidden, **self.layer_kwargs(index, hidden.shape[1]))
        return out[0] if isinstance(out, tuple) else out

    # -- one residual branch at a time (structure.Branch) ----------------------------------------------
    def branch_output(self, block, index: int, branch: Branch, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden states after the branch."""
        return block_structure.branch_output(block, branch, hidden, self.layer_kwargs(index, hidden.shape[1]))

    def output_from_kept(self, block, index: int, branch: Branch, hidden, kept) -> torch.Tensor:
        return block_structure.output_from_kept(block, branch, hidden, kept, self.layer_kwargs(index, hidden.shape[1]))

    def input_of(self, block, index: int, branch: Branch, module_name: str, hidden: torch.Tensor) -> torch.Tensor:
        """The input that `module_name` inside the branch receives; the forward stops right there."""
        return block_structure.input_of(block, branch, module_name, hidden, self.layer_kwargs(index, hidden.shape[1]))


def check_finite(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise CheckpointError(f"tensor {name} holds NaN or Inf values")
    return tensor
