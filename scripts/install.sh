#!/usr/bin/env bash
# Create .venv (if missing) and install HistoMet with its test and export extras.
# torch==2.13.0 is pinned: a looser spec would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/python - <<'PY'
import numpy
major = int(numpy.__version__.split(".")[0])
if major >= 2:
    raise SystemExit(
        f"numpy {numpy.__version__} is installed, but the Triton Python backend "
        "needs numpy < 2; reinstall with: pip install 'numpy<2'"
    )
PY
