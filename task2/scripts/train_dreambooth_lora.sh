#!/bin/sh
# DreamBooth + LoRA on one subject (Task 2-2), with the course's settings: "a photo of a sks cat".
#
#   cd task2 && sh scripts/train_dreambooth_lora.sh
#   INSTANCE_DIR=~/my-dog sh scripts/train_dreambooth_lora.sh --instance_prompt="a photo of sks dog" \
#       --validation_prompt="a photo of sks dog on the beach"
#   sh scripts/train_dreambooth_lora.sh --with_prior_preservation --class_prompt="a photo of a cat"
#
# Environment overrides: MODEL_NAME, INSTANCE_DIR, CLASS_DIR (class images for --with_prior_preservation;
# missing ones are generated there), OUTPUT_DIR, and MIXED_PRECISION, NUM_PROCESSES, MAIN_PROCESS_PORT
# (see launch.sh). Extra flags go to train_dreambooth_lora.py and win over the ones below.
set -eu
. "$(dirname "$0")/launch.sh"

MODEL_NAME=${MODEL_NAME:-CompVis/stable-diffusion-v1-4}
INSTANCE_DIR=${INSTANCE_DIR:-$TASK2_DIR/sample_data/dreambooth-cat}
CLASS_DIR=${CLASS_DIR:-$TASK2_DIR/runs/class_images_cat}
OUTPUT_DIR=${OUTPUT_DIR:-$TASK2_DIR/runs/dreambooth_cat}

launch train_dreambooth_lora.py \
  --pretrained_model_name_or_path="$MODEL_NAME" \
  --instance_data_dir="$INSTANCE_DIR" \
  --class_data_dir="$CLASS_DIR" \
  --output_dir="$OUTPUT_DIR" \
  --instance_prompt="a photo of a sks cat" \
  --resolution=512 \
  --train_batch_size=1 \
  --gradient_accumulation_steps=1 \
  --checkpointing_steps=100 \
  --learning_rate=1e-4 \
  --lr_scheduler="constant" \
  --lr_warmup_steps=0 \
  --max_train_steps=500 \
  --validation_prompt="A photo of sks cat in a bucket" \
  --validation_epochs=50 \
  --checkpoints_total_limit=2 \
  --seed=0 \
  "$@"
