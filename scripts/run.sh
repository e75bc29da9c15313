#!/usr/bin/env bash
# The main job on its embedded CPU default: the kernel benchmark. Sets up
# .venv on first use; extra arguments go to the benchmark.
set -euo pipefail
source "$(dirname "$0")/env.sh"
python eval/bench_kernels.py "$@"
