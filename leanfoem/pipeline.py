"""`leanfoem quantize`: the block-streaming driver (DESIGN §2), resumable (DESIGN §6).

Why it exists: it ties the pieces together in the one order that keeps memory flat in depth and makes
a killed run resumable: inputs of block i (a file) → Hessians per sub-group → solver → quantized block
→ inputs of block i+1 (a file) → packed shard of block i → journal entry. Host memory holds one block,
one sub-group's Hessians and one batch of activations; device memory the same, without the store. A block's routed
experts are never all in memory: `expert_quantizer.py` reads, solves and folds them in a group at a time, and the
branch that holds them runs with their routed sum standing in for them.

What must stay true:
- a block reads its inputs only from the activation file the journal names (or will name, once the previous
  block's commit is done: the same bytes, read under the file's tmp name meanwhile), so an interrupted and an
  uninterrupted run compute from the same bits;
- the journal entry of block i is written only after its shard and the inputs of block i+1 are durable; that
  commit runs on a background thread (`background_io.Worker`, one commit in flight) while block i+1 computes from
  the same file in the page cache; an error there ends the run as it would have on this thread, and a stop (a
  signal, an error) waits for the commit in flight, so no finished block is lost;
- nothing in the input model directory is written; `config.json` in the output is written last;
- every batching, grouping or dtype choice that changes the bits is part of the fingerprint.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import itertools
import json
import logging
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer

from . import __version__, beta_choice
from .activations import ActivationReader, ActivationWriter, file_sha256
from .architectures import architecture_for, check_terms_supported
from .background_io import Worker
from .blocks import BlockRunner, check_finite
from .calibration import CalibrationError, load_calibration, rows_digest
from .checkpoint_reader import CheckpointError, CheckpointReader
from .checkpoint_writer import (copy_side_files, quantization_config, shard_name, shard_tensor_names,
                                write_configs, write_index, write_shard)
from .distributed import Ranks
from .dtype_choice import choose as choose_dtype
from .expert_quantizer import CALIBRATION_MODES, ExpertQuantizer
from .experts import answer_with
from .hessian import HessianAccumulator
from .journal import JOURNAL_NAME, WORK_DIR_NAME, Journal, fingerprint_digest
from .models import resolve_model_dir
from .planner import budgets_for, check_fits, load_config, plan
from .solver import DEFAULT_DAMP, PreparedHessian, method_terms, prepare_hessian, quantize_prepared, quantize_weight
from .source_formats import without_stored_quantization

log = logging.getLogger(__name__)
LOG_NAME = "quantize_log.jsonl"


class OutputError(ValueError):
    """The output directory cannot be used for this run."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the run stopped at a safe point."""


class StopSignal:
    requested = False


@dataclass
class QuantizeOptions:
    model: str
    out: str
    method: str = "foem"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    alpha: float = 0.0
    beta: float | str = 0.2           # or "auto": chosen per layer (beta_choice.py)
    damp: float = DEFAULT_DAMP
    calib: str | None = None          # None: the calibration text bundled with leanfoem
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"               # forward dtype: auto, float32, bfloat16 (resolved into the fingerprint)
    checkpoint_format: str = "gptq"
    batch_tokens: int | None = None   # tokens per forward batch (None: the planner's choice); changes no bit
    expert_calibration: str = "all"   # experts' statistics from all tokens, or from the tokens routed to each
    expert_group: int | None = None   # experts solved together (None: the planner's choice); changes no bit
    restart: bool = False
    keep_work: bool = False
    quiet: bool = False

    def settings(self) -> dict:
        """The options that determine the output bits (device and dtype: as resolved, by the fingerprint)."""
        skip = {"model", "out", "calib", "restart", "keep_work", "quiet", "device", "dtype", "batch_tokens",
                "expert_group"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available")
    return device


def compute_dtype(device: torch.device, config) -> torch.dtype:
    """The forward dtype before `--dtype auto`'s detection (`dtype_choice`): fp32 on the CPU, the checkpoint's half
    type on an accelerator. `leanfoem eval` computes in it."""
    if device.type == "cpu":
        return torch.float32
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return torch.bfloat16 if stored in (torch.bfloat16, "bfloat16") else torch.float16


def default_calibration() -> str:
    from importlib.resources import files
    return str(files("leanfoem") / "demo" / "calibration.txt")


class QuantizeRun:
    def __init__(self, options: QuantizeOptions, ranks: Ranks | None = None):
        self.options = options
        self.ranks = ranks or Ranks()  # one process; under torchrun, this rank of the job (`distributed.py`)
        if not self.ranks.leader:
            options.quiet = True  # rank 0 alone speaks (and writes the log)
        self.model_dir = resolve_model_dir(options.model)
        self.out = Path(options.out).expanduser()
        _check_not_input(self.model_dir, self.out)
        self.reader = CheckpointReader(self.model_dir)
        config = _load_input("config.json", self.model_dir, AutoConfig.from_pretrained)
        self.config = without_stored_quantization(config)  # fp8 is read dequantized, other stored quantization refused
        self.arch = architecture_for(self.config)
        self.device = self.ranks.device(resolve_device(options.device))
        self.dtype_choice = self.ranks.leader_value(  # a probe may time it: rank 0's choice is everyone's
            choose_dtype, options.dtype, self.device, compute_dtype(self.device, self.config))
        self.dtype = self.dtype_choice.dtype
        limit = getattr(self.config, "max_position_embeddings", None) or options.seqlen
        self.seqlen = min(options.seqlen, limit)
        self.calib_source = options.calib or default_calibration()
        tokenizer = _LazyTokenizer(lambda: _load_input("tokenizer", self.model_dir, AutoTokenizer.from_pretrained))
        self.rows = load_calibration(self.calib_source, tokenizer, nsamples=options.nsamples,
                                     seqlen=self.seqlen, seed=options.seed)
        check_token_ids(self.rows, self.config.vocab_size)
        self.lengths = [r.numel() for r in self.rows]  # every row's (the fingerprint); `_share_rows`: a rank's
        del tokenizer
        release_freed_memory()  # tokenizing a long text leaves ~100 MB of freed encodings in the allocator
        self.beta_auto = options.beta == beta_choice.AUTO
        if self.beta_auto:
            beta_choice.check_applies(options.method, len(self.rows))
        self.alpha, self.beta = method_terms(options.method, options.alpha, 0.0 if self.beta_auto else options.beta,
                                             hessian=True, cross=True)
        self.gptaq = self.alpha > 0
        # --beta auto: rows from here on are held out of the candidates' Hessian (beta_choice.py)
        self.held_out_from = len(self.rows) - beta_choice.held_out_rows(len(self.rows)) if self.beta_auto else None
        if options.expert_calibration not in CALIBRATION_MODES:
            raise ValueError(f"--expert-calibration {options.expert_calibration!r}: choose one of "
                             f"{', '.join(CALIBRATION_MODES)}")
        check_terms_supported(self.config, self.alpha, self.beta_auto)
        self.plan = self.ranks.leader_value(self._plan)
        check_fits(self.plan)  # refuse up front, with the numbers, rather than run out of memory at block 40
        self.batch_tokens = self.plan.batch_tokens
        self.expert_group = self.plan.expert_group  # None for a dense model
        self.ranks.check_supported(beta_auto=self.beta_auto)
        self.fingerprint = self._fingerprint()
        self.ranks.check_same(self.fingerprint)
        self._share_rows()
        self.work = self.out / WORK_DIR_NAME
        self._commits = Worker("commit", 1)  # block i's commit runs while block i+1 computes (`_commit_block`)
        self._handover: list[tuple[str, ActivationReader]] | None = None  # block i+1's inputs, from block i

    def _share_rows(self) -> None:
        """This rank's calibration rows (all of them with one process), their lengths and their token offsets (the
        last: all tokens; for the routed sums); the fingerprint holds every row."""
        self.rows = self.ranks.rows(self.rows)
        self.lengths = [r.numel() for r in self.rows]
        self.row_starts = [0, *itertools.accumulate(self.lengths)]

    def _plan(self):
        """The planner's budget for this machine (its card and RAM); it also picks the forward batch."""
        o = self.options
        kind, gpu, host = budgets_for(str(self.device), None, None)
        calib = Path(self.calib_source)
        stored = load_config(str(self.model_dir))  # with an FP8 source's quantization_config: the planner counts fp8
        return plan(stored, device=kind, gpu_memory=gpu, host_memory=host, nsamples=len(self.rows),
                    seqlen=self.seqlen, bits=o.bits, group_size=o.group_size, method=o.method, alpha=self.alpha,
                    beta=o.beta if self.beta_auto else self.beta, batch_tokens=o.batch_tokens,
                    compute_dtype=self.dtype_choice.name,
                    calib_bytes=calib.stat().st_size if calib.is_file() else None,
                    expert_calibration=o.expert_calibration, expert_group=o.expert_group, nproc=self.ranks.world)

    def _fingerprint(self) -> dict:
        shards = {p.name: {"bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
                  for p in self.reader.shard_files()}
        return {
            "model": {"shards": shards, "config_sha256": file_sha256(self.model_dir / "config.json")},
            "calibration": {"rows": len(self.rows), "tokens": sum(self.lengths), "sha256": rows_digest(self.rows)},
            # not the forward batch nor the expert group: they choose how much work is in flight, never the
            # arithmetic (statistics are summed per row, experts' in fixed windows), so a resume may change them
            "settings": dict(self.options.settings(), seqlen=self.seqlen, **self._beta_choice_settings()),
            "versions": {"leanfoem": __version__, "torch": torch.__version__.split("+")[0]},
            # the CPU's thread count splits some library sums (a last bit of H can flip a code), so it is fixed too
            "compute": {"device": self.device.type, "dtype": self.dtype_choice.name, "threads": torch.get_num_threads()},
            **self.ranks.fingerprint(),  # the world size, under torchrun (the rows are split by it)
        }

    def _beta_choice_settings(self) -> dict:
        if not self.beta_auto:
            return {}
        return {"beta_grid": list(beta_choice.GRID), "held_out_rows": len(self.rows) - self.held_out_from}

    # -- the run ------------------------------------------------------------------------------------
    def run(self) -> Path:
        digest = fingerprint_digest(self.fingerprint)
        if self.ranks.leader_value(self._finished_already, digest):
            return self.out
        self.ranks.leader_first(self._prepare_output)
        journal = self.ranks.open_journal(self.work, self.fingerprint)
        runner = BlockRunner(self.config, self.reader, self.arch, self.device, self.dtype)
        total_shards = runner.num_blocks + 1
        if journal.state["inputs"] is None:
            self._write_first_inputs(runner, journal)
        runner.release_embedding()
        start = journal.blocks_done
        calibration = self.fingerprint["calibration"]  # every row (a rank holds its share)
        self.emit({"event": "start", "blocks": runner.num_blocks, "resume_at": start, "rows": calibration["rows"],
                    "tokens": calibration["tokens"], "device": str(self.device), "dtype": self.dtype_choice.name,
                    "dtype_reason": self.dtype_choice.reason, "threads": self.fingerprint["compute"]["threads"],
                    "batch_tokens": self.batch_tokens,
                    "expert_group": self.expert_group})
        self._announce_layers_left_out(runner.num_blocks)
        bar = tqdm(total=runner.num_blocks, initial=start, desc="blocks", unit="block", disable=self.options.quiet)
        try:
            for index in range(start, runner.num_blocks):
                entry = self._quantize_block(runner, journal, index, total_shards, verify=index == start)
                bar.update(1)
                if not self.options.quiet:
                    bar.write(f"block {index + 1}/{runner.num_blocks}: {entry['seconds']:.1f} s, "
                              f"loss {entry['loss']:.4g}, RSS {entry['rss_gib']:.2f} GiB "
                              f"(peak {entry['peak_rss_gib']:.2f})")
        finally:
            bar.close()
            for _, reader in self._handover or ():
                reader.close()
            self._commits.drain()  # the last block's commit; after an error or a signal too: finished work is kept
        self.ranks.leader_value(self._finish, journal, total_shards, digest)
        self.ranks.finish_run(self.work, self.options.keep_work)
        return self.out

    def _announce_layers_left_out(self, num_blocks: int) -> None:
        """Tensors stored under the blocks' prefix past the model's last block (DeepSeek-V3/R1's multi-token-
        prediction layer: `model.layers.61.*` with 61 layers) belong to no module transformers builds: they are neither
        quantized nor copied (the output is the model transformers loads). Said on screen and in the log, never
        silently: a server that wants them for speculative decoding reads them from the source checkpoint."""
        left = {}
        for name in self.reader.names(self.arch.layers + "."):
            layer = name[len(self.arch.layers) + 1:].split(".", 1)[0]
            if layer.isdigit() and int(layer) >= num_blocks:
                left.setdefault(int(layer), []).append(name)
        for layer, names in sorted(left.items()):
            self.emit({"event": "left_out", "layer": layer, "tensors": len(names),
                       "reason": f"past the model's {num_blocks} decoder layers (not part of the transformers model)"})
            self.say(f"note: {self.arch.layers}.{layer} ({len(names)} tensors) lies past the model's {num_blocks} "
                     "decoder layers (a multi-token-prediction layer?): not part of the transformers model, left out")

    def _finished_already(self, digest: str) -> bool:
        config = self.out / "config.json"
        if not config.is_file():
            return False
        try:
            meta = json.loads(config.read_text())["quantization_config"]["meta"]
        except (ValueError, KeyError, TypeError):
            meta = {}
        if meta.get("fingerprint") != digest:
            raise OutputError(f"{self.out} already holds a finished checkpoint of another job; "
                              "choose another --out (nothing was changed)")
        if not self.options.keep_work:  # left over when a run was killed after writing config.json
            shutil.rmtree(self.work, ignore_errors=True)
        self.say(f"{self.out} is already complete for these inputs and settings")
        return True

    def _prepare_output(self) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise OutputError(f"--out {self.out} exists and is not a directory")
        if self.out.is_dir() and not self.work.exists():
            foreign = [p.name for p in self.out.iterdir()]
            if foreign:
                raise OutputError(f"output directory {self.out} is not empty and holds no leanfoem run "
                                  f"(found {foreign[0]}); choose an empty or new directory")
        if self.options.restart and self.work.is_dir() and self.ranks.leader:
            self._discard_unfinished_run()
        try:
            self.work.mkdir(parents=True, exist_ok=True)
            probe = self.work / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise OutputError(f"cannot write to output directory {self.out}: {exc.strerror or exc}") from None

    def _discard_unfinished_run(self) -> None:
        """--restart. The journal goes first (from then on nothing of the old run counts), then the work files and
        the old run's shards; the work directory itself stays, so that an output interrupted here is still
        recognised as a leanfoem run (removing it first made the next run refuse the directory as foreign)."""
        (self.work / JOURNAL_NAME).unlink(missing_ok=True)
        for path in self.work.iterdir():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        for path in self.out.glob("model-*-of-*.safetensors*"):
            path.unlink()

    def _write_first_inputs(self, runner: BlockRunner, journal: Journal) -> None:
        name = "acts-00000.npy"
        writer = self.work_writer(name, self.config.hidden_size, durable=True)
        try:
            for ids in self.rows:
                writer.write(runner.block_inputs(ids)[0])
            digest = writer.finish()
        except BaseException:
            writer.abandon()
            raise
        inputs = {"file": writer.path.name, "sha256": digest}
        journal.record_inputs(inputs, inputs if self.gptaq else None)

    def _quantize_block(self, runner: BlockRunner, journal: Journal, index: int, total_shards: int,
                        verify: bool) -> dict:
        started = time.time()
        source = runner.source_tensors(index, experts=False)  # the experts are read a group at a time
        block = runner.load(index, source)
        layout = runner.layout(index)
        inputs, self._handover = self._handover or self._journal_inputs(journal, verify), None
        structure = runner.checked_structure(index, block, inputs[0][1].row(0), self.expert_group)  # before changes
        streams = [_Stream("acts", block, index, inputs[0][1])]
        if self.gptaq:  # the unquantized model's inputs of the same layers, for the cross term
            streams.append(_Stream("native", copy.deepcopy(block), index, inputs[1][1]))
        prefix = self.arch.block_prefix(index)
        for name in structure.linear_names:  # their packed form replaces them; keep only what is copied as is
            source.pop(prefix + layout.stored_module(name) + ".weight", None)
        packed, losses = {}, []
        widest = max(block.get_submodule(name).in_features for name in structure.linear_names)
        for number, branch in enumerate(structure.branches):
            # The branch of the block's widest layer (the MLP) holds its memory peak: its H and fp64 factor and
            # its stacked weights are the block's largest. Before each of its steps (Hessian pass, factorisation,
            # solve), what the previous step freed is handed back, so that it does not lie under the next step's
            # large buffers (in 16-layer runs at hidden 2048, 160-320 MiB of it had lain under the gate/up
            # solve). Only there: each hand-back costs page faults when the heap grows again.
            peak_branch = max((block.get_submodule(name).in_features for name in branch.linears), default=0) == widest
            for group in branch.subgroups:
                prepared = None
                if self.options.method != "rtn":  # round-to-nearest needs no statistics
                    prepared = self._prepare_group(runner, streams, branch, group, hand_back=peak_branch)
                if peak_branch:
                    release_freed_memory()
                packed.update(self._quantize_group(block, prefix, layout, group, prepared, losses))
                del prepared
            sums = {path: ExpertQuantizer(self, runner, streams[0], branch, path, self.expert_group,
                                          self.options.expert_calibration).quantize(packed, losses)
                    for path in branch.experts}
            last = number == len(structure.branches) - 1
            for stream in streams:
                self._advance(runner, stream, branch, f"{stream.kind}-{index + 1:05d}.npy" if last
                              else f"{stream.kind}-branch{number}.npy", durable=last, sums=sums)
                runner.release(stream.block, branch.linears)
            for routed_sum in sums.values():
                routed_sum.close()
        tensors = {k: v for k, v in source.items() if k not in packed}
        tensors.update(packed)
        entry = {"index": index, "shard": shard_name(index + 1, total_shards),
                 "seconds": round(time.time() - started, 3), "loss": sum(losses),
                 "rss_gib": psutil.Process().memory_info().rss / 2**30, "peak_rss_gib": peak_rss_gib()}
        writers = [stream.finished for stream in streams]
        self._handover = [(writer.path.name, stream.hidden) for writer, stream in zip(writers, streams)]
        self._commits.submit(self._commit_block, journal, entry, tensors, writers, [name for name, _ in inputs])
        runner.unload(index)
        release_freed_memory()
        return entry

    def _commit_block(self, journal: Journal, entry: dict, tensors: dict, writers: list[ActivationWriter],
                      previous: list[str]) -> None:
        """Block done, on the commit thread while the next block computes: the next block's inputs made durable and
        the block's shard written, then (only then) its journal entry, then the block's own inputs dropped."""
        outputs = [{"file": writer.path.name, "sha256": writer.commit()} for writer in writers] + [None]
        if self.ranks.leader:
            entry = dict(entry, sha256=write_shard(self.out / entry["shard"], tensors))
        journal.record_block(entry, outputs[0], outputs[1])
        for name in set(previous) - {o["file"] for o in outputs if o}:
            (self.work / name).unlink(missing_ok=True)
        self.emit(dict(entry, event="block"))

    def _prepare_group(self, runner, streams, branch, group, hand_back: bool):
        """The sub-group's Hessian pass and fp64 factorisation (with --beta auto: `beta_choice.HeldOutHessians`);
        with `hand_back`, freed memory is handed back before each (the fp64 buffer is a fresh mapping that the
        heap's free chunks cannot serve)."""
        block = streams[0].block
        if hand_back:
            release_freed_memory()
        keep = group == (branch.output,) and self._keeps_output_input(block, branch)
        accumulators = self._hessian(runner, streams, branch, group[0], keep)
        for stream in streams if keep else ():  # the body does not run again (`_advance` uses the kept inputs)
            runner.release(stream.block, [name for name in branch.linears if name != branch.output])
        if hand_back:
            release_freed_memory()
        o = self.options
        if self.beta_auto:  # one process only (`distributed.check_supported`)
            return beta_choice.split_statistics(*accumulators, damp=o.damp, desc_act=o.desc_act, alpha=self.alpha)
        self.ranks.sum_on_leader(accumulators[0])  # every rank's partial sums, on rank 0 (one process: nothing to do)
        return self.ranks.shared_hessian(lambda: self._factorised(accumulators[0]), self.device)

    def _factorised(self, acc: HessianAccumulator) -> PreparedHessian:
        o = self.options
        hessian, cross = acc.scaled()
        return prepare_hessian(hessian, damp=o.damp, desc_act=o.desc_act, alpha=self.alpha, cross=cross,
                               overwrite=True)

    def _keeps_output_input(self, block, branch) -> bool:
        """Whether the pass over the branch's output linear keeps its inputs in a work file, so the branch output
        is one matmul (and the branch's later calls: post norms) instead of a forward; only where the derived
        structure found such an output linear (`structure.Branch.output`). Always when that file is no larger than an activation store (o_proj);
        a down_proj's inputs (3.5× wider) when the planner says so: on the CPU, where the file stays in RAM and
        the gate/up forward it saves is the dearer side (SmolLM2-135M: ~15% of the run); not on CUDA."""
        output = branch.output and block.get_submodule(branch.output)
        return bool(output) and (output.in_features <= self.config.hidden_size or self.plan.keeps_mlp_inputs)

    def _journal_inputs(self, journal: Journal, verify: bool) -> list[tuple[str, ActivationReader]]:
        """(file, reader) of each stream's inputs as the journal names them (the first block of a run)."""
        entries = [journal.state["inputs"]] + ([journal.state["native_inputs"]] if self.gptaq else [])
        return [(entry["file"], self._open_inputs(entry, verify)) for entry in entries]

    def _open_inputs(self, entry: dict, verify: bool) -> ActivationReader:
        path = self.work / entry["file"]
        if not path.is_file() or (verify and file_sha256(path) != entry["sha256"]):
            raise CheckpointError(f"work file {path} is missing or damaged; run with --restart to start over")
        return ActivationReader(path, self.lengths, self.dtype)

    def batches(self, store: ActivationReader, tokens: int | None = None):
        """Consecutive rows of equal length, up to `tokens` (None: batch_tokens) tokens per batch, at least one row."""
        limit = tokens or self.batch_tokens
        i = 0
        while i < len(store):
            j = i + 1
            while (j < len(store) and self.lengths[j] == self.lengths[i]
                   and (j - i + 1) * self.lengths[i] <= limit):
                j += 1
            if StopSignal.requested:
                raise Interrupted
            self._commits.check()  # the previous block's commit failed (a full disk): stop now, not a block later
            yield i, store.rows(i, j).to(device=self.device, dtype=self.dtype).view(j - i, self.lengths[i], -1)
            i = j

    def _hessian(self, runner, streams, branch, module_name, keep: bool) -> list[HessianAccumulator]:
        """H (and the GPTAQ cross term) of the module's inputs over all calibration rows, as an accumulator; with
        --beta auto two, the rows kept for fitting and the held-out rows (`held_out_from` on). With `keep`, the inputs
        of each stream are also written to a work file (`_Stream.kept`) for `_advance`."""
        width = streams[0].block.get_submodule(module_name).in_features
        accumulators = [HessianAccumulator(width, self.device, track_cross=self.gptaq)
                        for _ in range(2 if self.beta_auto else 1)]
        writers = [self.work_writer(f"{s.kind}-kept.npy", width, durable=False) for s in streams] if keep else []
        try:
            for batches in zip(*(self.batches(s.hidden) for s in streams)):
                xs = [runner.input_of(s.block, s.index, branch, module_name, batch)
                      for s, (_, batch) in zip(streams, batches)]
                first = batches[0][0]
                split = len(xs[0]) if self.held_out_from is None else max(0, self.held_out_from - first)
                for acc, rows in zip(accumulators, (slice(None, split), slice(split, None))):
                    if len(xs[0][rows]):
                        acc.add_batch(xs[0][rows], xs[1][rows] if self.gptaq else None)
                for writer, x in zip(writers, xs):
                    for row in x:
                        writer.write(row)
            for stream, writer in zip(streams, writers):
                writer.finish()
                stream.kept = ActivationReader(writer.path, self.lengths, self.dtype)
        except BaseException:
            for writer in writers:
                writer.abandon()
            raise
        return accumulators

    def _quantize_group(self, block, prefix, layout, group, prepared, losses) -> dict:
        """The linears of one sub-group share one input, hence one U: their weights are stacked along the output
        rows and solved in one column loop (the loop is row-separable; on the CPU its cost is per column, so q/k/v
        and gate/up each cost one loop instead of three and two), then split back into layers."""
        o = self.options
        linears = [block.get_submodule(name) for name in group]
        started = time.time()
        # stacked in the solver's [in, out] layout, so that its transpose of `weight` below is free: a cat along
        # the output rows and then that transpose were two copies (gate/up at hidden 2048: 88 MiB at the peak)
        weight = torch.cat([linear.weight.detach().T for linear in linears], dim=1).T
        for linear in linears:  # the stacked copy is all the solve reads; each layer gets its dequantized weights
            linear.weight.data = linear.weight.data.new_empty(0)
        sizes = [linear.out_features for linear in linears]
        choices = [{}] * len(group)
        if prepared is None:
            parts = self.ranks.solve_rows(weight, lambda rows: quantize_weight(  # a share of the rows per rank
                rows, None, bits=o.bits, group_size=o.group_size, sym=o.sym, method="rtn")).split(sizes)
        elif isinstance(prepared, beta_choice.HeldOutHessians):
            parts, choices = beta_choice.solve(weight, sizes, prepared, bits=o.bits, group_size=o.group_size,
                                               sym=o.sym, damp=o.damp, desc_act=o.desc_act, alpha=self.alpha)
        else:
            parts = self.ranks.solve_rows(weight, lambda rows: quantize_prepared(
                rows, prepared, bits=o.bits, group_size=o.group_size, sym=o.sym, method=o.method, beta=self.beta,
                overwrite=True)).split(sizes)
        del weight
        seconds = round(time.time() - started, 3)
        tensors = {}
        for name, linear, part, choice in zip(group, linears, parts, choices):
            linear.weight.data = part.dequantized.to(device=linear.weight.device, dtype=linear.weight.dtype)
            losses.append(part.loss)
            stored = prefix + layout.stored_module(name)
            tensors.update({stored + "." + k: v.cpu() for k, v in part.pack(o.checkpoint_format).items()})
            if linear.bias is not None:
                tensors[stored + ".bias"] = linear.bias.detach().to("cpu", torch.float16)
            self.emit({"event": "module", "module": prefix + name, "loss": part.loss, "damp": part.damp,
                        "condition": part.stats.get("condition"), "seconds": seconds, "solved_with": list(group),
                        **choice,
                        "rss_gib": psutil.Process().memory_info().rss / 2**30,
                        "device_peak_gib": (torch.cuda.max_memory_allocated(self.device) / 2**30
                                            if self.device.type == "cuda" else None)})
        return tensors

    def _advance(self, runner, stream: _Stream, branch, name: str, durable: bool, sums: dict) -> None:
        """The stream's hidden states after the (quantized) branch: h + output(kept inputs) when the pass over the
        output linear kept them, else h + body(norm(h)), the experts answering with their routed sums (`sums`).
        The last branch's are the inputs of the next block, a durable file the journal names once the block's commit
        made it so (`stream.finished`, read meanwhile under its tmp name); the others live only inside this block."""
        writer = self.work_writer(name, self.config.hidden_size, durable)
        try:
            kept = self.batches(stream.kept) if stream.kept is not None else None
            for i, batch in self.batches(stream.hidden):
                if kept is not None:
                    after = runner.output_from_kept(stream.block, stream.index, branch, batch, next(kept)[1])
                else:
                    routed = {path: answer_with(routed_sum, self.row_starts[i]) for path, routed_sum in sums.items()}
                    after = runner.branch_output(stream.block, stream.index, branch, batch, routed)
                for row in after:
                    writer.write(row)
            if durable:
                writer.complete()
            else:
                writer.finish()
        except BaseException:
            writer.abandon()
            raise
        if stream.kept is not None:
            stream.kept.close()
            stream.kept.path.unlink()
        stream.hidden.close()
        if stream.hidden_is_temporary:  # a block boundary's file stays until the journal has moved past it
            stream.hidden.path.unlink()
        stream.kept, stream.hidden_is_temporary = None, not durable
        stream.hidden = ActivationReader(writer.tmp if durable else writer.path, self.lengths, self.dtype)
        if durable:
            stream.finished = writer

    def work_writer(self, name: str, width: int, durable: bool) -> ActivationWriter:
        """Rows are written on a background thread, at most one forward batch of them waiting (the previous batch's
        outputs, which the caller held while computing the next one anyway)."""
        return ActivationWriter(self.work / self.ranks.file_name(name), self.lengths, width, self.dtype,
                                durable=durable, pending_bytes=self.batch_tokens * width * self.dtype.itemsize)

    def _finish(self, journal: Journal, total_shards: int, digest: str) -> None:
        extra = shard_name(total_shards, total_shards)
        block_prefix = self.arch.layers + "."
        if journal.state["extra"] is None:
            outside = self.reader.tensors([n for n in self.reader.names() if not n.startswith(block_prefix)])
            outside = {name: check_finite(name, tensor) for name, tensor in outside.items()}  # final norm, lm_head
            journal.record_extra({"shard": extra, "sha256": write_shard(self.out / extra, outside)})
            del outside
        weight_map = {}
        for number in range(1, total_shards + 1):
            name = shard_name(number, total_shards)
            weight_map.update({t: name for t in shard_tensor_names(self.out / name)})
        write_index(self.out, weight_map)
        copy_side_files(self.model_dir, self.out)
        o = self.options
        meta = {"quantizer": [f"leanfoem:{__version__}"], "method": o.method,
                "foem": {"alpha": o.alpha, "beta": o.beta}, "damp": o.damp,
                "calibration": {"source": Path(self.calib_source).name, **self.fingerprint["calibration"]},
                "fingerprint": digest}
        qconfig = quantization_config(bits=o.bits, group_size=o.group_size, sym=o.sym, desc_act=o.desc_act,
                                      damp=o.damp, checkpoint_format=o.checkpoint_format, meta=meta)
        config = json.loads((self.model_dir / "config.json").read_text())
        write_configs(self.out, config, qconfig)
        if not o.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)
        self.emit({"event": "done", "out": str(self.out)})

    # -- reporting ----------------------------------------------------------------------------------
    def emit(self, record: dict) -> None:
        if not self.ranks.leader:
            return
        record = dict(record, time=round(time.time(), 3))
        with open(self.out / LOG_NAME, "a") as f:
            f.write(json.dumps(record) + "\n")

    def say(self, text: str) -> None:
        if not self.options.quiet:
            tqdm.write(text)  # above the progress bar, not through it


@dataclass
class _Stream:
    """One activation stream through the block being quantized: the quantized model's ("acts"), or, for the GPTAQ
    term, the unquantized model's ("native", with an unquantized copy of the block)."""
    kind: str
    block: torch.nn.Module
    index: int                               # of the block (its layer's call arguments)
    hidden: ActivationReader                 # hidden states entering the current branch
    kept: ActivationReader | None = None     # inputs of the branch's output linear, when kept
    hidden_is_temporary: bool = False        # `hidden` is a file inside the block, not a block boundary
    finished: ActivationWriter | None = None  # the block's outputs, complete; `_commit_block` makes them durable


class _LazyTokenizer:
    """Loaded on the first call: calibration given as token ids (.jsonl "input_ids") needs no tokenizer, and
    SmolLM2's holds ~190 MB that the allocator never hands back (the whole run's peak RSS on small models)."""

    def __init__(self, load):
        self._load, self._tokenizer = load, None

    def __call__(self, *args, **kwargs):
        if self._tokenizer is None:
            self._tokenizer = self._load()
        return self._tokenizer(*args, **kwargs)


def check_token_ids(rows: list[torch.Tensor], vocab_size: int) -> None:
    """Token ids handed in as calibration rows must index the embedding (else an IndexError deep in a block)."""
    for number, row in enumerate(rows):
        if row.numel() and (row.min() < 0 or row.max() >= vocab_size):
            bad = row[(row < 0) | (row >= vocab_size)][0].item()
            raise CalibrationError(f"calibration row {number + 1} holds token id {bad}, outside the model's "
                                   f"vocabulary of {vocab_size}")


def peak_rss_gib() -> float:
    """The process's resident high-water mark so far (the block log's current RSS misses the peaks inside)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB elsewhere


def release_freed_memory() -> None:
    """Hands freed memory back to the OS (after each block, and between the steps of its widest layer's branch).
    glibc keeps freed large blocks in its arenas, and without this the resident size creeps up block after block
    (measured: +50 MB per block at hidden 2048)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def quantize(options: QuantizeOptions, ranks: Ranks | None = None) -> Path:
    return QuantizeRun(options, ranks).run()


def _load_input(what: str, model_dir: Path, load):
    """transformers' loaders fail with OSError or ValueError, some of several lines, none naming our input file:
    say which input could not be read, in one line (a bad input, exit 2)."""
    try:
        return load(model_dir)
    except (OSError, ValueError) as exc:
        detail = " ".join(str(exc).split())
        raise CheckpointError(f"cannot read the {what} of {model_dir}: "
                              f"{detail[:300] or type(exc).__name__}") from None


def _check_not_input(model_dir: Path, out: Path) -> None:
    model, target = model_dir.resolve(), out.resolve()
    if target == model or model in target.parents:
        raise OutputError(f"--out {out} is the input model directory (or inside it); the input is never written")
