#!/usr/bin/env bash
# Every GPU measurement of the performance issue, as one script for a lent device (about 8 minutes):
# NTNG's reference rates (crammed BERT, T5-base), ntng against HF's trainers, depth speed and RST
# fidelity, each under bf16 on the GPU. Each benchmark writes <out>/<name>.txt; one that runs past its
# limit is cut off and the rest still run. On the device (after benchmarks/gpu_wheels.sh here):
#   run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=600)
# NTNG_BENCH_SMOKE=1 runs each with tiny settings instead: checks this script on a CPU in ~2 minutes.
set -u
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/gpu-results}}
mkdir -p "$out"
python=${PYTHON:-python3}
# The carried wheels, only where ntng's packages are missing (the bare GPU image; not a set-up venv).
if [ -d .whl ] && ! "$python" -c "import jsonargparse, pytorch_optimizer, datasets" 2>/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
smoke=${NTNG_BENCH_SMOKE:-0}

run() {  # name, seconds, script, arguments: one benchmark, its output kept whatever happens
  local name=$1 limit=$2
  shift 2
  timeout "$limit" "$python" "$@" >"$out/$name.txt" 2>&1
  echo "$name (exit $?): $(grep '^ratio:' "$out/$name.txt" | tail -1)"
}

nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" >"$out/nvidia-smi.txt"
"$python" -c "import torch, transformers, lightning; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      'transformers', transformers.__version__, 'lightning', lightning.__version__)" | tee "$out/versions.txt"
if [ "$smoke" = 1 ]; then
  run gpu_rates 120 benchmarks/gpu_rates.py --smoke --updates 2 --warmup 1
  run throughput 120 benchmarks/throughput.py --model t5 --steps 3 --rounds 1
  run depth_speed 60 benchmarks/depth_speed.py --layers 4 --steps 2 --repeats 2
  run rst_fidelity 120 benchmarks/rst_fidelity.py --budget-hours 0.001 --repeats 2 --trainer.limit_val_batches=1
else
  run gpu_rates 240 benchmarks/gpu_rates.py
  run throughput 120 benchmarks/throughput.py
  run depth_speed 45 benchmarks/depth_speed.py
  run rst_fidelity 90 benchmarks/rst_fidelity.py --trainer.precision=bf16-mixed
fi
