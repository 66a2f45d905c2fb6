"""What a trace of a block cannot see: where the blocks live, which attention a family needs, how its logits
are scaled. Everything else about a block (its sub-groups, their order, its residual branches) is derived
from the model itself by `structure.py`.

Why it exists: GPTQModel carries a hand-written definition for each of ~158 model types. Here a normal dense
decoder-only family (blocks at `model.layers`, `nn.Linear` projections, a final norm at `model.norm`) needs
no entry at all; an entry is an override, for a fact that lies outside the decoder layers' own forward.

What must stay true:
- no family name appears outside this file;
- an override never states a block's sub-groups or branches: those are derived and verified bit for bit on
  the first block of every run (`structure.py`), so a wrong table cannot quantize silently;
- a config that names no causal-LM class transformers knows is refused here, before any weight is read, with a
  one-line `UnsupportedArchitecture`. Mixture-of-experts families need no entry either: their experts modules
  and routers are recognised in the block (`experts.py`), their stored per-expert names read from transformers'
  conversion mapping (`layout.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class UnsupportedArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class Architecture:
    layers: str = "model.layers"          # where the decoder blocks live
    final_norm: str = "model.norm"        # applied after the last block (evaluation)
    lm_head: str = "lm_head"              # tied to the input embedding when absent from the checkpoint
    attention: str = "sdpa"               # the attention implementation the blocks run with

    def block_prefix(self, index: int) -> str:
        return f"{self.layers}.{index}."


DENSE = Architecture()

# Overrides only. Gemma 2's attention softcapping exists only in its eager attention (transformers refuses sdpa
# for it), and eager is what plain transformers runs it with.
OVERRIDES: dict[str, Architecture] = {
    "Gemma2ForCausalLM": Architecture(attention="eager"),
}

# Config fields that announce routed experts.
_EXPERT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def architecture_for(config) -> Architecture:
    """The overrides of a config (a PretrainedConfig, or config.json as a dict: `plan` refuses what `quantize`
    refuses, with the same words), or UnsupportedArchitecture."""
    from transformers import AutoModelForCausalLM

    if isinstance(config, dict):
        config = _config_from_dict(config)
    names = list(getattr(config, "architectures", None) or [])
    shown = ", ".join(names) or f"model_type {getattr(config, 'model_type', '?')!r}"
    mapping = AutoModelForCausalLM._model_mapping  # what transformers (or a caller's register()) can build
    built = mapping[type(config)].__name__ if type(config) in mapping else None
    if built is None or (names and built not in names):
        raise UnsupportedArchitecture(f"unsupported architecture {shown}: not a causal LM that transformers "
                                      f"builds from model_type {getattr(config, 'model_type', '?')!r}")
    return next((OVERRIDES[n] for n in names if n in OVERRIDES), DENSE)


def has_routed_experts(config) -> bool:
    if isinstance(config, dict):
        return any(config.get(field) for field in _EXPERT_FIELDS)
    return any(getattr(config, field, None) for field in _EXPERT_FIELDS)


def check_terms_supported(config, alpha: float, beta_auto: bool = False) -> None:
    """The GPTAQ term needs each layer's inputs in the unquantized model too, and `--beta auto` held-out statistics
    of every layer; for routed experts neither is built yet. Refused up front (quantize and plan alike), before any
    weight is read."""
    if not has_routed_experts(config):
        return
    if alpha > 0:
        raise UnsupportedArchitecture("--alpha (the GPTAQ term) is not supported for mixture-of-experts models "
                                      "yet; use --method foem or gptq")
    if beta_auto:
        raise UnsupportedArchitecture("--beta auto is not supported for mixture-of-experts models yet; give a "
                                      "number (default 0.2)")


def _config_from_dict(fields: dict):
    from transformers import AutoConfig

    model_type = fields.get("model_type") or "?"
    try:
        return AutoConfig.for_model(model_type, **{k: v for k, v in fields.items() if k != "model_type"})
    except (ValueError, KeyError):
        shown = ", ".join(fields.get("architectures") or []) or f"model_type {model_type!r}"
        raise UnsupportedArchitecture(f"unsupported architecture {shown}: transformers knows no model_type "
                                      f"{model_type!r}") from None


def scale_logits(config, logits: torch.Tensor) -> torch.Tensor:
    """What the causal-LM head does to the lm_head's output, from the config fields transformers reads there:
    a logit scale (Cohere), a logits divisor (Granite), final softcapping (Gemma 2/3)."""
    scale = getattr(config, "logit_scale", None)
    if scale is not None:
        logits = logits * scale
    divisor = getattr(config, "logits_scaling", None)
    if divisor is not None:
        logits = logits / divisor
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits
