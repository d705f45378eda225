#!/bin/sh
# LoRA on a visual style from a Hugging Face dataset (Task 2-1, option 1), with the course's settings.
#
#   cd task2 && sh scripts/train_lora.sh                       # the course's run (GPU, internet)
#   sh scripts/train_lora.sh --max_train_steps=200 --rank=8    # extra flags go to train_lora.py and win
#   NUM_PROCESSES=2 sh scripts/train_lora.sh                   # on 2 GPUs
#
# Environment overrides: MODEL_NAME, DATASET_NAME (a hub name or a local dataset folder), OUTPUT_DIR,
# and MIXED_PRECISION, NUM_PROCESSES, MAIN_PROCESS_PORT (see launch.sh).
set -eu
. "$(dirname "$0")/launch.sh"

MODEL_NAME=${MODEL_NAME:-CompVis/stable-diffusion-v1-4}
DATASET_NAME=${DATASET_NAME:-lambdalabs/naruto-blip-captions}
OUTPUT_DIR=${OUTPUT_DIR:-$TASK2_DIR/runs/sd-naruto-model-lora}

launch train_lora.py \
  --pretrained_model_name_or_path="$MODEL_NAME" \
  --output_dir="$OUTPUT_DIR" \
  --dataset_name="$DATASET_NAME" \
  --caption_column="text" \
  --resolution=512 \
  --random_flip \
  --train_batch_size=1 \
  --num_train_epochs=100 \
  --validation_epochs=1 \
  --checkpointing_steps=2000 \
  --learning_rate=1e-04 \
  --lr_scheduler="constant" \
  --lr_warmup_steps=0 \
  --seed=42 \
  --checkpoints_total_limit=2 \
  --validation_prompt="a cute bear" \
  "$@"
