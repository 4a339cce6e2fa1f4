#!/usr/bin/env bash
# The wheels a lent H200 needs for experiments/real_model/run.sh and experiments/engine_h200/bench.sh,
# into .whl/ (ignored by git; carried with `carry: [".whl"]`, ~17 MB). The machine's image has torch 2.11 and
# transformers 5.17; the project pins transformers 5.23, `dmc import-gguf` needs gguf, `dmc serve` needs FastAPI,
# uvicorn and pydantic — and fastapi >= 0.16x imports opentelemetry-api (earlier `dmc serve` runs failed on
# its absence: "No module named 'opentelemetry'"). On the machine:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /root/site .whl/*.whl
#   export PYTHONPATH=/root/site:$PWD
set -eu
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .whl transformers==5.23.0 gguf==0.19.0 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 pydantic==2.14.4 \
  pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 opentelemetry-api==1.45.2
ls -la .whl
