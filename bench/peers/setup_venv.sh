#!/usr/bin/env bash
# Create or update bench/.venv-peers with llm-compressor (see requirements.txt, constraints.txt).
# Idempotent: a stamp holding the hash of the two files skips the install when nothing changed.
# Usage: bench/peers/setup_venv.sh [python3]   (PEERS_VENV=<dir> installs elsewhere)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${PEERS_VENV:-$here/../.venv-peers}"
python="${1:-python3}"
stamp="$venv/.peers-setup"
want="$(cat "$here/requirements.txt" "$here/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$venv/bin/python" ]]; then
    exit 0
fi
test -x "$venv/bin/python" || "$python" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q -r "$here/requirements.txt" -c "$here/constraints.txt"
"$venv/bin/python" -c "import llmcompressor, transformers; print('peer venv: llmcompressor', \
llmcompressor.__version__, 'transformers', transformers.__version__)"
echo "$want" > "$stamp"
