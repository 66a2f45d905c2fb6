"""Quantizing a block's routed experts, one group of experts at a time.

Why it exists: a mixture-of-experts block holds up to 256 experts (DeepSeek-V3: 22.5 GB in bf16), more than a
24 GB card. The experts of a group are read from the shards, solved and folded into the block's output, then
dropped; memory holds one group (its size is the planner's) plus the block's other weights. Every expert is
calibrated: by default its statistics come from every calibration token, while the block's output uses the model's
real routing (what llm-compressor's `moe_calibrate_all_experts` does); `--expert-calibration routed` uses only the
tokens routed to each expert.

Per experts module (pipeline stream "acts"):
1. one pass over the branch's inputs: the experts' inputs (a work file), their routing (in memory, tokens × top-k),
   each expert's routed token count, and the gate/up Hessian of all tokens (shared by every expert);
2. per group: gate/up solved (all tokens: one column loop over the stacked rows of the group's experts, one U;
   routed: each expert with its own Hessian); one pass for the down projections' Hessians through the
   quantized gate/up; each down solved; one pass adding the group's routed output (quantized weights, real routing)
   into the routed sum (a work file);
3. the pipeline then runs the branch with the routed sum standing in for the experts module.

What must stay true:
- every expert is quantized, none is left in full precision or rounded to nearest: in routed mode an expert that
  no calibration token reached takes the all-token statistics, and the log says so;
- an expert that cannot be factorised is an error naming it;
- groups are added to the routed sum in ascending expert order (the eager module's bits: `experts.py`);
- the routing, the token counts, the Hessians' token counts and the damping of every expert are logged.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from .activations import ActivationReader
from .experts import RoutedCall, add_routed, expert_inputs, tokens_of
from .hessian import FactorizationError, HessianAccumulator
from .planner import EXPERT_WINDOW_TOKENS
from .solver import prepare_hessian, quantize_prepared

CALIBRATION_MODES = ("all", "routed")


class RoutedSum:
    """The experts' routed output for every calibration token, [tokens, hidden] in the compute dtype, in a work file:
    each group adds to it a batch of rows at a time (pread, add, pwrite); the page cache holds it while RAM allows."""

    def __init__(self, path: Path, tokens: int, hidden: int, dtype: torch.dtype):
        self.path, self.hidden, self.dtype = Path(path), hidden, dtype
        self.row_bytes = hidden * torch.empty((), dtype=dtype).element_size()
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.posix_fallocate(self.fd, 0, tokens * self.row_bytes)  # zeros; a full disk fails here, up front
        except OSError:
            self.close()
            raise

    def read(self, start: int, count: int) -> torch.Tensor:
        buf = bytearray(count * self.row_bytes)
        view, done = memoryview(buf), 0
        while done < len(buf):
            done += os.preadv(self.fd, [view[done:]], start * self.row_bytes + done)
        return torch.frombuffer(buf, dtype=self.dtype).view(count, self.hidden)

    def write(self, start: int, rows: torch.Tensor) -> None:
        data = rows.detach().to("cpu").contiguous()
        view = memoryview(data.view(torch.uint8).numpy()).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], start * self.row_bytes + done)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.path.unlink(missing_ok=True)


@dataclass
class ExpertReport:
    """One expert's line in the run log."""
    module: str
    routed_tokens: int
    hessian_tokens: int
    damp: float
    loss: float
    fallback: str | None = None


class ExpertQuantizer:
    """The experts module `path` of the branch being quantized, for one block (see the module docstring)."""

    def __init__(self, run, runner, stream, branch, path: str, group: int | None, mode: str):
        self.run, self.runner, self.stream, self.branch, self.path = run, runner, stream, branch, path
        self.block, self.index = stream.block, stream.index
        self.module = self.block.get_submodule(path)
        self.count = self.module.num_experts
        self.group = min(group or self.count, self.count)
        self.mode = mode
        self.hidden = run.config.hidden_size
        self.offsets = run.row_starts
        self.seconds = defaultdict(float)  # per stage, for the log: where an MoE block's time goes

    @contextlib.contextmanager
    def _timed(self, stage: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - started

    # -- 1. inputs and routing ---------------------------------------------------------------------
    def _collect_inputs(self):
        writer = self.run.work_writer(f"experts-{self.index:05d}-in.npy", self.hidden, durable=False)
        hessian = HessianAccumulator(self.hidden, self.run.device)
        index, weights = [], []
        try:
            for _, batch in self.run.batches(self.stream.hidden):
                call = self.runner.routed_call(self.block, self.index, self.branch, self.path, batch)
                for row in call.hidden.view(batch.shape[0], batch.shape[1], -1):
                    writer.write(row)
                index.append(call.index.cpu())
                weights.append(call.weights.cpu())
                hessian.add_batch(call.hidden.view(batch.shape[0], batch.shape[1], -1))  # one unit per row
            writer.finish()
        except BaseException:
            writer.abandon()
            raise
        self.inputs = ActivationReader(writer.path, self.run.lengths, self.run.dtype)
        self.route_index, self.route_weights = torch.cat(index), torch.cat(weights)
        counts = torch.bincount(self.route_index.flatten(), minlength=self.count)[: self.count]
        self.routed = self.run.ranks.total(counts)  # every rank's tokens (one process: its own)
        return hessian

    def _calls(self):
        """The experts' inputs and routing again, in fixed windows of whole rows (EXPERT_WINDOW_TOKENS): every sum
        over an expert's tokens (its Hessian, its routed output) is grouped by the windows, never by the forward batch."""
        for i, batch in self.run.batches(self.inputs, tokens=EXPERT_WINDOW_TOKENS):
            t0 = self.offsets[i]
            x = batch.reshape(-1, self.hidden)
            t1 = t0 + x.shape[0]
            yield t0, RoutedCall(x, self.route_index[t0:t1].to(x.device), self.route_weights[t0:t1].to(x.device))

    # -- 2. the groups -----------------------------------------------------------------------------
    def quantize(self, packed: dict, losses: list) -> RoutedSum:
        """Quantizes every expert (packed tensors into `packed`, their losses into `losses`) and returns the routed
        sum of the quantized experts for every calibration token."""
        with self._timed("inputs and routing"):
            shared = self._collect_inputs()
        tokens = self.offsets[-1]
        with self._timed("gate/up factorisation"):
            self.all_tokens = self._prepare(shared, f"{self.path} (all experts' inputs)")
        sums = RoutedSum(self.run.work / self.run.ranks.file_name(f"experts-{self.index:05d}-sum.bin"), tokens,
                         self.hidden, self.run.dtype)
        reports = []
        try:
            for first in range(0, self.count, self.group):
                experts = range(first, min(first + self.group, self.count))
                reports += self._quantize_group(experts, packed, losses, sums)
        except BaseException:
            sums.close()
            raise
        finally:
            self.inputs.close()
            self.inputs.path.unlink(missing_ok=True)
        self._summarize(reports)
        return sums

    def _quantize_group(self, experts: range, packed: dict, losses: list, sums: RoutedSum) -> list[ExpertReport]:
        started = time.time()
        with self._timed("gate/up solve"):
            gate_up_q, gate_up_results = self._solve_gate_up(experts)
        down_q, down_results = self._solve_down(experts, gate_up_q)
        with self._timed("routed output"):
            for t0, call in self._calls():
                acc = sums.read(t0, call.hidden.shape[0]).to(self.run.device)
                add_routed(acc, call, self.module, experts.start, gate_up_q, down_q)
                sums.write(t0, acc)
        with self._timed("packing"):
            return [self._pack(expert, gate_up_results[local], down_results[local], packed, losses,
                               time.time() - started) for local, expert in enumerate(experts)]

    def _hessian_tokens(self, expert: int, token_count: int) -> tuple[bool, str | None]:
        """Whether the expert's statistics come from its routed tokens, and why not where they don't."""
        if self.mode == "all":
            return False, None
        if token_count == 0:
            return False, "no calibration token was routed to it: statistics from all tokens"
        return True, None

    def _solve_gate_up(self, experts: range):
        """The group's [gate; up] weights read and solved: [G, 2I, H] quantized (dequantized values, compute dtype)
        and each expert's solve results. The experts on the all-token U are solved as one matrix, laid out straight
        into the column loop's [H, rows] layout, and the weights as read are dropped before the loop (at 128 experts
        of 768 x 2048 each copy is 1.5 GiB)."""
        gate_up = self.runner.expert_weights(self.index, self.path, experts, "gate_up_proj")
        count, rows, width = gate_up.shape
        routed = [self._hessian_tokens(e, int(self.routed[e]))[0] for e in experts]
        shared = [local for local, own in enumerate(routed) if not own]
        own = {local: gate_up[local].clone() for local, flag in enumerate(routed) if flag}
        columns = torch.empty((width, len(shared) * rows), dtype=torch.float32, device=gate_up.device)
        for k, local in enumerate(shared):
            columns[:, k * rows:(k + 1) * rows] = gate_up[local].T
        del gate_up
        results = [None] * count
        if shared:  # one column loop over the stacked rows of every expert that uses the all-token U
            res = self._solve(columns.T, self.all_tokens, f"{self.path} experts {experts.start}..{experts.stop - 1}")
            for local, part in zip(shared, res.split([rows] * len(shared))):
                results[local] = part
        del columns
        if own:
            hessians = self._routed_hessians(experts, list(own), width, lambda call, local, token: call.hidden[token])
            for (local, weight), hessian in zip(own.items(), hessians):
                name = self._name(experts.start + local)
                results[local] = self._solve(weight, self._prepare(hessian, name), name)
        return self._dequantized(results, (count, rows, width)), results

    def _dequantized(self, results: list, shape: tuple) -> torch.Tensor:
        """The experts' quantized weights, [G, out, in] in the compute dtype, filled an expert at a time."""
        out = torch.empty(shape, dtype=self.run.dtype, device=self.run.device)
        for local, result in enumerate(results):
            out[local] = result.dequantized
        return out

    def _solve_down(self, experts: range, gate_up_q: torch.Tensor):
        down = self.runner.expert_weights(self.index, self.path, experts, "down_proj")
        width = down.shape[2]
        routed = [self._hessian_tokens(e, int(self.routed[e]))[0] for e in experts]

        def inputs(call, local, token):
            return expert_inputs(self.module, call, experts.start, gate_up_q, experts.start + local,
                                 token if routed[local] else None)

        with self._timed("down Hessians"):
            hessians = self._routed_hessians(experts, range(len(experts)), width, inputs, all_tokens=not any(routed))
        results = []
        with self._timed("down solves"):
            for local, hessian in enumerate(hessians):
                name = self._name(experts.start + local)
                results.append(self._solve(down[local], self._prepare(hessian, name), name))
        return self._dequantized(results, tuple(down.shape)), results

    def _routed_hessians(self, experts: range, locals_: list[int] | range, width: int, inputs,
                         all_tokens: bool = False) -> list:
        """One pass over the inputs: a Hessian per listed expert of `inputs(call, local, routed tokens)`."""
        accs = {local: HessianAccumulator(width, self.run.device) for local in locals_}
        for _, call in self._calls():
            for local, acc in accs.items():
                token = None if all_tokens else tokens_of(call.index, experts.start + local)[1]
                acc.add_batch(inputs(call, local, token))
        return [accs[local] for local in locals_]

    def _prepare(self, accumulator: HessianAccumulator, name: str):
        """Factorised on rank 0 from every rank's tokens and shared (one process: here), `distributed.py`."""
        self.run.ranks.sum_on_leader(accumulator)
        return self.run.ranks.shared_hessian(lambda: self._factorised(accumulator, name), self.run.device)

    def _factorised(self, accumulator: HessianAccumulator, name: str):
        o = self.run.options
        try:
            hessian, _ = accumulator.scaled()
            return prepare_hessian(hessian, damp=o.damp, desc_act=o.desc_act, overwrite=True)
        except (FactorizationError, ValueError) as exc:
            raise FactorizationError(f"{name}: {exc}") from None

    def _solve(self, weight: torch.Tensor, prepared, name: str):
        """`weight` [out, in]; the column loop works in its storage when weight.T is a contiguous fp32 tensor."""
        o = self.run.options
        return self.run.ranks.solve_rows(weight, lambda rows: quantize_prepared(  # each rank a share of the rows
            rows, prepared, bits=o.bits, group_size=o.group_size, sym=o.sym, method=o.method, beta=self.run.beta,
            overwrite=True))

    # -- output ------------------------------------------------------------------------------------
    def _name(self, expert: int) -> str:
        return f"{self.run.arch.block_prefix(self.index)}{self.path}.{expert}"

    def _pack(self, expert: int, gate_up, down, packed: dict, losses: list, seconds: float) -> ExpertReport:
        fmt = self.run.options.checkpoint_format
        gate_up_names, down_names = self.runner.expert_names(self.index, self.path, expert)
        pieces = gate_up.split([gate_up.codes.shape[1] // len(gate_up_names)] * len(gate_up_names))
        for name, part in list(zip(gate_up_names, pieces)) + list(zip(down_names, [down])):
            packed.update({f"{name}.{k}": v.cpu() for k, v in part.pack(fmt).items()})
        own, fallback = self._hessian_tokens(expert, int(self.routed[expert]))
        report = ExpertReport(self._name(expert), int(self.routed[expert]),
                              int(self.routed[expert]) if own else self.run.fingerprint["calibration"]["tokens"],
                              down.damp,
                              gate_up.loss + down.loss, fallback)
        losses.append(report.loss)
        self.run.emit({"event": "expert", **vars(report), "damp_gate_up": gate_up.damp, "seconds": round(seconds, 3)})
        return report

    def _summarize(self, reports: list[ExpertReport]) -> None:
        """One line naming the least-covered experts (fewest routed tokens)."""
        least = sorted(reports, key=lambda r: (r.routed_tokens, r.module))[:3]
        shown = ", ".join(f"{r.module.rsplit('.', 1)[-1]} ({r.routed_tokens})" for r in least)
        fallbacks = sum(r.fallback is not None for r in reports)
        self.run.emit({"event": "experts", "module": self._name(0).rsplit(".", 1)[0], "experts": len(reports),
                       "calibration": self.mode, "group": self.group, "least_routed": shown,
                       "all_token_fallbacks": fallbacks,
                       "seconds": {stage: round(t, 3) for stage, t in self.seconds.items()}})
        self.run.say(f"  {self._name(0).rsplit('.', 1)[0]}: {len(reports)} experts quantized ({self.mode} tokens, "
                     f"groups of {self.group}); least routed: {shown}")
