"""Kill it anywhere, run the same command, get the same bits (DESIGN §6)."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from factory import build_checkpoint
from leanfoem.models import demo_model_dir

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity. ") * 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = build_checkpoint(root / "src", demo_model_dir(), layers=4)
    calib = root / "calib.txt"
    calib.write_text(TEXT)
    return root, model, calib


def command(model, out, calib, *extra):
    return [sys.executable, "-m", "leanfoem", "quantize", "--model", str(model), "--out", str(out), "--calib",
            str(calib), "--nsamples", "8", "--seqlen", "64", "--group-size", "64", "--quiet", *extra]


def tensors(out: Path) -> dict:
    result = {}
    for shard in sorted(out.glob("*.safetensors")):
        result.update(load_file(shard))
    return result


def assert_identical(a: Path, b: Path):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and ta[name].equal(tb[name]), name


def run_to_completion_with_kills(cmd, out, kills, seed):
    rng = random.Random(seed)
    for attempt in range(kills):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + rng.uniform(0.5, 6.0)
        while time.time() < deadline and proc.poll() is None:
            if (out / "config.json").exists():  # written last: the run must be finishing, successfully
                assert proc.wait(timeout=60) == 0
                break
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert not (out / "config.json").exists(), "a killed run must never look finished"
    final = subprocess.run(cmd, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr


@pytest.mark.parametrize("extra", [(), ("--alpha", "0.25")], ids=["foem", "foem+gptaq"])
def test_killed_runs_resume_to_bit_identical_output(setup, extra):
    root, model, calib = setup
    tag = "gptaq" if extra else "foem"
    reference = root / f"reference-{tag}"
    assert subprocess.run(command(model, reference, calib, *extra)).returncode == 0
    out = root / f"killed-{tag}"
    run_to_completion_with_kills(command(model, out, calib, *extra), out, kills=5, seed=len(extra))
    assert (out / "config.json").exists() and not (out / ".leanfoem").exists()
    assert_identical(reference, out)


def test_rerun_of_a_finished_command_changes_nothing(setup):
    root, model, calib = setup
    out = root / "finished"
    cmd = command(model, out, calib)
    assert subprocess.run(cmd).returncode == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = subprocess.run(cmd[:-1], capture_output=True, text=True)
    assert again.returncode == 0 and "already complete" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_resume_with_other_settings_is_refused_naming_the_change(setup):
    root, model, calib = setup
    out = root / "changed"
    proc = subprocess.Popen(command(model, out, calib, "--keep-work"))
    while not (out / ".leanfoem" / "journal.json").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    refused = subprocess.run(command(model, out, calib, "--bits", "3"), capture_output=True, text=True)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "bits: 4 -> 3" in refused.stderr and "--restart" in refused.stderr
    restarted = subprocess.run(command(model, out, calib, "--bits", "3", "--restart"), capture_output=True, text=True)
    assert restarted.returncode == 0, restarted.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signals_stop_at_a_safe_point_and_the_same_command_resumes(setup, sig):
    root, model, calib = setup
    out = root / f"signal-{sig.name}"
    cmd = command(model, out, calib)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (out / ".leanfoem" / "acts-00001.npy").exists() and proc.poll() is None:
        time.sleep(0.02)
    sent = time.time()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130 and time.time() - sent < 10
    assert "run the same command again to resume" in err
    assert not (out / "config.json").exists()
    assert subprocess.run(cmd).returncode == 0
    reference = root / "reference-foem"
    if reference.exists():
        assert_identical(reference, out)
