#!/usr/bin/env bash
# System packages the demo and the tests need, installed with apt when missing (as root), else listed.
#   python3-venv       Debian splits venv/ensurepip out of python3
#   chromium           the graph-editor test drives ComfyUI's page in headless Chromium
#   fonts-*            so screenshots render text, including the CJK default negative prompt
#   ca-certificates    pip over TLS
# imageio-ffmpeg ships its own ffmpeg binary, so no ffmpeg package is needed.
set -euo pipefail

packages=(python3-venv make git ca-certificates chromium fonts-dejavu-core fonts-wqy-microhei)
missing=()
if command -v dpkg-query >/dev/null; then
    for pkg in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
fi
[ "${#missing[@]}" -eq 0 ] && exit 0

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    echo "warning: missing system packages (install them as root): ${missing[*]}" >&2
fi
