#!/usr/bin/env bash
# The one command for a lent GPU machine (`device` tool: carry [".whl"], run `bash scripts/gpu_run.sh`): installs the
# carried wheels beside its torch, then bench/host_memory.py (about a minute: free memory, pinned host bytes, copy
# speeds) and bench/gpu.py within a 10-minute slot, their logs and JSON under $OUT. GPU_BENCH=0: the first only.
set -uo pipefail
cd "$(dirname "$0")/.."
ls .whl/*.whl > /dev/null 2>&1 || { echo "no .whl/*.whl here: run \`make gpu-wheels\` and carry .whl" >&2; exit 3; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
out=${OUT:-bench/results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv | tee "$out/gpu_smi.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', \
torch.backends.cudnn.version(), 'diffusers', diffusers.__version__)" | tee "$out/versions.txt"
python3 -m bench.host_memory --out "$out/host_memory.json" 2>&1 | tee "$out/host_memory.log"
[ "${GPU_BENCH:-1}" != 0 ] || exit 0
# without arguments: the 720p figures first (the targets), whole videos and the speed options, then 480p
[ $# -gt 0 ] || set -- --resolutions 720p,480p --paths whole_4step,engine,engine_cfg_batch,diffusers,whole \
    --backends cudnn,flash3 --steps 1 --warmup 1
python3 -m bench.gpu --out "$out/gpu.json" --max-seconds "${GPU_MAX_SECONDS:-420}" "$@" 2>&1 | tee "$out/gpu.log"
