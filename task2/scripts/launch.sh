# Sourced by the three wrappers: `launch SCRIPT ARGS...` runs task2/SCRIPT under `accelerate launch`
# with every launcher setting given, so no `accelerate config` file is needed and no question asked.
#
# Environment:
#   MIXED_PRECISION   no (the course's setting) | fp16 | bf16; fp16 needs a CUDA GPU
#   NUM_PROCESSES     processes, one per GPU (default 1); a step then sees NUM_PROCESSES x batch images
#   MAIN_PROCESS_PORT port the processes meet on when NUM_PROCESSES > 1 (default 29500)
TASK2_DIR=$(cd "$(dirname "$0")/.." && pwd)
MIXED_PRECISION=${MIXED_PRECISION:-no}
NUM_PROCESSES=${NUM_PROCESSES:-1}
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}

case "$NUM_PROCESSES" in
  '' | *[!0-9]* | 0) echo "error: NUM_PROCESSES must be a positive integer, got '$NUM_PROCESSES'" >&2; exit 1 ;;
esac
case "$MIXED_PRECISION" in
  no | fp16 | bf16) ;;
  *) echo "error: MIXED_PRECISION must be no, fp16 or bf16, got '$MIXED_PRECISION'" >&2; exit 1 ;;
esac

launch() {
  script=$1
  shift
  # Several processes start through torchrun (accelerate's --multi_gpu launcher); on a machine
  # without CUDA the training script joins them on the CPU over gloo.
  distributed=""
  if [ "$NUM_PROCESSES" -gt 1 ]; then
    distributed="--multi_gpu --main_process_port=$MAIN_PROCESS_PORT"
  fi
  # $distributed is unquoted on purpose: it is zero, or two, separate flags.
  accelerate launch --quiet --num_processes="$NUM_PROCESSES" --num_machines=1 --dynamo_backend=no \
    --mixed_precision="$MIXED_PRECISION" $distributed "$TASK2_DIR/$script" "$@"
}
