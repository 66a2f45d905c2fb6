"""A decoder block's structure, read from the block itself: its sub-groups, their order, its residual branches.

Why it exists: a table per family does not scale (GPTQModel: ~158 hand-written entries), and a table copied from a
look-alike family quantizes silently with the wrong structure. Instead the first block of a run is called once on
a real calibration row with hooks on every `nn.Linear` and on every child of the decoder layer:
- linears that read the same input tensor form a sub-group (one Hessian, one solve); sub-groups are quantized in
  the order of their first use;
- a residual branch is a chain of the layer's children, each called on the previous one's output, whose result
  is added to the hidden state: h <- h + chain(h), checked on the traced tensors bit for bit. Pre-norms
  (Llama), sandwich norms (Gemma), post-norms (OLMo 2) and dropouts (Phi-3) are all such chains; a residual
  multiplier (h <- h + m * chain(h), m a float attribute of the layer) is found the same way. Where a layer is not
  a sequence of such branches (parallel attention and MLP), the whole layer is one branch: correct, and slower
  (each sub-group's pass runs the layer up to it);
- a branch whose chain returns a linear's output unchanged, up to the chain's later calls (post norms), can form
  its output from that linear's kept inputs: one matmul instead of a forward (the o_proj/down_proj shortcut).

What must stay true:
- `verify` is run on the first block of every run, before any weight is changed: the structure, run the way the
  pipeline runs it, must give the layer's own output and every sub-group's input bit for bit, or the run is
  refused with `StructureError` (one line);
- every `nn.Linear` of the block runs exactly once per call and every weight matrix of the block belongs to one
  (else refused: its Hessian or its quantization would be wrong or missing);
- a sub-group is a tuple of linear names sharing one input; a branch is a residual segment holding whole
  sub-groups and, in a mixture-of-experts block, its experts modules (`experts.py`). Routers are neither: they
  stay as stored;
- the experts' own forward never runs here (their weights stay on the meta device): every pass runs the block with
  the experts substituted, by zeros in the passes that stop before their output is used (verified: the inputs
  of every sub-group come out the same), by the routed sum the pipeline computed group by group otherwise
  (`leanfoem eval` substitutes them the same way, on the whole layer as one branch: `expert_evaluation.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import experts as routed_experts
from .architectures import UnsupportedArchitecture
from .experts import RoutedCall, substituted


class StructureError(UnsupportedArchitecture):
    """The block's structure cannot be derived, or the derived one does not reproduce the layer."""


class _Stop(Exception):
    pass


@dataclass(frozen=True)
class Call:
    """One call of a child of the decoder layer, as the layer makes it."""
    module: str
    input: int | str                              # where the chain's tensor goes: positional 0 or a keyword
    passed: tuple[tuple[str, str], ...] = ()      # keyword <- the layer's own keyword argument of that name
    constants: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True)
class Branch:
    """h <- h + chain(h) over `calls` (times `scale`, a float attribute of the layer, where it has one); no calls:
    h <- layer(h), the whole layer. `output` is the linear whose output `calls[-1 - tail]` returns unchanged (None: no
    shortcut); the `tail` calls after it are applied to it. `experts`: the experts modules the branch runs."""
    calls: tuple[Call, ...]
    subgroups: tuple[tuple[str, ...], ...]
    output: str | None = None
    tail: int = 0
    scale: float | None = None
    experts: tuple[str, ...] = ()

    def add(self, hidden, out):
        return hidden + (out if self.scale is None else out * self.scale)

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.subgroups for name in group)


@dataclass(frozen=True)
class BlockStructure:
    branches: tuple[Branch, ...]

    @property
    def subgroups(self) -> tuple[tuple[str, ...], ...]:
        return tuple(group for branch in self.branches for group in branch.subgroups)

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(name for group in self.subgroups for name in group)

    @property
    def experts(self) -> tuple[str, ...]:
        return tuple(path for branch in self.branches for path in branch.experts)

    @property
    def layer_wide(self) -> bool:
        return len(self.branches) == 1 and not self.branches[0].calls


# -- running a branch -------------------------------------------------------------------------------------
def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _call(block, call: Call, x, layer_kwargs: dict):
    kwargs = {k: layer_kwargs.get(v) for k, v in call.passed}
    kwargs.update(call.constants)
    module = block.get_submodule(call.module)
    return _first(module(x, **kwargs) if call.input == 0 else module(**{call.input: x}, **kwargs))


def run_chain(block, branch: Branch, hidden, layer_kwargs: dict, calls=None, routed: dict | None = None):
    """chain(h) of a branch (the layer's output for the whole-layer branch); each experts module of the branch
    answers with `routed[path](hidden, index, weights)`, zeros where `routed` has no entry."""
    forwards = {path: (routed or {}).get(path, routed_experts.zeros) for path in branch.experts}
    with torch.no_grad(), substituted(block, forwards):
        if not branch.calls:
            return _first(block(hidden, **layer_kwargs))
        x = hidden
        for call in branch.calls if calls is None else calls:
            x = _call(block, call, x, layer_kwargs)
        return x


def branch_output(block, branch: Branch, hidden, layer_kwargs: dict, routed: dict | None = None):
    out = run_chain(block, branch, hidden, layer_kwargs, routed=routed)
    return branch.add(hidden, out) if branch.calls else out


def output_from_kept(block, branch: Branch, hidden, kept, layer_kwargs: dict):
    """h + tail(output(kept)): the branch output from the kept inputs of its output linear."""
    with torch.no_grad():
        x = block.get_submodule(branch.output)(kept)
        for call in branch.calls[len(branch.calls) - branch.tail:]:
            x = _call(block, call, x, layer_kwargs)
    return branch.add(hidden, x)


def input_of(block, branch: Branch, module_name: str, hidden, layer_kwargs: dict):
    """The input that `module_name` receives when the branch runs on `hidden`; the forward stops right there."""
    seen = {}

    def grab(module, args):
        seen["x"] = args[0]
        raise _Stop

    handle = block.get_submodule(module_name).register_forward_pre_hook(grab)
    try:
        run_chain(block, branch, hidden, layer_kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen["x"]


def routed_call(block, branch: Branch, path: str, hidden, layer_kwargs: dict, routed: dict | None = None) -> RoutedCall:
    """What the experts module `path` receives when the branch runs on `hidden`: the tokens' inputs and routing. The
    branch's other experts modules answer with their forward in `routed` (path -> forward), zeros where it has none."""
    seen = {}

    def grab(hidden_states, top_k_index, top_k_weights):
        seen["call"] = RoutedCall(hidden_states, top_k_index, top_k_weights)
        raise _Stop

    try:
        run_chain(block, branch, hidden, layer_kwargs, routed={**(routed or {}), path: grab})
    except _Stop:
        pass
    return seen["call"]


# -- deriving it --------------------------------------------------------------------------------------------
@dataclass
class _Trace:
    linear_calls: list      # (seq, name, input tensor, output tensor), routers left out
    child_calls: list       # (seq_start, seq_end, name, args, kwargs, output)
    expert_calls: list      # (seq, path, RoutedCall)
    output: torch.Tensor


def _trace(block, hidden, layer_kwargs, expert_forwards: dict) -> _Trace:
    """One call of the layer with hooks on its linears and children; each experts module runs the given forward
    (its own weights are never materialised here) and its call is recorded."""
    linear_calls, child_calls, expert_calls, handles, pending = [], [], [], [], {}
    counter = iter(range(10**9))
    skip = routed_experts.routers(block, routed_experts.expert_modules(block))

    def on_linear(name):
        def hook(module, args, out):
            linear_calls.append((next(counter), name, args[0], out))
        return hook

    def before_child(name):
        def hook(module, args, kwargs):
            pending[name] = (next(counter), args, kwargs)
        return hook

    def after_child(name):
        def hook(module, args, kwargs, out):
            start, a, k = pending.pop(name)
            child_calls.append((start, next(counter), name, a, k, _first(out)))
        return hook

    def recorded(path, forward):
        def run(hidden_states, top_k_index, top_k_weights):
            expert_calls.append((next(counter), path, RoutedCall(hidden_states, top_k_index, top_k_weights)))
            return forward(hidden_states, top_k_index, top_k_weights)
        return run

    try:
        for name, module in block.named_modules():
            if isinstance(module, torch.nn.Linear) and name not in skip:
                handles.append(module.register_forward_hook(on_linear(name)))
        for name, child in block.named_children():
            handles.append(child.register_forward_pre_hook(before_child(name), with_kwargs=True))
            handles.append(child.register_forward_hook(after_child(name), with_kwargs=True))
        forwards = {path: recorded(path, forward) for path, forward in expert_forwards.items()}
        with torch.no_grad(), substituted(block, forwards):
            out = _first(block(hidden, **layer_kwargs))
    finally:
        for handle in handles:
            handle.remove()
    child_calls.sort(key=lambda c: c[0])
    return _Trace(linear_calls, child_calls, expert_calls, out)


def _tensor_key(t: torch.Tensor):
    return (t.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _subgroups(block, trace: _Trace) -> list[tuple[int, tuple[str, ...]]]:
    """(seq of first use, names) per sub-group: linears reading the same input tensor, in order of first use."""
    experts = routed_experts.expert_modules(block)
    skip = routed_experts.routers(block, experts)
    names = [name for name, m in block.named_modules() if isinstance(m, torch.nn.Linear) and name not in skip]
    if not names and not experts:
        raise StructureError("cannot derive the block's structure: it holds no nn.Linear layer")
    runs = {}
    for _, name, _, _ in trace.linear_calls:
        runs[name] = runs.get(name, 0) + 1
    for name in names:
        if runs.get(name, 0) != 1:
            raise StructureError(f"cannot derive the block's structure: linear {name} runs {runs.get(name, 0)} "
                                 "times in one call of the layer (one Hessian per linear needs exactly one)")
    _check_weights_are_linear(block)
    groups: dict = {}
    for seq, name, x, _ in trace.linear_calls:
        groups.setdefault(_tensor_key(x), [seq, []])[1].append(name)
    return [(seq, tuple(group)) for seq, group in groups.values()]


def _check_weights_are_linear(block) -> None:
    """Every matrix of the block is a linear's weight, an experts module's, or a router's (kept as stored)."""
    experts = routed_experts.expert_modules(block)
    owners = list(experts) + sorted(routed_experts.routers(block, experts))
    linear_weights = {id(m.weight) for m in block.modules() if isinstance(m, torch.nn.Linear)}
    for name, p in block.named_parameters():
        owned = any(name.startswith(owner + ".") for owner in owners)
        if p.dim() >= 2 and id(p) not in linear_weights and not owned:
            raise StructureError(f"cannot derive the block's structure: parameter {name} ({p.dim()}-D) is not an "
                                 "nn.Linear weight, so it would stay unquantized")


def _call_of(name, args, kwargs, x, layer_kwargs) -> Call | None:
    """How the layer called a child on the chain tensor `x`, replayable with another layer's arguments."""
    if args and args[0] is x and len(args) == 1:
        where = 0
    elif not args and kwargs.get("hidden_states") is x:
        where = "hidden_states"
    else:
        return None
    passed, constants = [], []
    for key, value in kwargs.items():
        if key == where:
            continue
        if key in layer_kwargs and layer_kwargs[key] is value:
            passed.append((key, key))
        elif isinstance(value, torch.Tensor) or isinstance(value, (tuple, list, dict)):
            source = next((k for k, v in layer_kwargs.items() if v is value), None)
            if source is None:
                return None
            passed.append((key, source))
        else:
            constants.append((key, value))
    return Call(name, where, tuple(passed), tuple(constants))


def _input_tensor(args, kwargs):
    return args[0] if args else kwargs.get("hidden_states")


def _residual_scale(block, stream, x, after):
    """None when after = stream + x bit for bit; else the float attribute m of the layer with after = stream + x * m
    (a residual multiplier); False when neither holds."""
    if torch.equal(after, stream + x):
        return None
    floats = [v for v in vars(block).values() if isinstance(v, float)]
    return next((m for m in floats if torch.equal(after, stream + x * m)), False)


def _branches(block, trace: _Trace, hidden, layer_kwargs) -> list | None:
    """Residual branches as (calls, first seq, last seq, output linear, tail, scale), or None when the layer is not a
    sequence of h <- h + chain(h) (times a multiplier)."""
    outputs = {id(out): name for _, name, _, out in trace.linear_calls}
    calls, stream, i, found = trace.child_calls, hidden, 0, []
    while i < len(calls):
        chain, x, j = [], stream, i
        while j < len(calls) and _input_tensor(calls[j][3], calls[j][4]) is x:
            call = _call_of(calls[j][2], calls[j][3], calls[j][4], x, layer_kwargs)
            if call is None:
                return None
            chain.append(call)
            x = calls[j][5]
            j += 1
        if not chain or not isinstance(x, torch.Tensor):
            return None
        after = trace.output if j == len(calls) else _input_tensor(calls[j][3], calls[j][4])
        scale = _residual_scale(block, stream, x, after) if isinstance(after, torch.Tensor) else False
        if scale is False:
            return None
        output, tail = None, 0
        for k in range(j - 1, i - 1, -1):  # the call that returns a linear's output unchanged, and what follows it
            if id(calls[k][5]) in outputs:
                output, tail = outputs[id(calls[k][5])], j - 1 - k
                break
        found.append((tuple(chain), calls[i][0], calls[j - 1][1], output, tail, scale))
        stream, i = after, j
    return found


def derive(block, hidden: torch.Tensor, layer_kwargs: dict) -> BlockStructure:
    """The structure of `block`, from one call on `hidden` (a real calibration row) with the layer's arguments."""
    experts = routed_experts.expert_modules(block)
    trace = _trace(block, hidden, layer_kwargs, {path: routed_experts.zeros for path in experts})
    groups = _subgroups(block, trace)
    spans = _branches(block, trace, hidden, layer_kwargs)
    if spans:
        branches = []
        for calls, start, end, output, tail, scale in spans:
            inside = tuple(g for seq, g in groups if start < seq < end)
            paths = tuple(dict.fromkeys(path for seq, path, _ in trace.expert_calls if start < seq < end))
            if paths or (output is not None and (not inside or inside[-1] != (output,))):
                output, tail = None, 0  # an MoE branch's result is a sum, never one linear's output
            branches.append(Branch(calls, inside, output, tail, scale, paths))
        if (sum(len(b.subgroups) for b in branches) == len(groups)
                and sum(len(b.experts) for b in branches) == len(experts)
                and all(b.subgroups or b.experts for b in branches)):
            return BlockStructure(tuple(branches))
    return BlockStructure((Branch((), tuple(g for _, g in groups), experts=tuple(experts)),))


def group_sum(module, first: int, gate_up: torch.Tensor, down: torch.Tensor):
    """An experts forward that returns the routed sum of experts first .. first + G - 1, computed by
    `experts.add_routed` (the pipeline's arithmetic)."""
    def forward(hidden, index, weights):
        acc = torch.zeros_like(hidden)
        routed_experts.add_routed(acc, RoutedCall(hidden, index, weights), module, first, gate_up, down)
        return acc
    return forward


def verify(block, structure: BlockStructure, hidden: torch.Tensor, layer_kwargs: dict, where: str,
           expert_group: dict | None = None) -> None:
    """Runs the structure as the pipeline does (branch by branch, the output shortcut where there is one, experts
    substituted) and checks the layer's output and every sub-group's input against the layer's own forward, bit for
    bit. Experts: `expert_group` maps each experts module to one group's weights (first, gate_up, down); the layer's
    own forward then runs the module's own loop restricted to that group, the structure runs `add_routed` on it."""
    group = expert_group or {}
    modules = {path: block.get_submodule(path) for path in structure.experts}
    reference = {path: routed_experts.eager_group_forward(modules[path], *group[path]) for path in modules}
    ours = {path: group_sum(modules[path], *group[path]) for path in modules}
    trace = _trace(block, hidden, layer_kwargs, reference)
    inputs = {name: x for _, name, x, _ in trace.linear_calls}
    calls = {path: call for _, path, call in trace.expert_calls}
    h = hidden
    for branch in structure.branches:
        for name in [g[0] for g in branch.subgroups]:
            if not torch.equal(input_of(block, branch, name, h, layer_kwargs), inputs[name]):
                raise StructureError(f"the derived structure of {where} does not reproduce the decoder layer: the "
                                     f"input of {name} differs; refusing to quantize with it")
        for path in branch.experts:
            call = routed_call(block, branch, path, h, layer_kwargs)
            if not all(torch.equal(a, b) for a, b in zip(vars(call).values(), vars(calls[path]).values())):
                raise StructureError(f"the derived structure of {where} does not reproduce the decoder layer: the "
                                     f"inputs or routing of {path} differ; refusing to quantize with it")
        if branch.output is not None:
            kept = input_of(block, branch, branch.output, h, layer_kwargs)
            h = output_from_kept(block, branch, h, kept, layer_kwargs)
        else:
            h = branch_output(block, branch, h, layer_kwargs, routed=ours)
    if not torch.equal(h, trace.output):
        diff = (h.float() - trace.output.float()).abs().max().item()
        raise StructureError(f"the derived structure of {where} does not reproduce the decoder layer (max abs "
                             f"difference {diff:.3g}); refusing to quantize with it")
