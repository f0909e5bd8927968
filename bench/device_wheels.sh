#!/usr/bin/env bash
# The wheels the GPU machine lacks (its python3 3.12 has torch, transformers 5.17, peft, accelerate, pyarrow), at
# the versions of requirements.lock, into .whl/ (git-ignored): carry it to the device and install with
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
# bench/device_wheels.sh serve   the serving bench (bench/serve_bench.py): the locked transformers and its deps
# bench/device_wheels.sh train   the peer bench (bench/peer_bench.py): datasets, trl, liger-kernel
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  serve) pkgs="transformers huggingface-hub tokenizers safetensors kernels tomlkit hf-xet httpx2 httpcore2 h11 click
               typer fastapi starlette annotated-doc opentelemetry-api importlib-metadata zipp anyio sniffio regex
               truststore
               pydantic pydantic-core typing-inspection annotated-types" ;;
  train) pkgs="datasets dill fsspec multiprocess trl pydantic pydantic-core typing-inspection annotated-types"
         extra="liger-kernel==0.8.5" ;;  # the peer's kernels: not a Tuneline dependency, so not in the lock
  *) echo "usage: $0 serve|train" >&2; exit 2 ;;
esac
pins=(${extra:-})
for p in $pkgs; do
  pin=$(grep -iE "^${p}==" requirements.lock | cut -d' ' -f1)
  [ -n "$pin" ] || { echo "$p is not in requirements.lock" >&2; exit 1; }
  pins+=("$pin")
done
mkdir -p .whl
python3 -m pip download -q --no-deps --dest .whl --python-version 3.12 --only-binary=:all: \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 "${pins[@]}"
du -sh .whl
