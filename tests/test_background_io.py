"""Background writes: in order, bounded, errors raised in the caller's thread, and the same bytes and digest as a
write in the caller's thread (the pipeline-level check, output shards with and without the overlap, is in
tests/test_resume.py)."""

from __future__ import annotations

import errno
import threading

import numpy as np
import pytest
import torch

from leanfoem.activations import ActivationReader, ActivationWriter, file_sha256
from leanfoem.background_io import Worker


def test_calls_run_in_order_and_drain_waits_for_all():
    worker, seen = Worker("test", limit=3), []
    for i in range(50):
        worker.submit(seen.append, i)
    worker.drain()
    assert seen == list(range(50))


def test_submit_blocks_while_the_queue_is_full():
    worker, release, returned = Worker("test", limit=1), threading.Event(), threading.Event()
    worker.submit(release.wait)

    def second():
        worker.submit(lambda: None)
        returned.set()

    threading.Thread(target=second, daemon=True).start()
    assert not returned.wait(0.3), "a second call was queued past the limit"
    release.set()
    assert returned.wait(10)
    worker.drain()


def test_a_background_error_is_raised_in_the_caller_and_later_calls_do_not_run():
    worker, seen = Worker("test", limit=10), []

    def full_disk():
        raise OSError(errno.ENOSPC, "No space left on device", "shard.tmp")

    gate = threading.Event()
    worker.submit(gate.wait)
    worker.submit(full_disk)
    worker.submit(seen.append, "journal entry")  # queued behind the failure: must never run
    gate.set()
    with pytest.raises(OSError) as raised:
        worker.drain()
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == "shard.tmp"
    assert seen == []
    with pytest.raises(OSError):
        worker.submit(seen.append, "next block")
    with pytest.raises(OSError):
        worker.check()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_background_rows_give_the_same_file_and_digest(tmp_path, dtype):
    lengths, hidden = [5, 7, 7, 3], 16
    rows = [torch.randn(n, hidden, generator=torch.Generator().manual_seed(n)).to(dtype) for n in lengths]
    digests = {}
    for name, pending in (("sync.npy", 0), ("background.npy", 2 * 7 * hidden * 4)):
        writer = ActivationWriter(tmp_path / name, lengths, hidden, dtype, pending_bytes=pending)
        for row in rows:
            writer.write(row)
        digests[name] = writer.finish()
        assert digests[name] == file_sha256(tmp_path / name)
    assert (tmp_path / "sync.npy").read_bytes() == (tmp_path / "background.npy").read_bytes()
    reader = ActivationReader(tmp_path / "background.npy", lengths, dtype)
    assert all(torch.equal(reader.row(i), row) for i, row in enumerate(rows))
    reader.close()
    assert np.load(tmp_path / "background.npy").shape == (sum(lengths), hidden)


def test_a_complete_file_is_readable_under_its_tmp_name_before_it_is_committed(tmp_path):
    lengths, hidden = [4, 4], 8
    writer = ActivationWriter(tmp_path / "next.npy", lengths, hidden, torch.float32, pending_bytes=1)
    rows = [torch.full((4, hidden), float(i)) for i in range(2)]
    for row in rows:
        writer.write(row)
    writer.complete()
    reader = ActivationReader(writer.tmp, lengths, torch.float32)  # the next block starts here
    digest = writer.commit()                                        # while another thread makes it durable
    assert not writer.tmp.exists() and digest == file_sha256(tmp_path / "next.npy")
    assert torch.equal(reader.rows(0, 2), torch.stack(rows))
    reader.close()


def test_an_in_block_file_is_neither_hashed_nor_kept_under_its_tmp_name(tmp_path):
    writer = ActivationWriter(tmp_path / "kept.npy", [2], 4, torch.float32, durable=False, pending_bytes=64)
    writer.write(torch.ones(2, 4))
    assert writer.finish() is None
    assert (tmp_path / "kept.npy").is_file() and not writer.tmp.exists()
