#!/usr/bin/env bash
# Fetch, here, the wheels the GPU machine lacks (it has torch, transformers, accelerate, peft, typer, rich, pandas,
# pyarrow; not pydantic, datasets or trl) into .whl/ (git-ignored), for benchmarks/h100.sh. Python 3.12, x86-64.
# Pinned together: pydantic 2.14.0 requires exactly pydantic-core 2.50.0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  pydantic==2.14.0 pydantic-core==2.50.0 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
  datasets==4.8.0 dill==0.4.1 multiprocess==0.70.19 trl==1.16.0
ls .whl
