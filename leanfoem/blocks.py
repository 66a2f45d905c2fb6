"""One decoder block at a time: a model skeleton on the meta device, blocks materialised from the shards.

Why it exists: this is how a 70B model runs on a 24 GB card (DESIGN §2). Nothing here knows an
architecture beyond the names in `architectures.py`; the blocks are the real transformers modules.

What must stay true:
- the skeleton is built under `accelerate.init_empty_weights()` and run with `use_cache=False` (a
  DynamicCache in the captured arguments would grow with every block call);
- the inputs of block 0 and the keyword arguments every block takes (position embeddings, masks) are
  captured by replacing block 0 with a module that records its call and stops the forward;
- a block holds weights only between `load()` and `unload()` (parts of it less, after `release()`); after
  `unload()` it is back on meta;
- every float tensor read is checked for NaN/Inf, naming the tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from transformers import AutoModelForCausalLM

from .architectures import Architecture, Branch
from .checkpoint_reader import CheckpointError, CheckpointReader


class _Captured(Exception):
    pass


class _StopForward(Exception):
    pass


class _Recorder(torch.nn.Module):
    """Stands in for block 0: records the hidden states and keyword arguments, then stops the forward."""

    def forward(self, hidden_states, *args, **kwargs):
        self.hidden_states, self.kwargs = hidden_states, kwargs
        raise _Captured


class BlockRunner:
    def __init__(self, config, reader: CheckpointReader, arch: Architecture, device: torch.device,
                 dtype: torch.dtype):
        self.config, self.reader, self.arch = config, reader, arch
        self.device, self.dtype = device, dtype
        with init_empty_weights():
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        self.model.eval()
        base_name, _, _ = arch.layers.rpartition(".")
        self.base = self.model.get_submodule(base_name)
        self.layers = self.model.get_submodule(arch.layers)
        for module in self.base.children():  # buffers outside the blocks (rotary inv_freq) stay real
            if module is not self.layers:
                for name, buffer in module.named_buffers():
                    if buffer.device.type != "meta":
                        set_module_tensor_to_device(module, name, device)
        self._embedding = None
        self._kwargs_by_length = {}

    @property
    def num_blocks(self) -> int:
        return len(self.layers)

    # -- inputs of block 0 --------------------------------------------------------------------------
    def embed_weight(self) -> torch.Tensor:
        if self._embedding is None:
            name = self.model.get_input_embeddings()
            key = next(k for k, m in self.model.named_modules() if m is name) + ".weight"
            self._embedding = check_finite(key, self.reader.tensor(key))
        return self._embedding

    def block_inputs(self, ids: torch.Tensor) -> torch.Tensor:
        """Hidden states entering block 0 for one row of token ids, [1, len, hidden]."""
        embeds = F.embedding(ids[None], self.embed_weight()).to(device=self.device, dtype=self.dtype)
        hidden, kwargs = self._run_recorder(embeds)
        self._kwargs_by_length.setdefault(ids.numel(), kwargs)
        return hidden

    def block_kwargs(self, length: int) -> dict:
        """Keyword arguments every block takes for a row of `length` tokens (computed once per length)."""
        if length not in self._kwargs_by_length:
            embeds = torch.zeros((1, length, self.config.hidden_size), device=self.device, dtype=self.dtype)
            self._kwargs_by_length[length] = self._run_recorder(embeds)[1]
        return self._kwargs_by_length[length]

    def release_embedding(self) -> None:
        self._embedding = None

    def _run_recorder(self, embeds: torch.Tensor):
        recorder, first = _Recorder(), self.layers[0]
        self.layers[0] = recorder
        try:
            with torch.no_grad():
                self.base(inputs_embeds=embeds, use_cache=False)
        except _Captured:
            pass
        finally:
            self.layers[0] = first
        kwargs = {k: v for k, v in recorder.kwargs.items() if k not in ("past_key_values", "use_cache")}
        return recorder.hidden_states, kwargs

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

    def forward(self, block: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = block(hidden, **self.block_kwargs(hidden.shape[1]))
        return out[0] if isinstance(out, tuple) else out

    # -- one residual branch at a time (architectures.Branch) ----------------------------------------------
    def branch_body(self, block: torch.nn.Module, branch: Branch, hidden: torch.Tensor) -> torch.Tensor:
        """body(norm(h)), called as the decoder layer calls it."""
        kwargs = self.block_kwargs(hidden.shape[1]) if branch.takes_block_kwargs else {}
        with torch.no_grad():
            normed = block.get_submodule(branch.norm)(hidden)
            out = block.get_submodule(branch.body)(normed, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def branch_output(self, block: torch.nn.Module, branch: Branch, hidden: torch.Tensor) -> torch.Tensor:
        """h + body(norm(h)): the hidden states after the branch."""
        return hidden + self.branch_body(block, branch, hidden)

    def input_of(self, block: torch.nn.Module, branch: Branch, module_name: str, hidden: torch.Tensor) -> torch.Tensor:
        """The input that `module_name` inside the branch's body receives; the forward stops right there."""
        seen = {}

        def grab(module, args):
            seen["x"] = args[0]
            raise _StopForward

        handle = block.get_submodule(module_name).register_forward_pre_hook(grab)
        try:
            self.branch_body(block, branch, hidden)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return seen["x"]


def check_finite(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise CheckpointError(f"tensor {name} holds NaN or Inf values")
    return tensor
