#!/bin/sh
# Sets up ./.venv (pinned CPU torch first: an open range would pull a multi-GB CUDA build) and runs the tests.
set -eu
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,kernels]'
exec .venv/bin/python -m pytest -q "$@"
