#!/usr/bin/env bash
# Original recipe scripts/run_i3d_nlnet_affine_400k.sh: trains i3d_nonlocal_32x4_I3D_pretrain_400k
# (README 30-view top-1/top-5 76.5/92.6). Config DBG_kinetics_resnet_8gpu_c2d_nonlocal_affine_400k.yaml
# (8 GPUs, global batch 16, 400000 iterations) with the script's
# overrides: NONLOCAL.CONV3_NONLOCAL True NONLOCAL.CONV4_NONLOCAL True MODEL.VIDEO_ARC_CHOICE 2 TRAIN.DROPOUT_RATE 0.5.
set -euo pipefail
source "$(dirname "$0")/common.sh"

run_train run_i3d_nlnet_affine_400k i3d_nonlocal_32x4_I3D_pretrain_400k \
    TRAIN.PARAMS_FILE "${PRETRAINED}/run_i3d_baseline_400k/affine_model_400k.pkl" \
    VIDEO_DECODER_THREADS 2 \
    "$@"
