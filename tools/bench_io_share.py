"""The share of the block loop's time that the computing thread spends on activation and shard I/O (issue 17).

    .venv/bin/python tools/bench_io_share.py [--source DIR] -- quantize --model demo --out /tmp/io --nsamples 128 ...

Runs `leanfoem quantize` in this process with timers around every I/O call the computing (main) thread makes:
writing activation rows (pwrite, sha256, or handing a row to the background writer and waiting for room), finishing
files (fsync, rename), reading rows back (pread), verifying a file's digest, writing shards and journal entries,
and waiting for a block's background commit. Only the outermost timed call counts (no double counting), and only
on the main thread: the background threads' work is off the critical path, which is the point. The denominator is
the block loop, from the first block's start to the start of the final tensors and configs (`_finish`).
`--source DIR` imports leanfoem from another checkout (e.g. the commit before the background writers) to measure
"before" with the same tool; `LEANFOEM_SYNC_IO=1` in the environment measures this build with every write on the
computing thread. Prints one JSON line: loop seconds, write and read seconds, and their shares.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import threading
import time

TIMED = {  # module: {class or None: [function names]} — whatever of these the imported leanfoem has
    "leanfoem.activations": {"ActivationWriter": ["__init__", "write", "complete", "commit", "finish", "abandon"],
                             "ActivationReader": ["__init__", "rows"], None: ["file_sha256"]},
    "leanfoem.pipeline": {None: ["write_shard", "file_sha256"]},
    "leanfoem.journal": {"Journal": ["save"]},
    "leanfoem.background_io": {"Worker": ["submit", "drain"]},
}
READS = {"ActivationReader.__init__", "ActivationReader.rows", "file_sha256"}


class Timers:
    def __init__(self):
        self.seconds = {"write": 0.0, "read": 0.0}
        self.window = [None, None]  # first block's start, _finish's start
        self.depth = 0              # nesting on the main thread: only the outermost call counts

    def wrap(self, name: str, function):
        kind = "read" if name in READS else "write"

        @functools.wraps(function)
        def timed(*args, **kwargs):
            if threading.current_thread() is not threading.main_thread() or self.depth:
                return function(*args, **kwargs)
            self.depth += 1
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.depth -= 1
                if self.window[0] is not None and self.window[1] is None:
                    self.seconds[kind] += time.perf_counter() - started
        return timed

    def mark(self, slot: int, function):
        @functools.wraps(function)
        def marked(*args, **kwargs):
            if self.window[slot] is None:
                self.window[slot] = time.perf_counter()
            return function(*args, **kwargs)
        return marked


def install(timers: Timers) -> None:
    import importlib
    for module_name, owners in TIMED.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for owner_name, names in owners.items():
            owner = module if owner_name is None else getattr(module, owner_name, None)
            for name in names:
                if owner is not None and hasattr(owner, name):
                    label = name if owner_name is None else f"{owner_name}.{name}"
                    setattr(owner, name, timers.wrap(label, getattr(owner, name)))
    from leanfoem.pipeline import QuantizeRun
    QuantizeRun._quantize_block = timers.mark(0, QuantizeRun._quantize_block)
    QuantizeRun._finish = timers.mark(1, QuantizeRun._finish)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=None, help="a leanfoem checkout to import instead of this one")
    parser.add_argument("cli", nargs=argparse.REMAINDER, help="-- then the leanfoem command line")
    args = parser.parse_args()
    if args.source:
        sys.path.insert(0, args.source)
    import leanfoem.cli
    timers = Timers()
    install(timers)
    cli = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
    code = leanfoem.cli.main(cli)
    if code:
        raise SystemExit(code)
    loop = timers.window[1] - timers.window[0]
    write, read = timers.seconds["write"], timers.seconds["read"]
    print(json.dumps({"source": leanfoem.cli.__file__, "loop_seconds": round(loop, 2), "write_seconds": round(write, 2),
                      "read_seconds": round(read, 2), "write_share": round(write / loop, 4),
                      "read_share": round(read / loop, 4), "io_share": round((write + read) / loop, 4)}))


if __name__ == "__main__":
    main()
