"""The resume journal: the single source of truth for how far a run got (DESIGN §6).

Why it exists: a 70B run takes hours on a home PC and will be killed. Everything needed to go on is
the journal plus the activation file it names; the same command resumes at the first unfinished block
and the finished checkpoint is bit-identical to an uninterrupted run.

What must stay true:
- the journal is rewritten atomically after each finished block, and only after that block's shard
  and the next block's activation file are durable on disk;
- it carries the fingerprint of every input (source shards, calibration rows, settings, versions, the
  resolved compute dtype); resuming with a different fingerprint is refused, naming what changed (and, when
  only the forward dtype differs, the `--dtype` that resumes it);
- a block recorded as done has a shard whose sha256 matches; anything else in the work directory is
  scratch that may be overwritten.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .atomic import write_text

JOURNAL_NAME = "journal.json"
WORK_DIR_NAME = ".leanfoem"


class ResumeRefused(ValueError):
    pass


def fingerprint_digest(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def describe_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    changes = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += describe_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {_short(a)} -> {_short(b)}")
    return changes


def _dtype_hint(old: dict, new: dict) -> str:
    """`--dtype auto` may choose otherwise on another machine (or with another torch): when the forward dtype is
    the change, say how to resume in the dtype the run started with."""
    was, now = old.get("compute", {}), new.get("compute", {})
    if was.get("dtype") == now.get("dtype") or was.get("device") != now.get("device") \
            or was.get("dtype") not in ("float32", "bfloat16"):
        return ""
    return f"the run started computing in {was['dtype']}: add --dtype {was['dtype']} to resume it, or "


def _damp_hint(old: dict, new: dict) -> str:
    """The default damping changed (0.01 to 0.05, by measurement): a run started before resumes with its own."""
    was, now = old.get("settings", {}).get("damp"), new.get("settings", {}).get("damp")
    if was is None or was == now:
        return ""
    return f"the run started with --damp {was:g}: add --damp {was:g} to resume it, or "


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


class Journal:
    def __init__(self, work_dir: Path, state: dict):
        self.work_dir = Path(work_dir)
        self.state = state

    @property
    def path(self) -> Path:
        return self.work_dir / JOURNAL_NAME

    @classmethod
    def open(cls, work_dir: Path, fingerprint: dict) -> "Journal":
        """The journal in `work_dir`, or a fresh one; refuses one made for other inputs."""
        work_dir = Path(work_dir)
        path = work_dir / JOURNAL_NAME
        if path.is_file():
            try:
                state = json.loads(path.read_text())
                old = state["fingerprint"]
            except (ValueError, KeyError, TypeError):
                raise ResumeRefused(f"the resume journal {path} is unreadable; run with --restart to discard "
                                    "the unfinished run, or choose another --out") from None
            changes = describe_changes(old, fingerprint)
            if changes:
                raise ResumeRefused("the output directory holds an unfinished run with other inputs ("
                                    + "; ".join(changes[:4]) + (" ..." if len(changes) > 4 else "") + "); "
                                    + _dtype_hint(old, fingerprint) + _damp_hint(old, fingerprint)
                                    + "run with --restart to discard it, or choose another --out")
            return cls(work_dir, state)
        work_dir.mkdir(parents=True, exist_ok=True)
        journal = cls(work_dir, {"version": 1, "fingerprint": fingerprint, "blocks": [], "inputs": None,
                                 "native_inputs": None, "extra": None})
        journal.save()
        return journal

    def save(self) -> None:
        write_text(self.path, json.dumps(self.state, indent=1, sort_keys=True))

    @property
    def blocks_done(self) -> int:
        return len(self.state["blocks"])

    def record_inputs(self, inputs: dict, native_inputs: dict | None) -> None:
        self.state["inputs"], self.state["native_inputs"] = inputs, native_inputs
        self.save()

    def record_block(self, entry: dict, inputs: dict, native_inputs: dict | None) -> None:
        """Block done: its shard entry and the activation files that now feed the next block."""
        self.state["blocks"].append(entry)
        self.state["inputs"], self.state["native_inputs"] = inputs, native_inputs
        self.save()

    def record_extra(self, entry: dict) -> None:
        self.state["extra"] = entry
        self.save()
