#!/usr/bin/env bash
# Original recipe scripts/run_i3d_baseline_300k_4gpu.sh: trains i3d_baseline_8x8_IN_pretrain_300k_4gpu
# (README 30-view top-1/top-5 72.0/90.1). Config DBG_kinetics_resnet_4gpu_c2d_nonlocal_300k.yaml
# (4 GPUs, global batch 32, 300000 iterations) with the script's
# overrides: NONLOCAL.CONV3_NONLOCAL False NONLOCAL.CONV4_NONLOCAL False MODEL.VIDEO_ARC_CHOICE 2 TRAIN.DROPOUT_RATE 0.0.
set -euo pipefail
source "$(dirname "$0")/common.sh"

run_train run_i3d_baseline_300k_4gpu i3d_baseline_8x8_IN_pretrain_300k_4gpu \
    TRAIN.PARAMS_FILE "${PRETRAINED}/r50_pretrain_c2_model_iter450450_clean.pkl" \
    VIDEO_DECODER_THREADS 5 \
    "$@"
