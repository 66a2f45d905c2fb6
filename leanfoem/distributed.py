"""Several processes on one checkpoint: `torchrun --nproc-per-node N [--nnodes M] -m leanfoem quantize ...`.

Why it exists: a card (or a CPU socket) per process gives the same checkpoint sooner. Everything about process
groups, which rank owns what and how partial results meet lives here; the pipeline calls it at a handful of points,
and with one process (`Ranks`, no torchrun) every call is the single-process behaviour, so its bits are unchanged.

How the work is split (torch.distributed: gloo on the CPU, NCCL for CUDA tensors; no protocol of our own):
- calibration rows: rank r holds the contiguous rows [r·n/N, (r+1)·n/N) and keeps their activations in its own work
  files (`acts-00003.rank1.npy`); activations never travel between ranks;
- per sub-group, each rank's partial sums Σ XᵀX (and GPTAQ's Σ (X̃ − X)ᵀX) and token counts go to rank 0, which adds
  them in rank order 0, 1, …, N−1 in fp32 (never an all_reduce: its order is the backend's), factorises, and
  broadcasts U (and P): every rank solves with the same U bits, whatever its hardware;
- the solve: the sub-group's stacked output rows are split in N contiguous slices (the column loop is row-separable),
  each rank solves its slice and broadcasts its codes, scales and zeros; every rank rebuilds the same dequantized
  weights from them, so the blocks on all ranks stay identical;
- rank 0 alone writes shards, index, configs, the run log and the journal; the journal lists every rank's activation
  file and digest, and records a block only after every rank made its file durable.

What must stay true:
- the result depends on the world size, never on timing: every reduction has a fixed order, and rank 0's choices
  (forward dtype, plan) are everyone's;
- a run resumes only with the world size it started with (the fingerprint holds it; another is refused by name);
- a rank that dies ends the others within about a second, each with one line naming it: a watch thread per peer sits
  in a receive that the dead peer's closed connection fails; a rank that fails with an error tells its peers first;
- collectives are issued in the same order on every rank: the main thread uses the default group (tensors) and a gloo
  group for objects, the commit thread its own gloo group, the watch threads a third.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

from .hessian import Factor, FactorizationError, HessianAccumulator
from .journal import JOURNAL_NAME, Journal, ResumeRefused

# A rank alive but stuck (not dead: a dead one is noticed at once) is given up after this long in one collective.
# Generous: the leader factorises and writes shards while the others wait.
TIMEOUT = datetime.timedelta(hours=2)
GIVE_UP_SECONDS = 5.0  # after a failed collective, how long the watch threads get to name the rank that died
FINISHED, FAILED, INTERRUPTED = 0, 1, 2


class RankLost(RuntimeError):
    """Another rank stopped answering (its process ended, or its machine)."""


def world_size_from_environment() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_world_size(work: Path, world: int) -> None:
    """An unfinished run resumes only with the world size it started with: its rows were split by it."""
    try:
        old = json.loads((Path(work) / JOURNAL_NAME).read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no journal, or one that Journal.open refuses with its own message
    started = (old.get("ranks") or {}).get("world_size", 1)
    if started != world:
        raise ResumeRefused(f"the unfinished run in {Path(work).parent} was started with {started} process"
                            f"{'es' if started > 1 else ''} and this command runs {world}: resume it with "
                            f"{started} (torchrun --nproc-per-node x --nnodes = {started}"
                            f"{', or no torchrun' if started == 1 else ''}), or run with --restart to start over")


def check_supported(world: int, beta_auto: bool = False) -> None:
    """What a job of `world` processes cannot do yet (`quantize` and `plan --nproc` refuse it alike)."""
    if world > 1 and beta_auto:
        raise ValueError("--beta auto chooses β in one process for now: run the command without torchrun (plan: "
                         "without --nproc)")


def split(count: int, world: int, rank: int) -> tuple[int, int]:
    """The contiguous share [start, stop) of `count` items that `rank` owns."""
    return count * rank // world, count * (rank + 1) // world


class Ranks:
    """One process: rank 0 of 1. Every method is what the single-process pipeline does without this module."""

    rank, world, local_rank = 0, 1, 0

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        return device

    def fingerprint(self) -> dict:
        return {}  # a single-process fingerprint is today's (its runs resume as before)

    def rows(self, rows: list) -> list:
        return rows

    def file_name(self, name: str) -> str:
        return name

    def check_supported(self, beta_auto: bool = False) -> None:
        pass

    def check_same(self, fingerprint: dict) -> None:
        pass

    def leader_value(self, fn, *args):
        """fn(*args) on rank 0; its result (or its error) on every rank."""
        return fn(*args)

    def leader_first(self, fn, *args):
        """fn(*args) on rank 0, then (if it succeeded) on the others."""
        return fn(*args)

    def open_journal(self, work: Path, fingerprint: dict):
        check_world_size(work, self.world)
        return Journal.open(work, fingerprint)

    def sum_on_leader(self, acc: HessianAccumulator) -> None:
        """The accumulator's sums over every rank's rows, on rank 0 (the other ranks' accumulators are spent)."""

    def total(self, counts: torch.Tensor) -> torch.Tensor:
        """Integer counts summed over the ranks (exact in any order)."""
        return counts

    def shared_hessian(self, prepare, device):
        """prepare() on rank 0, its PreparedHessian on every rank."""
        return prepare()

    def solve_rows(self, weight: torch.Tensor, solve):
        """solve(weight) for the whole [out, in] weight (every rank: the same QuantResult)."""
        return solve(weight)

    def finish_run(self, work: Path, keep: bool) -> None:
        pass


class Group(Ranks):
    """A rank of a torchrun job (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in the environment)."""

    def __init__(self, device_option: str):
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = device_option != "cpu" and torch.cuda.is_available()
        import torch.distributed as dist
        self.dist = dist
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=TIMEOUT)
        self.objects = dist.new_group(backend="gloo", timeout=TIMEOUT)     # control messages, main thread
        self.commits = dist.new_group(backend="gloo", timeout=TIMEOUT)     # the commit thread's
        self.watch = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=30))
        self.closing = False
        self.started, self.collective_seconds = time.perf_counter(), 0.0  # for LEANFOEM_RANK_TIMES (benchmarks)
        self.watchers = [threading.Thread(target=self._watch, args=(peer,), daemon=True, name=f"watch-rank{peer}")
                         for peer in range(self.world) if peer != self.rank]
        for thread in self.watchers:
            thread.start()

    # -- failure: one line naming the rank, no hang ----------------------------------------------------
    def _watch(self, peer: int) -> None:
        """Blocks until `peer` says how it ended; a peer that died fails the receive at once (closed connection)."""
        word = torch.zeros(1, dtype=torch.int64)
        try:
            self.dist.recv(word, src=peer, group=self.watch)
            code = int(word.item())
        except Exception:
            code = None
        if self.closing or code == FINISHED:
            return
        what = {None: "stopped (its process ended: killed, out of memory, or its machine lost?)",
                FAILED: "failed (its message is above)", INTERRUPTED: "was interrupted"}[code]
        print(f"leanfoem: rank {peer} {what}; rank {self.rank} stops too; run the same command again to resume",
              file=sys.stderr, flush=True)
        os._exit(130 if code == INTERRUPTED else 1)  # the main thread may sit in a collective that never returns

    def _tell_peers(self, code: int) -> None:
        word = torch.tensor([code], dtype=torch.int64)
        for peer in range(self.world):
            if peer != self.rank:
                with contextlib.suppress(Exception):  # a peer that is gone needs no word
                    self.dist.send(word, dst=peer, group=self.watch)

    def abort(self, exc: BaseException) -> BaseException:
        """This rank stops on an error: its peers are told (they stop too), or, when the error is a collective that
        failed because a peer is gone, the watch threads get a moment to name it. Returns the error to raise."""
        global _aborted
        from .pipeline import Interrupted
        if _lost_contact(exc):
            time.sleep(GIVE_UP_SECONDS)  # a watch thread normally ends the process, naming the peer, before this
            self.closing = _aborted = True
            return RankLost(f"rank {self.rank} lost contact with another rank ({' '.join(str(exc).split())[:200]}); "
                            "run the same command again to resume")
        self.closing = True
        self._tell_peers(INTERRUPTED if isinstance(exc, (Interrupted, KeyboardInterrupt)) else FAILED)
        _aborted = True
        return exc

    @contextlib.contextmanager
    def _collective(self):
        """Times the main thread's collectives: transfers, and waiting for the other ranks to reach them."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.collective_seconds += time.perf_counter() - started

    def close(self) -> None:
        """Every rank got here: say so, hear it from every peer, and leave the groups."""
        with self._collective():
            self.dist.barrier(group=self.objects)
        self._write_times()
        self.closing = True
        self._tell_peers(FINISHED)
        for thread in self.watchers:
            thread.join()
        self.dist.destroy_process_group()

    def _write_times(self) -> None:
        """With LEANFOEM_RANK_TIMES=DIR, each rank leaves DIR/rankR.json: its run's seconds and the part spent in
        the main thread's collectives (tools/bench_ranks.py reads them)."""
        where = os.environ.get("LEANFOEM_RANK_TIMES")
        if where:
            Path(where).mkdir(parents=True, exist_ok=True)
            (Path(where) / f"rank{self.rank}.json").write_text(json.dumps(
                {"rank": self.rank, "world": self.world, "seconds": time.perf_counter() - self.started,
                 "collective_seconds": self.collective_seconds}))

    # -- who does what -----------------------------------------------------------------------------
    def device(self, device: torch.device) -> torch.device:
        """One card per process on a node: rank's LOCAL_RANK-th, unless the command names one."""
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return device

    def fingerprint(self) -> dict:
        return {"ranks": {"world_size": self.world}}

    def rows(self, rows: list) -> list:
        start, stop = split(len(rows), self.world, self.rank)
        if start == stop:
            raise ValueError(f"{len(rows)} calibration rows cannot be shared by {self.world} processes: raise "
                             "--nsamples or run fewer processes")
        return rows[start:stop]

    def file_name(self, name: str) -> str:
        stem, dot, suffix = name.partition(".")
        return f"{stem}.rank{self.rank}{dot}{suffix}"

    def check_supported(self, beta_auto: bool = False) -> None:
        check_supported(self.world, beta_auto)

    def check_same(self, fingerprint: dict) -> None:
        """Every rank must compute from the same inputs and settings as rank 0 (same files, same options)."""
        from .journal import describe_changes
        leader = self._broadcast_object(fingerprint if self.leader else None)
        changes = describe_changes(leader, fingerprint)
        if changes:
            raise ValueError(f"rank {self.rank} sees other inputs than rank 0 (" + "; ".join(changes[:3]) + "): give "
                             "every node the same model files (copied with their times, e.g. rsync -a) and options")

    def _broadcast_object(self, value, group=None):
        box = [value]
        with self._collective():
            self.dist.broadcast_object_list(box, src=0, group=group or self.objects)
        return box[0]

    def leader_value(self, fn, *args):
        outcome = None
        if self.leader:
            try:
                outcome = ("ok", fn(*args))
            except Exception as exc:
                outcome = ("error", exc)
        kind, value = self._broadcast_object(outcome)
        if kind == "error":
            raise value
        return value

    def leader_first(self, fn, *args):
        value = self.leader_value(fn, *args)
        return value if self.leader else fn(*args)

    def open_journal(self, work: Path, fingerprint: dict):
        def open_on_leader():
            check_world_size(work, self.world)
            return Journal.open(work, fingerprint).state
        return SharedJournal(self, self.leader_value(open_on_leader), work, fingerprint)

    def finish_run(self, work: Path, keep: bool) -> None:
        """The leader has finished the checkpoint: each other rank drops its own work files (on a shared file
        system the leader's clean-up may have taken them already)."""
        if keep or self.leader:
            return
        for path in Path(work).glob(f"*.rank{self.rank}.*"):
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            Path(work).rmdir()  # this node's own (empty) work directory when the output is not shared

    # -- the reductions ------------------------------------------------------------------------------
    def total(self, counts: torch.Tensor) -> torch.Tensor:
        counts = counts.clone()
        with self._collective():
            self.dist.all_reduce(counts)
        return counts

    def sum_on_leader(self, acc: HessianAccumulator) -> None:
        """Rank 0 receives each rank's partial sums in rank order and adds them in that order, in fp32: the same
        bits whichever rank finishes its pass first. The others send theirs and drop them."""
        sums = [acc.sum_xx] + ([acc.sum_dx] if acc.sum_dx is not None else [])
        tokens = torch.tensor([acc.tokens], dtype=torch.float64, device=acc.sum_xx.device)
        if not self.leader:
            with self._collective():
                for tensor in sums + [tokens]:
                    self.dist.send(tensor, dst=0)
            acc.sum_xx = acc.sum_dx = None
            return
        incoming = [torch.empty_like(t) for t in sums + [tokens]]
        for peer in range(1, self.world):
            for total, buffer in zip(sums + [tokens], incoming):
                with self._collective():
                    self.dist.recv(buffer, src=peer)
                total.add_(buffer)
        acc.tokens = int(tokens.item())

    def shared_hessian(self, prepare, device):
        """Rank 0 factorises (its error, e.g. a Hessian that cannot be factorised, is everyone's); U, the dead
        columns, the act-order permutation and P are broadcast."""
        from .solver import PreparedHessian
        prepared = None
        if self.leader:
            try:
                prepared = prepare()
                shape = (prepared.upper.shape[0], prepared.perm is not None, prepared.gptaq is not None,
                         prepared.factor.damp, prepared.factor.tried, prepared.factor.condition)
                header = ("ok", shape)
            except (FactorizationError, ValueError) as exc:
                header = ("error", exc)
            self._broadcast_object(header)
        else:
            header = self._broadcast_object(None)
        if header[0] == "error":
            raise header[1]
        n, has_perm, has_gptaq, damp, tried, condition = header[1]
        if self.leader:
            upper, dead, perm, gptaq = prepared.upper, prepared.dead.to(torch.uint8), prepared.perm, prepared.gptaq
        else:
            upper = torch.empty((n, n), dtype=torch.float32, device=device)
            dead = torch.empty(n, dtype=torch.uint8, device=device)
            perm = torch.empty(n, dtype=torch.int64, device=device) if has_perm else None
            gptaq = torch.empty((n, n), dtype=torch.float32, device=device) if has_gptaq else None
        with self._collective():
            for tensor in (upper, dead, perm, gptaq):
                if tensor is not None:
                    self.dist.broadcast(tensor, src=0)
        if self.leader:
            return prepared
        return PreparedHessian(upper, dead.bool(), perm, gptaq, Factor(upper, damp, tried, condition))

    def solve_rows(self, weight: torch.Tensor, solve):
        """Rank r solves its slice of the output rows; each slice's codes, scales, zeros and row losses are
        broadcast by its owner, and every rank puts together the whole layer's result in row order."""
        rows = weight.shape[0]
        if rows < self.world:
            return solve(weight)  # too few rows to share: every rank solves it all (the same bits everywhere)
        start, stop = split(rows, self.world, self.rank)
        mine = solve(weight[start:stop])
        parts = []
        for owner in range(self.world):
            if owner == self.rank:
                buffer = _result_bytes(mine)
            else:
                a, b = split(rows, self.world, owner)
                buffer = torch.empty(_result_size(mine, b - a), dtype=torch.uint8, device=mine.codes.device)
            with self._collective():
                self.dist.broadcast(buffer, src=owner)
            parts.append(mine if owner == self.rank else _result_from_bytes(mine, buffer))
        return _joined(parts)


class SharedJournal:
    """The journal as one rank sees it (the pipeline's `Journal` interface): its own activation files, every
    block and the extra shard. Rank 0 keeps the real journal, whose inputs are {"ranks": [one entry per rank]}."""

    def __init__(self, group: Group, state: dict, work: Path, fingerprint: dict):
        self.group = group
        self.journal = Journal(work, state) if group.leader else None
        mine = {key: (state[key]["ranks"][group.rank] if state[key] else None)
                for key in ("inputs", "native_inputs")}
        self.state = {"blocks": list(state["blocks"]), "extra": state["extra"], **mine}

    @property
    def blocks_done(self) -> int:
        return len(self.state["blocks"])

    def _gathered(self, inputs, native, group):
        entries = [None] * self.group.world if self.group.leader else None
        if group is self.group.objects:
            with self.group._collective():
                self.group.dist.gather_object((inputs, native), entries, dst=0, group=group)
        else:  # the commit thread's: it overlaps the next block's computing, not counted
            self.group.dist.gather_object((inputs, native), entries, dst=0, group=group)
        if not self.group.leader:
            return None, None
        natives = [n for _, n in entries]
        return {"ranks": [i for i, _ in entries]}, ({"ranks": natives} if natives[0] is not None else None)

    def record_inputs(self, inputs: dict, native_inputs: dict | None) -> None:
        everyone = self._gathered(inputs, native_inputs, self.group.objects)
        self.group.leader_value(lambda: self.journal.record_inputs(*everyone))
        self.state["inputs"], self.state["native_inputs"] = inputs, native_inputs

    def record_block(self, entry: dict, inputs: dict, native_inputs: dict | None) -> None:
        """On the commit thread (its own group): every rank's next inputs are durable once gathered here; rank 0
        then writes the entry, and only after that may any rank drop the files the journal named before."""
        everyone = self._gathered(inputs, native_inputs, self.group.commits)
        if self.group.leader:
            self.journal.record_block(entry, *everyone)
        self.group.dist.barrier(group=self.group.commits)
        self.state["blocks"].append(entry)
        self.state["inputs"], self.state["native_inputs"] = inputs, native_inputs

    def record_extra(self, entry: dict) -> None:
        self.journal.record_extra(entry)  # rank 0 only: `_finish` runs there
        self.state["extra"] = entry


# -- a slice's result on the wire ----------------------------------------------------------------------
def _fields(result):
    return [result.codes, result.scales, result.zeros, result.row_losses]


def _row_bytes(template) -> int:
    """Bytes per output row of a result: every field's last dimension is the output rows."""
    return sum(t.element_size() * (t.numel() // t.shape[-1]) for t in _fields(template))


def _result_size(template, rows: int) -> int:
    return rows * _row_bytes(template)


def _result_bytes(result) -> torch.Tensor:
    device = result.codes.device
    return torch.cat([t.to(device).contiguous().view(torch.uint8).flatten() for t in _fields(result)])


def _result_from_bytes(template, buffer: torch.Tensor):
    import dataclasses
    rows = buffer.numel() // _row_bytes(template)
    pieces, at = [], 0
    for t in _fields(template):
        shape = tuple(t.shape[:-1]) + (rows,)
        size = t.element_size() * (t.numel() // t.shape[-1]) * rows
        # a fresh copy: viewing a byte slice as a wider dtype needs an aligned storage offset
        pieces.append(buffer[at:at + size].clone().view(t.dtype).view(shape).to(t.device))
        at += size
    codes, scales, zeros, row_losses = pieces
    return dataclasses.replace(template, codes=codes, scales=scales, zeros=zeros, row_losses=row_losses,
                               loss=row_losses.sum().item())


def _joined(parts):
    import dataclasses
    row_losses = torch.cat([p.row_losses for p in parts])
    return dataclasses.replace(parts[0], codes=torch.cat([p.codes for p in parts], dim=1),
                               scales=torch.cat([p.scales for p in parts], dim=1),
                               zeros=torch.cat([p.zeros for p in parts], dim=1), row_losses=row_losses,
                               loss=row_losses.sum().item())


def _lost_contact(exc: BaseException) -> bool:
    import torch.distributed as dist
    text = str(exc)
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and
                                               ("gloo" in text or "Connection closed" in text or "NCCL" in text))


_aborted = False


def _joined_group(device_option: str) -> Group:
    """This process's rank; a job it cannot join is one line (RankLost), not a traceback."""
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RankLost(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {', '.join(missing)} "
                       f"{'is' if len(missing) == 1 else 'are'} not set: start the job with torchrun")
    try:
        return Group(device_option)
    except (RuntimeError, ValueError) as exc:
        text = " ".join(str(exc).split())
        raise RankLost(f"cannot join the torchrun job (rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}, "
                       f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}): {text[:200]}") from None


def end_aborted_rank(code: int) -> None:
    """A rank that stopped on an error leaves without the interpreter's teardown: its watch threads sit in gloo
    receives, and destroying the process group under them aborts the process (SIGABRT) after the message."""
    if _aborted:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


@contextlib.contextmanager
def launched(device_option: str = "auto"):
    """The ranks of this process: a torchrun job's when WORLD_SIZE > 1, else the single process. Errors end every
    rank (see `Group.abort`); a clean end waits for every rank."""
    if world_size_from_environment() <= 1:
        yield Ranks()
        return
    group = _joined_group(device_option)
    try:
        yield group
    except BaseException as exc:
        raise group.abort(exc) from None
    group.close()
