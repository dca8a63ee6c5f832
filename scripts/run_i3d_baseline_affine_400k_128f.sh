#!/usr/bin/env bash
# Original recipe scripts/run_i3d_baseline_affine_400k_128f.sh: trains i3d_baseline_128x1_I3D_pretrain_400k
# (README 30-view top-1/top-5 75.2/92.0). Config DBG_kinetics_resnet_8gpu_c2d_nonlocal_affine_400k.yaml
# (8 GPUs, global batch 16, 400000 iterations) with the script's
# overrides: NONLOCAL.CONV3_NONLOCAL False NONLOCAL.CONV4_NONLOCAL False TRAIN.VIDEO_LENGTH 128 TRAIN.SAMPLE_RATE 1 TEST.VIDEO_LENGTH 128 TEST.SAMPLE_RATE 1 MODEL.MODEL_NAME resnet_video_org MODEL.VIDEO_ARC_CHOICE 2 TRAIN.DROPOUT_RATE 0.5.
set -euo pipefail
source "$(dirname "$0")/common.sh"

run_train run_i3d_baseline_affine_400k_128f i3d_baseline_128x1_I3D_pretrain_400k \
    TRAIN.PARAMS_FILE "${PRETRAINED}/run_i3d_baseline_400k_32f/affine_model_400k.pkl" \
    VIDEO_DECODER_THREADS 2 \
    "$@"
