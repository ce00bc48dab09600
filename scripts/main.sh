#!/usr/bin/env bash
# The main job: train a small U-Net on the bundled digits, sample a grid, report FID. Creates .venv on first use.
# `scripts/main.sh --latent` runs the latent-diffusion chain instead (train-vae, train --latent, grid, PSNR, FID).
# Extra arguments go to `diffusekit demo` (see `scripts/main.sh --help`).
set -euo pipefail
DIFFUSEKIT_EXTRAS="${DIFFUSEKIT_EXTRAS:-dev,eval}"
export DIFFUSEKIT_EXTRAS
source "$(dirname "$0")/env.sh"
cd "$ROOT"
exec diffusekit demo "$@"
