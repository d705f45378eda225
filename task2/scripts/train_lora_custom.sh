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

# --validation_epochs: the sample folder has 4 images, so an epoch is 4 steps. One validation draws
# 4 images x 30 denoising steps x 2 UNet passes (classifier-free guidance) = 240 one-image UNet passes;
# one training step is a forward and a backward pass, about 2-3. Every 50 epochs (200 steps, 400-600
# passes) validation costs at most ~60% of the training between two validations; the course's every
# epoch (4 steps, ~12 passes) would spend 20 times more on validation than on training.
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
