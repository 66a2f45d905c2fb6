"""Two processes on one checkpoint (torch.distributed, gloo on the CPU): the single-process result up to summation
order, and kill-and-resume bit-identical at the same world size.

Every run is the real command line in subprocesses, one thread per rank: `torchrun --standalone --nproc-per-node 2
-m leanfoem quantize ...`, or, where one rank must be killed on its own, two `python -m leanfoem quantize` processes
given the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): torchrun itself would
end the survivor, and the test is that leanfoem does.

The checkpoint: tests/factory.py's Llama with 3 blocks, calibrated on the bundled (real) text, 8 rows of 128
tokens, forward batches of 4 rows in both runs (`--batch-tokens 512`: a rank's 4 rows are one batch, the single
process's 8 rows two), so that the runs differ in the order the Hessians' partial sums are added and nothing else.
Measured here: every code equal. A last-bit difference in a Hessian can flip a code, and with random weights one
flipped code flips more in the blocks after it: the same checkpoint with 4 blocks gives 99.46% of codes equal
(perplexity 0.03% apart), and so does the single process alone when only its batch size changes
(docs/BENCHMARKS.md).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from factory import build_checkpoint
from leanfoem.evaluation import default_eval_text, evaluate_perplexity, load_text
from leanfoem.packing import unpack_rows

LAYERS = 3
SETTINGS = ["--nsamples", "8", "--seqlen", "128", "--batch-tokens", "512", "--group-size", "64", "--quiet"]
LOG = "quantize_log.jsonl"


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer_dir):
    return build_checkpoint(tmp_path_factory.mktemp("dist") / "model", tokenizer_dir, layers=LAYERS)


def quantize_args(model: Path, out: Path) -> list[str]:
    return ["-m", "leanfoem", "quantize", "--model", str(model), "--out", str(out), *SETTINGS]


def env(threads: int, **extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), **extra)


def torchrun(model: Path, out: Path) -> subprocess.CompletedProcess:
    """2 ranks under torchrun, 1 thread each."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *quantize_args(model, out)], capture_output=True, text=True, env=env(1), timeout=300)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(model: Path, out: Path, rank1_out: Path | None = None, extra=()) -> list[subprocess.Popen]:
    """The two ranks as torchrun starts them (its environment variables), each a process of its own."""
    port = str(free_port())
    outs = [out, rank1_out or out]
    return [subprocess.Popen([sys.executable, *quantize_args(model, outs[r]), *extra], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env=env(1, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                     MASTER_PORT=port))
            for r in range(2)]


def blocks_done(out: Path) -> int:
    try:
        return len(json.loads((out / ".leanfoem" / "journal.json").read_text())["blocks"])
    except (OSError, ValueError):
        return 0


def output_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != LOG}


def codes(out: Path) -> dict[str, torch.Tensor]:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    found = {}
    for shard in sorted(set(index["weight_map"].values())):
        found.update({k: unpack_rows(v, 4) for k, v in load_file(out / shard).items() if k.endswith(".qweight")})
    return found


@pytest.fixture(scope="module")
def two_rank_run(model):
    out = model.parent / "two-ranks"
    done = torchrun(model, out)
    assert done.returncode == 0, done.stderr
    return out


def test_two_ranks_give_the_single_process_checkpoint_up_to_summation_order(model, two_rank_run):
    single = model.parent / "one-process"
    done = subprocess.run([sys.executable, *quantize_args(model, single)], capture_output=True, text=True,
                          env=env(2), timeout=300)  # the same two threads, in one process
    assert done.returncode == 0, done.stderr
    a, b = codes(single), codes(two_rank_run)
    assert a.keys() == b.keys() and len(a) == 7 * LAYERS
    equal = sum(int((a[k] == b[k]).sum()) for k in a) / sum(a[k].numel() for k in a)
    text = load_text(default_eval_text())
    ppl = [evaluate_perplexity(str(out), text, seqlen=128, windows=8, device="cpu")["perplexity"]
           for out in (single, two_rank_run)]
    print(f"codes equal: {equal:.5%}; perplexity {ppl[0]:.4f} (1 process) vs {ppl[1]:.4f} (2 ranks)")
    assert equal >= 0.999
    assert abs(ppl[1] - ppl[0]) / ppl[0] < 0.003
    assert not (two_rank_run / ".leanfoem").exists(), "work files left behind"
    start = json.loads((two_rank_run / LOG).read_text().splitlines()[0])
    assert start["rows"] == 8, "the log counts every rank's rows"


def test_a_killed_rank_stops_the_other_and_the_same_command_resumes_bit_identical(model, two_rank_run):
    out = model.parent / "killed"
    ranks = start_ranks(model, out)
    deadline = time.monotonic() + 180
    while blocks_done(out) < 1 and all(p.poll() is None for p in ranks) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(p.poll() is None for p in ranks), [p.communicate() for p in ranks]
    ranks[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, err = ranks[0].communicate(timeout=60)
    stopped_after = time.monotonic() - killed
    ranks[1].communicate()
    print(f"rank 0 stopped {stopped_after:.2f} s after rank 1 was killed: {err.strip()}")
    assert ranks[0].returncode == 1 and stopped_after < 5
    assert err.count("\n") == 1 and "rank 1 stopped" in err and "Traceback" not in err, err
    assert not (out / "config.json").exists() and 1 <= blocks_done(out) < LAYERS
    names = {p.name for p in (out / ".leanfoem").iterdir()}
    assert any(".rank0." in n for n in names) and any(".rank1." in n for n in names), names

    # another world size is refused, naming it, and changes nothing
    before = output_files(out)
    refused = subprocess.run([sys.executable, *quantize_args(model, out)], capture_output=True, text=True, env=env(2))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "started with 2 processes and this command runs 1" in refused.stderr, refused.stderr
    assert output_files(out) == before

    done = torchrun(model, out)  # the same command, under torchrun this time
    assert done.returncode == 0, done.stderr
    resumed = [json.loads(line)["resume_at"] for line in (out / LOG).read_text().splitlines() if '"start"' in line]
    assert resumed[0] == 0 and resumed[-1] >= 1, resumed
    assert output_files(out) == output_files(two_rank_run), "not bit-identical to the uninterrupted 2-rank run"


def test_a_rank_that_fails_with_an_error_stops_the_other_naming_it(model, tmp_path):
    """Rank 1 cannot write its work files (its output directory is a file, as on a node whose path is taken):
    it says why, and rank 0 stops with one line naming rank 1."""
    taken = tmp_path / "taken"
    taken.write_text("a file where rank 1's output directory should be")
    ranks = start_ranks(model, tmp_path / "out", rank1_out=taken)
    errors = [p.communicate(timeout=120)[1] for p in ranks]
    assert [p.returncode for p in ranks] == [1, 2], errors
    assert errors[1].count("\n") == 1 and "is not a directory" in errors[1], errors[1]
    assert errors[0].count("\n") == 1 and "rank 1 failed" in errors[0], errors[0]


def test_plan_shows_each_ranks_memory(capsys):
    from leanfoem.cli import main
    from leanfoem.models import demo_model_dir
    plans = []
    for nproc in (1, 2):
        assert main(["plan", "--model", str(demo_model_dir()), "--device", "cuda", "--gpu-memory", "24GiB",
                     "--nproc", str(nproc), "--json"]) == 0
        out = capsys.readouterr().out
        plans.append(json.loads(out.strip().splitlines()[-1]))
    one, two = plans
    assert "rank 0" in out and "per rank" in out and "work files" in out
    assert two["nproc"] == 2 and two["calibration_tokens"] == one["calibration_tokens"] // 2
    assert two["reduction_bytes"] == two["hessian_width"] ** 2 * 4
    assert two["rank0_device_peak_bytes"] == two["device_peak_bytes"] + two["reduction_bytes"]
    assert two["host_required_bytes"] <= one["host_required_bytes"]


def test_moe_experts_shared_by_two_ranks_resume_bit_identical(tmp_path, tokenizer_dir):
    """Qwen3-MoE (2 blocks of 8 experts, groups of 3): each expert's Hessians summed on rank 0 from both ranks'
    tokens, its rows solved by both; the same codes as one process with the same batches, and a SIGKILL of a rank
    followed by the same command gives the uninterrupted 2-rank run's bits."""
    model = build_checkpoint(tmp_path / "moe", tokenizer_dir, family="qwen3_moe", layers=2)
    extra = ["--expert-group", "3", "--nsamples", "4", "--seqlen", "64", "--batch-tokens", "128"]  # smaller: 4 runs

    def both(out):
        ranks = start_ranks(model, out, extra=extra)
        errors = [p.communicate(timeout=300)[1] for p in ranks]
        assert [p.returncode for p in ranks] == [0, 0], errors

    both(tmp_path / "two")
    single = subprocess.run([sys.executable, *quantize_args(model, tmp_path / "one"), *extra], capture_output=True,
                            text=True, env=env(2), timeout=300)
    assert single.returncode == 0, single.stderr
    a, b = codes(tmp_path / "one"), codes(tmp_path / "two")
    assert a.keys() == b.keys() and any(".experts.7." in k for k in a)
    assert sum(int((a[k] == b[k]).sum()) for k in a) / sum(a[k].numel() for k in a) >= 0.999

    out = tmp_path / "killed"
    ranks = start_ranks(model, out, extra=extra)
    while blocks_done(out) < 1 and all(p.poll() is None for p in ranks):
        time.sleep(0.01)
    ranks[1].send_signal(signal.SIGKILL)
    for p in ranks:
        p.communicate(timeout=60)
    assert ranks[0].returncode == 1 and not (out / "config.json").exists()
    both(out)
    assert output_files(out) == output_files(tmp_path / "two")
