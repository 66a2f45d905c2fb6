#!/bin/sh
# Sets up ./.venv (pinned CPU torch first) and quantizes the bundled demo model, printing its perplexity
# before and after. Everything it needs ships with leanfoem; nothing is downloaded but the packages.
set -eu
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
echo "== perplexity of the bundled demo model (bf16 weights) =="
.venv/bin/leanfoem eval --model demo
echo "== quantizing it: FOEM, 4 bit, group 128 =="
.venv/bin/leanfoem quantize --model demo --out ./demo-w4
echo "== perplexity of the quantized model =="
.venv/bin/leanfoem eval --model ./demo-w4
