#!/usr/bin/env bash
# Original scripts/run_test_multicrop.sh: the fully-convolutional 30-view test (10 clips x 3
# crops of 256x256) of the 8x8 I3D non-local model trained by run_i3d_nlnet_400k.sh
# (README: 74.7/91.6). Usage:
#   bash scripts/run_test_multicrop.sh [WEIGHTS] [vnl-test options] [KEY VALUE ...]
# WEIGHTS is a checkpoint written by vnl-train (.pt; default: the last one of
# run_i3d_nlnet_400k.sh) or a Caffe2 .pkl (a released file or c2_model_iter<N>.pkl), which is
# converted first. The original ran it on 4 GPUs with 8 clips per GPU; vnl-test's default batch
# is that per-GPU batch. Under torchrun the videos are sharded across processes.
set -euo pipefail
source "$(dirname "$0")/common.sh"

MODEL=${MODEL:-i3d_nonlocal_8x8_IN_pretrain_400k}
WEIGHTS=${1:-${CHECKPOINTS}/run_i3d_nlnet_400k/checkpoints/model_iter400000.pt}
[ $# -gt 0 ] && shift
if [[ "${WEIGHTS}" == *.pkl ]]; then
    converted="${WEIGHTS%.pkl}.pt"
    vnl-convert "${WEIGHTS}" "${converted}" --model "${MODEL}"
    WEIGHTS=${converted}
fi
vnl-test --weights "${WEIGHTS}" --list "${VAL_LIST}" --data-root "${KINETICS_ROOT}" \
    --results "${WEIGHTS%.pt}_test.h5" \
    "$@"
