#!/bin/sh
# LoRA on a visual style from your own image folder (Task 2-1, option 2), with the course's settings.
# The folder holds train/*.png and train/metadata.jsonl with one {"file_name": ..., "text": caption}
# per line (the datasets "imagefolder" layout); see sample_data/artistic-custom.
#
#   cd task2 && sh scripts/train_lora_custom.sh
#   TRAIN_DATA_DIR=~/my-style sh scripts/train_lora_custom.sh --max_train_steps=300
#
# Environment overrides: MODEL_NAME, TRAIN_DATA_DIR, OUTPUT_DIR, and MIXED_PRECISION, NUM_PROCESSES,
# MAIN_PROCESS_PORT (see launch.sh). Extra flags go to train_lora.py and win over the ones below.
set -eu
. "$(dirname "$0")/launch.sh"

MODEL_NAME=${MODEL_NAME:-CompVis/stable-diffusion-v1-4}
TRAIN_DATA_DIR=${TRAIN_DATA_DIR:-$TASK2_DIR/sample_data/artistic-custom}
OUTPUT_DIR=${OUTPUT_DIR:-$TASK2_DIR/runs/artistic_custom}

# --validation_epochs=50: the sample folder's epoch is 4 steps, and one validation (4 images x 30
# denoising steps with guidance) costs far more UNet passes than 4 training steps.
launch train_lora.py \
  --pretrained_model_name_or_path="$MODEL_NAME" \
  --output_dir="$OUTPUT_DIR" \
  --train_data_dir="$TRAIN_DATA_DIR" \
  --caption_column="text" \
  --resolution=512 \
  --random_flip \
  --train_batch_size=1 \
  --num_train_epochs=100 \
  --validation_epochs=50 \
  --checkpointing_steps=2000 \
  --learning_rate=1e-04 \
  --lr_scheduler="constant" \
  --lr_warmup_steps=0 \
  --seed=42 \
  --checkpoints_total_limit=2 \
  --validation_prompt="a house" \
  "$@"
