#!/usr/bin/env bash
# Start the two engines in the background and return once both answer:
#   blend engine (reuses cached chunk KV) on http://127.0.0.1:8000/v1
#   full  engine (plain prefill)          on http://127.0.0.1:8001/v1
# Usage: ./launch_engines.sh [--backend auto|embedded|vllm] [--model PATH] [--blend-port N] [--full-port N]
#        ./launch_engines.sh --docs DIR   (also your .txt/.md files in DIR, next to ffmpeg/)
#        ./launch_engines.sh status | stop
# Paths are taken relative to the folder you run it from. Logs and pid files live in .engines/.
# See `python -m helpers.launcher --help` for every option.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
PY=$here/.venv/bin/python
[ -x "$PY" ] || PY=python3
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m helpers.launcher "$@"
