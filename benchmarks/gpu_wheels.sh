#!/usr/bin/env bash
# The packages ntng needs that the lent GPU machine's image lacks (it has torch, lightning,
# transformers, tokenizers, torchmetrics, pyarrow, tensorboard), as wheels in .whl/ for its Python
# 3.12; `run` carries them (carry: [".whl"]) and benchmarks/gpu.sh installs them there. Run here, once:
#   bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 pytorch-optimizer==4.1.0 \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
ls -1 .whl
