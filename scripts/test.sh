#!/usr/bin/env bash
# The test suite on CPU (Pallas kernels in interpret mode). Sets up .venv on
# first use.
set -euo pipefail
source "$(dirname "$0")/env.sh"
python -m pytest -n 2 --dist loadfile "$@"
