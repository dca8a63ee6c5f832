# Shared settings of the training recipes (sourced by run_*.sh; not run directly).
#
# Every path can be changed through the environment, e.g.
#   KINETICS_ROOT=/data/k400 PRETRAINED=/data/pretrained_model bash scripts/run_i3d_nlnet_400k.sh
# and extra vnl-train options or KEY VALUE overrides go after the script name, e.g.
#   bash scripts/run_i3d_nlnet_400k.sh --accumulate 8 --resume
#
# KINETICS_ROOT   folder the list paths are taken under (the videos, short side 256 as in the
#                 original's DATASET.md)
# TRAIN_LIST      '<path> <label>' lines of the training split
# VAL_LIST        the validation split (TRAIN.EVAL_PERIOD validation and TEST_AFTER_TRAIN)
# PRETRAINED      the original's pretrained_model/ folder (pretrained_model.tar.gz, unpacked)
# CHECKPOINTS     one output folder per recipe goes here (checkpoints/, logs)
# LAUNCH          the launcher: "vnl-train" for one process (default), or e.g.
#                 "torchrun --nproc_per_node=8 $(command -v vnl-train)" for DDP on 8 GPUs

KINETICS_ROOT=${KINETICS_ROOT:-data/kinetics}
TRAIN_LIST=${TRAIN_LIST:-${KINETICS_ROOT}/trainlist.txt}
VAL_LIST=${VAL_LIST:-${KINETICS_ROOT}/vallist.txt}
PRETRAINED=${PRETRAINED:-data/pretrained_model}
CHECKPOINTS=${CHECKPOINTS:-data/checkpoints}
LAUNCH=${LAUNCH:-vnl-train}

# run_train RECIPE_NAME ZOO_NAME [KEY VALUE ...] [vnl-train options]
# Trains the released model ZOO_NAME with its original recipe (config file + the original
# script's overrides, recorded in the zoo) into ${CHECKPOINTS}/RECIPE_NAME.
run_train() {
    local recipe=$1 model=$2
    shift 2
    local out="${CHECKPOINTS}/${recipe}"
    mkdir -p "${out}"
    # shellcheck disable=SC2086  # LAUNCH may be a command with arguments
    ${LAUNCH} --model "${model}" \
        --train-list "${TRAIN_LIST}" --val-list "${VAL_LIST}" --data-root "${KINETICS_ROOT}" \
        --output-dir "${out}" \
        "$@" 2>&1 | tee -a "${out}/log.txt"
}
