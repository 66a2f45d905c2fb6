"""Runs one command and reports its wall time and peak RSS, optionally sampling its RSS over time.

    python tools/rss_probe.py [--interval 0.1] [--samples FILE] -- CMD ...

Last line of stdout: a JSON object {"returncode", "seconds", "peak_rss_bytes", "sampled_peak_bytes", "samples"}.
`peak_rss_bytes` is the child's ru_maxrss (os.wait4 on that one child: what `/usr/bin/time -v` calls "Maximum
resident set size"); `sampled_peak_bytes` the largest RSS seen by sampling every `--interval` seconds (psutil);
`--samples FILE` writes the samples as JSON [[unix time, rss bytes], ...].

Why a separate, small process: on Linux a child started with vfork (what Python's subprocess uses) or fork
inherits its parent's RSS high-water mark at exec — the kernel folds the old address space's peak into the
child's ru_maxrss. Measured here: `python -c pass` spawned by a process that had touched 1.5 GB reports a
1.5 GB ru_maxrss, even after the parent freed it. A benchmark that has imported torch or built a model would
thus inflate every measurement; this probe imports only the standard library and psutil (~15 MB), so the
peak it reports is the command's own. Keep it that way: no torch, numpy or leanfoem imports here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import psutil


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between RSS samples")
    parser.add_argument("--samples", default=None, help="write the RSS samples to this JSON file")
    parser.add_argument("--report", default=None, help="write the JSON result to this file instead of stdout")
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("no command given")
    started = time.time()
    child = subprocess.Popen(cmd)
    process = psutil.Process(child.pid)
    samples: list[list[float]] = []
    while True:
        # wait4 with WNOHANG, not Popen.poll(): poll would reap the child and lose its rusage.
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        try:
            rss = process.memory_info().rss
        except psutil.Error:  # exited between wait4 and the sample; the next wait4 reaps it
            rss = 0
        if rss:  # 0: a zombie, exited and not yet reaped
            samples.append([round(time.time(), 3), rss])
        time.sleep(max(0.0, args.interval - (time.time() - samples[-1][0]) if samples else args.interval))
    seconds = time.time() - started
    child.returncode = os.waitstatus_to_exitcode(status)  # so Popen's destructor does not wait again
    if args.samples:
        with open(args.samples, "w") as f:
            json.dump(samples, f)
    report = json.dumps({"returncode": child.returncode, "seconds": round(seconds, 3),
                         "peak_rss_bytes": usage.ru_maxrss * 1024,
                         "sampled_peak_bytes": max((rss for _, rss in samples), default=0),
                         "samples": len(samples)})
    if args.report:
        with open(args.report, "w") as f:
            f.write(report + "\n")
    else:
        print(report)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
