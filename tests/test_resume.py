"""Kill it anywhere, run the same command, get the same bits (DESIGN §6).

Every run here is the real command line (`python -m leanfoem quantize ...`) in a subprocess, on a small
sharded Llama checkpoint built by tests/factory.py (4 blocks, hidden 128, random weights).
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from factory import build_checkpoint

ROOT = Path(__file__).resolve().parents[1]
LAYERS = 4
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
        "it was the season of Darkness, it was the spring of hope, it was the winter of despair. ") * 30
LOG = "quantize_log.jsonl"
WORK = ".leanfoem"


# -- fixtures -----------------------------------------------------------------------------------------
def make_tokenizer_dir(workdir: Path) -> Path:
    """The bundled demo model's tokenizer when it ships one; otherwise a small byte-level BPE trained here on
    text this function writes itself (no network, no ../shared)."""
    demo = ROOT / "leanfoem" / "demo" / "model"
    if (demo / "tokenizer.json").is_file():
        return demo
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    text = workdir / "tokenizer-text.txt"
    text.write_text(TEXT + "The quick brown fox jumps over the lazy dog. 0123456789 ,.;:!?'\"()[]\n" * 20)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train([str(text)], trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out = workdir / "tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>").save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = build_checkpoint(root / "model", make_tokenizer_dir(root), layers=LAYERS)
    calib = root / "calib.txt"
    calib.write_text(TEXT)
    return root, model, calib


def command(model, out, calib, *extra) -> list[str]:
    return [sys.executable, "-m", "leanfoem", "quantize", "--model", str(model), "--out", str(out), "--calib",
            str(calib), "--nsamples", "4", "--seqlen", "64", "--group-size", "64", "--quiet", *extra]


_references: dict[tuple, tuple[Path, list[tuple[str, float]]]] = {}


def reference(setup, *extra) -> tuple[Path, list[tuple[str, float]]]:
    """An uninterrupted run with the same settings (made once per module), and its timeline: the seconds
    after launch at which it started block 0, finished each block, and finished (from its run log)."""
    if extra not in _references:
        root, model, calib = setup
        out = root / ("reference" + "".join(extra).replace("-", "_"))
        launched = time.time()
        done = subprocess.run(command(model, out, calib, *extra), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        events = [json.loads(line) for line in (out / LOG).read_text().splitlines()]
        timeline = [(e["event"], e["time"] - launched) for e in events if e["event"] in ("start", "block", "done")]
        _references[extra] = out, timeline
    return _references[extra]


# -- checks -------------------------------------------------------------------------------------------
def files(out: Path) -> dict[str, bytes]:
    """Every file of an output (work dir included), the run log excepted (it holds times)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != LOG}


def assert_identical(reference_dir: Path, out: Path) -> None:
    a, b = files(reference_dir), files(out)
    assert a.keys() == b.keys(), f"files differ: {sorted(a.keys() ^ b.keys())}"
    different = [name for name in a if a[name] != b[name]]
    assert not different, f"not bit-identical to the uninterrupted run: {different}"


def assert_marked_only_when_complete(out: Path, reference_dir: Path) -> None:
    """config.json (written last) may exist only on an output that is complete: every shard of the index there
    and bit-identical to the uninterrupted run's."""
    if not (out / "config.json").exists():
        return
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        assert (out / shard).read_bytes() == (reference_dir / shard).read_bytes(), shard


def blocks_done(out: Path) -> int:
    journal = out / WORK / "journal.json"
    return len(json.loads(journal.read_text())["blocks"]) if journal.is_file() else 0


def start_events(out: Path) -> list[dict]:
    """The "start" records of the run log (a line being appended right now is skipped)."""
    events = []
    for line in (out / LOG).read_text().splitlines() if (out / LOG).is_file() else []:
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    return [e for e in events if e.get("event") == "start"]


def watch(proc: subprocess.Popen, out: Path, seconds: float, reference_dir: Path | None = None) -> None:
    """Polls the output while the process runs, for `seconds` or until it exits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "config.json").exists():
            if reference_dir is not None:
                assert_marked_only_when_complete(out, reference_dir)
            else:  # without a reference, at least: everything the index names is there
                index = json.loads((out / "model.safetensors.index.json").read_text())
                assert all((out / s).is_file() for s in index["weight_map"].values())
        time.sleep(0.01)


def kill_after_blocks(cmd, out: Path, blocks: int) -> None:
    """Starts the command and SIGKILLs it as soon as, in this run, its journal records `blocks` finished blocks."""
    starts = len(start_events(out))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while ((len(start_events(out)) == starts or blocks_done(out) < blocks) and proc.poll() is None
           and time.monotonic() < deadline):
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before block {blocks}: {proc.stderr.read().decode()}"
    proc.kill()
    proc.wait()
    assert not (out / "config.json").exists()


def kill_moments(timeline: list[tuple[str, float]], kills: int, seed: int) -> list[tuple[int, float]]:
    """`kills` seeded random moments of an uninterrupted run: the first during start-up (imports, tokenizing,
    first activations), the others spread over the block loop (one in each equal slice of it). Each is
    (blocks that must be done in the attempt, seconds to wait after that); block -1 means wait from the
    launch. Start-up dominates a tiny model's run on an idle machine, so spreading over wall time alone
    would put every kill before the first block. Pinning moments to progress rather than wall time keeps
    every kill inside the run however loaded the machine is."""
    rng = random.Random(seed)
    total = timeline[-1][1]
    boundaries = [t for event, t in timeline if event in ("start", "block")]  # block j starts at boundaries[j]
    loop_start = boundaries[0]
    moments = [(-1, loop_start * (0.2 + 0.7 * rng.random()))]
    for k in range(kills - 1):
        at = loop_start + (total - loop_start) * (0.02 + 0.93 * (k + rng.random()) / (kills - 1))
        blocks = sum(1 for t in boundaries if t <= at) - 1
        moments.append((blocks, at - boundaries[blocks]))
    return moments


def run_with_kills(cmd, out: Path, reference_dir: Path, moments: list[tuple[int, float]]) -> list[int]:
    """SIGKILLs one attempt of the command at each moment, checking the output while each runs and after each
    kill, then runs it until it exits 0. Returns how many blocks the journal held at each kill."""
    landed = []
    for blocks, wait in moments:
        starts = len(start_events(out))
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if blocks >= 0:  # this attempt must have started its block loop and finished `blocks` blocks
            while proc.poll() is None and (len(start_events(out)) == starts or blocks_done(out) < blocks):
                watch(proc, out, 0.01, reference_dir)
        watch(proc, out, wait, reference_dir)
        if proc.poll() is not None:  # finished before this kill was due
            assert proc.returncode == 0, proc.stderr.read().decode()
            proc.stderr.close()
            break
        proc.kill()
        proc.wait()
        proc.stderr.close()
        landed.append(blocks_done(out))
        assert_marked_only_when_complete(out, reference_dir)
    for _ in range(3):
        final = subprocess.run(cmd, capture_output=True, text=True)
        if final.returncode == 0:
            break
    assert final.returncode == 0, final.stderr
    return landed


# -- tests --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,kills", [((), 4), (("--alpha", "0.25"), 3)], ids=["foem", "foem+gptaq"])
def test_killed_runs_resume_to_bit_identical_output(setup, extra, kills):
    root, model, calib = setup
    reference_dir, timeline = reference(setup, *extra)
    out = root / ("killed" + "".join(extra))
    moments = kill_moments(timeline, kills, seed=len(extra))
    landed = run_with_kills(command(model, out, calib, *extra), out, reference_dir, moments)
    print(f"uninterrupted run {timeline[-1][1]:.1f} s; kills (blocks to wait for, then seconds): "
          + ", ".join(f"({b}, {w:.2f})" for b, w in moments) + f"; journal held {landed} blocks at the kills")
    assert len(landed) >= kills - 1, "kills were due after the run had finished"
    assert any(0 < n < LAYERS for n in landed), f"no kill landed between blocks: {landed}"
    assert not (out / WORK).exists() and not list(out.glob("*.tmp")), "work files left behind"
    assert_identical(reference_dir, out)
    assert max(e["resume_at"] for e in start_events(out)) > 0


@pytest.mark.parametrize("extra", [(), ("--alpha", "0.25")], ids=["foem", "foem+gptaq"])
def test_background_io_changes_no_bit(setup, extra):
    """Rows, block commits and shards written on background threads (the default) give every output file of a run
    that writes them all in the computing thread (LEANFOEM_SYNC_IO=1), byte for byte."""
    import os
    root, model, calib = setup
    reference_dir, _ = reference(setup, *extra)
    out = root / ("sync-io" + "".join(extra))
    done = subprocess.run(command(model, out, calib, *extra), capture_output=True, text=True,
                          env=dict(os.environ, LEANFOEM_SYNC_IO="1"))
    assert done.returncode == 0, done.stderr
    assert_identical(reference_dir, out)


def test_rerun_of_a_finished_command_says_so_and_changes_nothing(setup):
    root, model, calib = setup
    out = root / "finished"
    shutil.copytree(reference(setup)[0], out)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.rglob("*"))}
    again = subprocess.run(command(model, out, calib)[:-1], capture_output=True, text=True)  # without --quiet
    assert again.returncode == 0, again.stderr
    assert "already complete" in again.stdout
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.rglob("*"))} == before


def test_other_settings_are_refused_naming_the_change_and_restart_discards_the_run(setup):
    root, model, calib = setup
    reference_dir, _ = reference(setup)
    out = root / "changed"
    kill_after_blocks(command(model, out, calib, "--bits", "3"), out, blocks=2)
    before = files(out)

    cmd = command(model, out, calib)  # the reference's settings: 4 bits
    refused = subprocess.run(cmd, capture_output=True, text=True)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "bits: 3 -> 4" in refused.stderr and "--restart" in refused.stderr, refused.stderr
    assert files(out) == before and blocks_done(out) == 2, "a refused run must not touch the unfinished one"

    # --restart discards the 3-bit run; interrupted itself, the restarted run resumes like any other
    kill_after_blocks(cmd + ["--restart"], out, blocks=1)
    assert json.loads((out / WORK / "journal.json").read_text())["fingerprint"]["settings"]["bits"] == 4
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    resumed_at = [e["resume_at"] for e in start_events(out)]
    assert len(resumed_at) == 3 and resumed_at[:2] == [0, 0] and resumed_at[2] >= 1, resumed_at
    assert_identical(reference_dir, out)


def test_sigint_and_sigterm_stop_promptly_and_the_same_command_resumes(setup):
    root, model, calib = setup
    reference_dir, timeline = reference(setup)
    block_seconds = max(b - a for (_, a), (_, b) in zip(timeline, timeline[1:]))
    limit = max(5.0, 2 * block_seconds)  # the run stops at its next batch: well within one block
    out = root / "signalled"
    cmd = command(model, out, calib)
    for sig, blocks in ((signal.SIGINT, 1), (signal.SIGTERM, 2)):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while blocks_done(out) < blocks and proc.poll() is None:
            time.sleep(0.01)
        assert proc.poll() is None, proc.communicate()[1]
        sent = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        stopped_after = time.monotonic() - sent
        print(f"{sig.name}: exit {proc.returncode} after {stopped_after:.2f} s (limit {limit:.1f} s)")
        assert proc.returncode == 130, err
        assert stopped_after < limit, f"{sig.name} took {stopped_after:.1f} s to stop the run"
        assert err.count("\n") == 1 and "run the same command again to resume" in err, err
        assert not (out / "config.json").exists()
        assert blocks_done(out) >= blocks
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert_identical(reference_dir, out)


def test_a_crash_in_native_code_says_where_and_the_same_command_resumes(setup):
    """A fatal signal (what a BLAS crash raises) cannot be caught, but faulthandler prints the Python stack it hit;
    the journal makes the same command resume."""
    root, model, calib = setup
    reference_dir, _ = reference(setup)
    out = root / "crashed"
    cmd = command(model, out, calib)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while blocks_done(out) < 1 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGSEGV)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGSEGV, err
    assert "Fatal Python error: Segmentation fault" in err and "leanfoem" in err.split("Segmentation fault")[1], err
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert_identical(reference_dir, out)
