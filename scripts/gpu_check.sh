#!/usr/bin/env bash
# One command for a fresh GPU node (≤ 10 minutes): collectives under NCCL, bench step on CUDA
# (fp32 / bf16 / bf16+channels_last / +compile), bench train --device cuda at 256², a 2-epoch
# multimix train with use_gpu=true through Ray + evaluate. Writes out/gpu-check/gpu_check.json
# and gpu_check.md (or --out DIR). Runs from a plain copy of the repository (not pip-installed):
# the repo goes on PYTHONPATH; Ray comes from .carry/ray-py312.tar.xz (scripts/pack_ray.sh) when
# python3 cannot import it; without Ray the Ray parts are skipped, without CUDA the CUDA parts.
#
# For a GPU machine without network (Python 3.12, torch+CUDA, no Ray/boto3/isal): on a machine
# with network, in the repository root,
#     scripts/pack_ray.sh                      # once: .carry/ray-py312.tar.xz (~31 MiB)
# then copy the working tree with .carry/ to the GPU machine and run there (600 s limit):
#     PYTHONUNBUFFERED=1 scripts/gpu_check.sh --out $OUT/gpu-check \
#         --work /tmp/mm-gpu-check 2>&1 | tee $OUT/console.txt
# ($OUT/gpu-check/gpu_check.json, gpu_check.md and the logs are the results; scripts/README.md.)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CARRY=.carry/ray-py312.tar.xz
if [ "${MULTIMIX_NO_RAY:-0}" = "0" ] && ! "$PY" -c "import ray" 2>/dev/null && [ -f "$CARRY" ]; then
    SITE=${MULTIMIX_RAY_SITE:-/tmp/multimix-ray-site}
    if [ ! -f "$SITE/.unpacked" ]; then
        echo "[gpu-check] unpacking $CARRY into $SITE"
        mkdir -p "$SITE" && xz -dc -T0 "$CARRY" | tar -C "$SITE" -xf - && touch "$SITE/.unpacked"
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$SITE/bin:$PATH"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" scripts/gpu_check.py "$@"
