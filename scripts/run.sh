#!/usr/bin/env bash
# The main job on its embedded default: LLSA pixel-DiT training on the bundled
# digits (8x8 = 64 pixel tokens), about 3.5 minutes on a 2-core CPU. Sets up
# .venv on first use; extra arguments go to train/llsa_dit.py (e.g.
# --workdir=... or --config.num_steps=...).
set -euo pipefail
source "$(dirname "$0")/env.sh"
python train/llsa_dit.py "$@"
