#!/usr/bin/env bash
# The one command for a lent GPU machine (`device` tool: carry [".whl"], run `bash scripts/gpu_run.sh`): installs the
# carried wheels beside its torch, then bench/gpu.py within a 10-minute slot, its log and JSON under $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
out=${OUT:-bench/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu_smi.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee "$out/versions.txt"
# without arguments: the 720p figures first (the targets), whole videos and the speed options, then 480p
[ $# -gt 0 ] || set -- --resolutions 720p,480p --paths whole_4step,engine,engine_cfg_batch,diffusers,whole \
    --backends cudnn,flash3 --steps 1 --warmup 1
python3 -m bench.gpu --out "$out/gpu.json" --max-seconds "${GPU_MAX_SECONDS:-480}" "$@" 2>&1 | tee "$out/gpu.log"
