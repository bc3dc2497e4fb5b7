#!/usr/bin/env bash
# The one command for a lent GPU machine (`device` tool: carry [".whl"], run `bash scripts/gpu_run.sh`): installs the
# carried wheels beside its torch, then, most valuable first, within a 10-minute slot (logs and JSON under $OUT;
# the figures already recorded in bench/measured/ go last):
#   bench/gpu.py --memory-sweep  (4 min) the plans at a 4090's and an L4's free memory, 720p, bf16 and fp8
#   bench/host_memory.py  (1 min) free memory, unseen costs, pinned host bytes, copy speeds, modes agree
#   bench/gpu.py  the speed paths, until GPU_MAX_SECONDS
# Arguments go to one bench/gpu.py run instead of the last two. GPU_HOST_MEMORY=0 / GPU_BENCH=0 skip parts.
# Torch's allocator runs with expandable segments, as in the ComfyUI this project starts (docs/memory.md).
set -uo pipefail
cd "$(dirname "$0")/.."
ls .whl/*.whl > /dev/null 2>&1 || { echo "no .whl/*.whl here: run \`make gpu-wheels\` and carry .whl" >&2; exit 3; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
out=${OUT:-bench/results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv | tee "$out/gpu_smi.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', \
torch.backends.cudnn.version(), 'diffusers', diffusers.__version__)" | tee "$out/versions.txt"
host_memory() { [ "${GPU_HOST_MEMORY:-1}" = 0 ] || python3 -m bench.host_memory --out "$out/host_memory.json" 2>&1 | tee "$out/host_memory.log"; }
[ "${GPU_BENCH:-1}" != 0 ] || { host_memory; exit; }
if [ $# -gt 0 ]; then
    host_memory
    name=gpu; case " $* " in *" --memory-sweep "*) name=gpu_memory ;; *" --modes-agree "*) name=gpu_modes ;; *" --sharded "*) name=gpu_sharded ;; esac
    python3 -m bench.gpu --out "$out/$name.json" "$@" 2>&1 | tee "$out/$name.log"
    exit
fi
python3 -m bench.gpu --memory-sweep --resolutions 720p --steps 1 --out "$out/gpu_memory.json" 2>&1 | tee "$out/gpu_memory.log"
host_memory
python3 -m bench.gpu --out "$out/gpu.json" --max-seconds "${GPU_MAX_SECONDS:-180}" --resolutions 720p,480p \
    --paths engine,4step,whole_4step,diffusers,engine_cfg_batch --backends "" --steps 1 --warmup 1 2>&1 | tee "$out/gpu.log"
