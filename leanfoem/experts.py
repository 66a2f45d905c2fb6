"""Routed experts: what a transformers experts module computes, replayed one group of experts at a time.

Why it exists: a mixture-of-experts block's experts can outweigh the card (DeepSeek-V3: 256 experts of
3 × 7168 × 2048, 22.5 GB per block in bf16). transformers 5 keeps them in one module with two 3-D parameters
(`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`) whose forward loops over the experts a token was routed to. leanfoem
never loads a block's experts into that module: it reads a group of experts at a time, computes their routed
contribution itself into one accumulator, and hands the finished sum to the model's own MoE code (router, shared
experts and their gates stay the model's) in place of the experts module's forward (`substituted`).

What must stay true:
- `add_routed` is transformers' eager experts loop, op for op: the same gather of the routed tokens (by top-k slot,
  then token), one matmul with the expert's [gate; up] rows, the module's own `_apply_gate`, the down matmul, the
  routing weight, `index_add_` into an accumulator in the hidden states' dtype, experts in ascending order. Summing
  the groups into one accumulator is then the eager module's output bit for bit, whatever the group size;
  `structure.verify` checks this against the module's own forward on the first block of every run;
- only the standard experts form is accepted (transformers' `use_experts_implementation` with gate and up
  concatenated, no biases, not transposed, no norm after the experts); any other is refused in one line naming it;
- routers stay the model's and are never quantized (`routers`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .architectures import UnsupportedArchitecture


@dataclass
class RoutedCall:
    """What the model passes its experts module for one batch: the tokens' inputs and their routing."""
    hidden: torch.Tensor     # [tokens, H]
    index: torch.Tensor      # [tokens, top_k] expert of each slot
    weights: torch.Tensor    # [tokens, top_k] routing weight of each slot


def expert_modules(block: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The block's experts modules (any module holding a parameter of 3 or more dimensions), by path."""
    found = {}
    for name, module in block.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if any(p.dim() >= 3 for p in params.values()):
            _check_standard(name, module, params)
            found[name] = module
    return found


def _check_standard(name: str, module, params: dict) -> None:
    standard = (set(params) == {"gate_up_proj", "down_proj"} and hasattr(module, "_apply_gate")
                and getattr(module, "has_gate", False) and getattr(module, "is_concatenated", False)
                and not getattr(module, "has_bias", True) and not getattr(module, "is_transposed", True)
                and not getattr(module, "has_post_expert_norm", True))
    if not standard:
        raise UnsupportedArchitecture(f"unsupported experts module {name} ({type(module).__name__}): leanfoem "
                                      "quantizes experts with concatenated gate/up and down projections, no biases")


def routers(block: torch.nn.Module, experts: dict[str, torch.nn.Module]) -> set[str]:
    """Modules outside the experts whose 2-D weight has at most as many outputs as there are experts: the routers
    (`mlp.gate`) and the shared experts' sigmoid gates ([1, H]). Their outputs choose and weigh experts; they stay
    as stored (vLLM and GPTQModel load them unquantized). No real projection is that narrow."""
    if not experts:
        return set()
    most = max(m.num_experts for m in experts.values())
    found = set()
    for name, module in block.named_modules():
        weight = getattr(module, "weight", None)
        inside = any(name.startswith(path + ".") or name == path for path in experts)
        if isinstance(weight, torch.nn.Parameter) and weight.dim() == 2 and weight.shape[0] <= most and not inside:
            found.add(name)
    return found


def tokens_of(index: torch.Tensor, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k slot, token) of every token routed to `expert`, in the eager loop's order."""
    return torch.where((index == expert).T)


def add_routed(acc: torch.Tensor, call: RoutedCall, module, first: int, gate_up: torch.Tensor,
               down: torch.Tensor) -> None:
    """acc += the routed output of experts first .. first + len(gate_up) - 1 (their [2I, H] and [H, I] weights)."""
    for local in range(gate_up.shape[0]):
        slot, token = tokens_of(call.index, first + local)
        if token.numel() == 0:
            continue
        h = module._apply_gate(F.linear(call.hidden[token], gate_up[local]))
        h = F.linear(h, down[local]) * call.weights[token, slot, None]
        acc.index_add_(0, token, h.to(acc.dtype))


def expert_inputs(module, call: RoutedCall, first: int, gate_up: torch.Tensor, expert: int,
                  token: torch.Tensor | None) -> torch.Tensor:
    """The inputs of one expert's down projection for the given tokens (None: every token)."""
    x = call.hidden if token is None else call.hidden[token]
    return module._apply_gate(F.linear(x, gate_up[expert - first]))


@contextlib.contextmanager
def substituted(block: torch.nn.Module, forwards: dict):
    """Runs the block with each experts module's forward replaced (path -> fn(hidden, index, weights))."""
    modules = [block.get_submodule(path) for path in forwards]
    for module, forward in zip(modules, forwards.values()):
        module.forward = forward
    try:
        yield
    finally:
        for module in modules:
            del module.forward


def answer_with(routed_sum, start: int):
    """An experts forward that returns the routed sum (`expert_quantizer.RoutedSum`) of the batch's tokens, which start
    at token `start`: the finished sum stands in for the module."""
    def forward(hidden, index, weights):
        return routed_sum.read(start, hidden.shape[0]).to(hidden.device)
    return forward


def zeros(hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Stands in for experts whose output does not matter (the passes that stop before it is used)."""
    return torch.zeros_like(hidden)


def eager_group_forward(module, first: int, gate_up: torch.Tensor, down: torch.Tensor):
    """The module's own (eager) forward restricted to experts first .. first + G - 1: tokens routed elsewhere get
    the loop's skip index, and the module holds just the group's weights. The reference `add_routed` is checked
    against."""
    count = gate_up.shape[0]

    def forward(hidden, index, weights):
        local = torch.where((index >= first) & (index < first + count), index - first, count)
        saved = module.num_experts, module._parameters["gate_up_proj"], module._parameters["down_proj"]
        module.num_experts = count
        module._parameters["gate_up_proj"] = torch.nn.Parameter(gate_up, requires_grad=False)
        module._parameters["down_proj"] = torch.nn.Parameter(down, requires_grad=False)
        try:
            return type(module).forward(module, hidden, local, weights)
        finally:
            module.num_experts, module._parameters["gate_up_proj"], module._parameters["down_proj"] = saved
    return forward
