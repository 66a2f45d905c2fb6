"""Shared by the benchmark scripts: the machine description and section replacement in docs/BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch


def machine_line() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from leanfoem.dtype_choice import NATIVE_BF16_FLAGS, cpu_flags
    native = sorted(cpu_flags() & NATIVE_BF16_FLAGS)
    bf16 = f"native bf16: {', '.join(native)}" if native else "no native bf16 (torch emulates it)"
    return f"{os.cpu_count()} cores, {cpu}, {bf16}, Python {platform.python_version()}, torch {torch.__version__}"


def replace_section(doc: Path, title: str, body: str) -> None:
    """Replaces (or appends) the `## title` section of a markdown file, leaving the other sections alone."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip() + "\n\n" + section
    doc.write_text(text.rstrip() + "\n")
