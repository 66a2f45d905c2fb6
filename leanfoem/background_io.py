"""Writing, hashing and fsyncing off the compute thread (issue 17, DESIGN §6).

Why it exists: on the CPU a block spent ~11% of its time (SmolLM2-135M) writing activation rows, hashing them,
fsyncing the block boundary's file and writing its shard, all on the thread that computes. A `Worker` runs such
calls on one background thread, in the order they were submitted, while the caller goes on computing: an
activation writer hands it each row (pwrite + sha256), and the pipeline hands it each block's commit (fsync and
rename of the next block's inputs, the shard, the journal entry), while the next block already computes from the
same data in memory and in the page cache.

What must stay true:
- calls run one at a time, in submission order, so a file's bytes and digest are those a write in the caller's
  thread gives (LEANFOEM_SYNC_IO=1 runs every call in the caller's thread: the test of unchanged bits compares);
- memory is bounded: `submit` blocks while the calls already queued hold more than `limit` (in the caller's units,
  e.g. bytes of rows); one call is always accepted;
- the first error of a background call is raised in the caller's thread, as the same exception (a full disk ends
  the run with the same one-line message as before), at its next `submit`, `check` or `drain`; no call queued
  after a failed one runs, so nothing after the failure (a journal entry) claims what did not happen;
- `drain` returns only when every call submitted so far has finished.
"""

from __future__ import annotations

import collections
import os
import threading

SYNC = os.environ.get("LEANFOEM_SYNC_IO", "") not in ("", "0")


class Worker:
    """One background thread running submitted calls in order, at most `limit` units of them queued."""

    def __init__(self, name: str, limit: int):
        self.name, self.limit = name, limit
        self._jobs: collections.deque = collections.deque()
        self._queued = 0          # units of the calls queued or running
        self._error: BaseException | None = None
        self._done = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, call, *args, size: int = 1) -> None:
        """Runs call(*args) after every call submitted before; blocks while more than `limit` units are queued."""
        if SYNC:
            call(*args)
            return
        with self._done:
            while self._queued and self._queued + size > self.limit and self._error is None:
                self._done.wait()
            self._raise_error()
            self._jobs.append((call, args, size))
            self._queued += size
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"leanfoem-{self.name}", daemon=True)
                self._thread.start()

    def check(self) -> None:
        """Raises the error of a background call, if one failed."""
        with self._done:
            self._raise_error()

    def drain(self) -> None:
        """Waits until every call submitted has finished; raises the first error among them."""
        with self._done:
            while self._queued and self._error is None:
                self._done.wait()
            self._raise_error()

    def cancel(self) -> None:
        """Drops the calls not yet started and waits for the running one (a writer being abandoned)."""
        with self._done:
            while self._jobs:
                self._queued -= self._jobs.popleft()[2]
            while self._queued and self._error is None:
                self._done.wait()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        """Runs queued calls until none is left, then ends (`submit` starts a new thread for the next ones)."""
        while True:
            with self._done:
                if not self._jobs:
                    self._thread = None
                    return
                call, args, size = self._jobs.popleft()
            try:
                call(*args)
            except BaseException as exc:  # handed to the caller's thread; nothing queued after it runs
                with self._done:
                    self._error = exc
                    self._jobs.clear()
                    self._queued, self._thread = 0, None
                    self._done.notify_all()
                return
            with self._done:
                self._queued -= size
                self._done.notify_all()
