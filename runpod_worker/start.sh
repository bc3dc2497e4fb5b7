#!/usr/bin/env bash
# Container entry point of the RunPod worker image (runpod_worker/Dockerfile).
# Starts ComfyUI once (inside `python -m runpod_worker`), then serves jobs. Arguments are passed on to the
# runpod SDK, e.g. `start.sh --rp_serve_api --rp_api_host 0.0.0.0` for a local test API, or
# `start.sh --test_input '{"input": {...}}'` for one job.
set -euo pipefail

PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${PACK_DIR}${PYTHONPATH:+:${PYTHONPATH}}"
export COMFYUI_DIR="${COMFYUI_DIR:-/opt/ComfyUI}"

# models: `python -m runpod_worker` reports where they are looked for and what it found (the most common
# failure on RunPod), and falls back to /runpod-volume when WAN_CKPT_DIR names a missing folder

# outputs: on a network volume when one is mounted, so any worker can answer `status`
if [ -z "${WAN_OUTPUT_DIR:-}" ] && [ -d /runpod-volume ]; then
    export WAN_OUTPUT_DIR=/runpod-volume/outputs
fi
mkdir -p "${WAN_OUTPUT_DIR:-/workspace/outputs}" 2>/dev/null || true

# local test API without editing the template: SERVE_API_LOCALLY=true
if [ "${SERVE_API_LOCALLY:-false}" = "true" ] && [ "$#" -eq 0 ]; then
    set -- --rp_serve_api --rp_api_host 0.0.0.0
fi

exec python -u -m runpod_worker "$@"
