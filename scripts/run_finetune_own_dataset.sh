#!/usr/bin/env bash
# Fine-tune a released Kinetics model on your own dataset (UCF-101, HMDB, in-house data), the
# original's way (modify_blob_rm.py): BN running statistics, momentum and the 400-class pred are
# dropped, pred is re-initialised for NUM_CLASSES classes (Gaussian 0.01, bias 0), BN is trained
# and re-estimated with precise BN. Usage:
#   NUM_CLASSES=101 TRAIN_LIST=ucf/train.txt VAL_LIST=ucf/val.txt KINETICS_ROOT=ucf/videos \
#       bash scripts/run_finetune_own_dataset.sh [KEY VALUE ...] [vnl-train options]
# Lists are '<path> <label>' lines with labels 0..NUM_CLASSES-1. The schedule below is a short
# example (tune it for your data); add --accumulate A (dividing NUM_GPUS) to fit in less memory; BN groups stay the config's.
# For the frozen-BN variant, use BASE=... with a MODEL.USE_AFFINE model (e.g.
# i3d_nonlocal_32x4_I3D_pretrain_400k) and --ftvideo instead of --blob-rm.
set -euo pipefail
source "$(dirname "$0")/common.sh"

BASE=${BASE:-i3d_nonlocal_8x8_IN_pretrain_400k}
RELEASED=${RELEASED:-data/released/${BASE}.pkl}  # the downloaded released .pkl
NUM_CLASSES=${NUM_CLASSES:?set NUM_CLASSES to the number of classes of your dataset}
CONVERSION=${CONVERSION:---blob-rm}
INIT="${CHECKPOINTS}/finetune_${BASE}_init.pkl"

mkdir -p "${CHECKPOINTS}"
vnl-convert "${RELEASED}" "${INIT}" "${CONVERSION}"

run_train "finetune_${BASE}_${NUM_CLASSES}cls" "${BASE}" \
    TRAIN.PARAMS_FILE "${INIT}" \
    MODEL.NUM_CLASSES "${NUM_CLASSES}" \
    SOLVER.BASE_LR 0.005 \
    SOLVER.STEP_SIZES "[10000, 5000, 5000]" \
    SOLVER.MAX_ITER 20000 \
    CHECKPOINT.CHECKPOINT_PERIOD 2000 \
    TRAIN.EVAL_PERIOD 2000 \
    VIDEO_DECODER_THREADS 5 \
    "$@"
