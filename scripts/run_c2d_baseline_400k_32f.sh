#!/usr/bin/env bash
# Original recipe scripts/run_c2d_baseline_400k_32f.sh: trains c2d_baseline_32x2_IN_pretrain_400k
# (README 30-view top-1/top-5 72.0/90.0). Config DBG_kinetics_resnet_8gpu_c2d_nonlocal_400k.yaml
# (8 GPUs, global batch 64, 400000 iterations) with the script's
# overrides: NONLOCAL.CONV3_NONLOCAL False NONLOCAL.CONV4_NONLOCAL False TRAIN.VIDEO_LENGTH 32 TRAIN.SAMPLE_RATE 2 TEST.VIDEO_LENGTH 32 TEST.SAMPLE_RATE 2 MODEL.MODEL_NAME resnet_video_org MODEL.VIDEO_ARC_CHOICE 1 TRAIN.DROPOUT_RATE 0.5.
set -euo pipefail
source "$(dirname "$0")/common.sh"

run_train run_c2d_baseline_400k_32f c2d_baseline_32x2_IN_pretrain_400k \
    TRAIN.PARAMS_FILE "${PRETRAINED}/r50_pretrain_c2_model_iter450450_clean.pkl" \
    VIDEO_DECODER_THREADS 5 \
    "$@"
