#!/usr/bin/env bash
# Original recipe scripts/run_i3d_baseline_300k.sh: trains i3d_baseline_8x8_IN_pretrain_300k
# (README 30-view top-1/top-5 73.2/90.8). Config DBG_kinetics_resnet_8gpu_c2d_nonlocal_300k.yaml
# (8 GPUs, global batch 64, 300000 iterations) with the script's
# overrides: NONLOCAL.CONV3_NONLOCAL False NONLOCAL.CONV4_NONLOCAL False MODEL.VIDEO_ARC_CHOICE 2 TRAIN.DROPOUT_RATE 0.5.
set -euo pipefail
source "$(dirname "$0")/common.sh"

run_train run_i3d_baseline_300k i3d_baseline_8x8_IN_pretrain_300k \
    TRAIN.PARAMS_FILE "${PRETRAINED}/r50_pretrain_c2_model_iter450450_clean.pkl" \
    VIDEO_DECODER_THREADS 5 \
    "$@"
