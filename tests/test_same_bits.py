"""Same inputs, same bits: the checkpoint of the real SmolLM2-135M depends on the model, the calibration rows and
the settings, never on the forward batch, on how much memory the planner saw, or on where a run was killed.

Each dtype gets one uninterrupted run at the planner's batch (8 rows of 256 tokens: one batch), one at a fixed
--batch-tokens (256: eight batches, or 1024: two), and one at the other fixed batch that is killed at a seeded
random moment inside the block loop and then resumed by the same command with the planner's batch, on a machine
whose memory probe reports 3 GiB. Every output file must be byte-identical to the uninterrupted run's. (Three runs
per dtype, not four: each SmolLM2 run costs about 35 s of the suite's time on two cores.)
The forward itself is checked too: a block's output rows do not depend on how many rows share its batch.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORK = ".leanfoem"

# The resumed run sees a busy machine: psutil's memory probe patched before leanfoem imports it.
BUSY_MACHINE = """
import sys, psutil
real = psutil.virtual_memory()
psutil.virtual_memory = lambda: real._replace(total=3 << 30, available=1 << 30, free=1 << 30)
from leanfoem.cli import main
sys.exit(main(sys.argv[1:]))
"""


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != "quantize_log.jsonl"}


def assert_identical(reference: Path, out: Path) -> None:
    a, b = files(reference), files(out)
    assert a.keys() == b.keys(), f"files differ: {sorted(a.keys() ^ b.keys())}"
    different = [name for name in a if a[name] != b[name]]
    assert not different, f"not bit-identical to the uninterrupted run: {different}"


def blocks_done(out: Path) -> int:
    journal = out / WORK / "journal.json"
    try:
        return len(json.loads(journal.read_text())["blocks"]) if journal.is_file() else 0
    except ValueError:  # being replaced right now
        return 0


def planned_batch(out: Path) -> int:
    events = [json.loads(line) for line in (out / "quantize_log.jsonl").read_text().splitlines()]
    return next(e for e in events if e.get("event") == "start")["batch_tokens"]


@pytest.fixture(scope="module")
def runs(smollm2_dir, shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("same-bits")

    def args(out: Path, dtype: str, *extra) -> list[str]:
        return ["quantize", "--model", str(smollm2_dir), "--out", str(out), "--calib",
                str(shared_data / "corpus" / "war_and_peace.txt"), "--nsamples", "8", "--seqlen", "256",
                "--group-size", "64", "--dtype", dtype, "--quiet", *extra]
    return root, args


@pytest.mark.slow
@pytest.mark.parametrize("dtype,whole,killed", [("float32", 256, 1024), ("bfloat16", 1024, 256)])
def test_batch_size_memory_and_kills_change_no_bit(runs, dtype, whole, killed):
    from leanfoem.cli import main
    root, args = runs
    reference = root / f"{dtype}-default"
    assert main(args(reference, dtype)) == 0
    assert planned_batch(reference) >= 8 * 256
    out = root / f"{dtype}-{whole}"
    assert main(args(out, dtype, "--batch-tokens", str(whole))) == 0
    assert planned_batch(out) == whole
    assert_identical(reference, out)

    out = root / f"{dtype}-killed"
    command = [sys.executable, "-m", "leanfoem", *args(out, dtype, "--batch-tokens", str(killed))]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rng = random.Random(dtype)
    target = rng.randint(1, 20)  # of SmolLM2's 30 blocks
    deadline = time.monotonic() + 600
    while blocks_done(out) < target and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(rng.random())  # somewhere inside the next block
    assert proc.poll() is None, f"finished before the kill: {proc.stderr.read().decode()}"
    proc.kill()
    proc.wait()
    proc.stderr.close()
    killed_at = blocks_done(out)
    assert 0 < killed_at < 30
    resumed = subprocess.run([sys.executable, "-c", BUSY_MACHINE, *args(out, dtype)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    events = [json.loads(line) for line in (out / "quantize_log.jsonl").read_text().splitlines()]
    starts = [e for e in events if e.get("event") == "start"]
    assert starts[-1]["resume_at"] == killed_at
    assert starts[0]["batch_tokens"] == killed and starts[-1]["batch_tokens"] != killed  # its own, on the busy machine
    assert_identical(reference, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_blocks_rows_do_not_depend_on_the_batch(smollm2_dir, dtype):
    """The forwards stay batched (one row at a time costs 17-66% on a CPU): this checks, on the CPU the tests run
    on, that a decoder block gives each row the same bits in a batch of 1, 2 or 8 rows."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=dtype)
    layer, rotary = model.model.layers[0], model.model.rotary_emb
    x = torch.randn(8, 256, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    positions = torch.arange(256)[None]
    embeddings = rotary(x, positions)
    with torch.no_grad():
        def forward(rows):
            outs = [layer(x[i:i + rows], position_embeddings=embeddings, position_ids=positions)
                    for i in range(0, len(x), rows)]
            return torch.cat([o[0] if isinstance(o, tuple) else o for o in outs])
        whole = forward(8)
        for rows in (1, 2):
            assert torch.equal(forward(rows), whole), f"{rows} rows per batch changed the block's output"
