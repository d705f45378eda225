#!/bin/sh
# LoRA on a visual style from a Hugging Face dataset (Task 2-1, option 1), with the course's settings.
#
#   cd task2 && sh scripts/train_lora.sh                       # the course's run (GPU, internet)
#   sh scripts/train_lora.sh --max_train_steps=200 --rank=8    # extra flags go to train_lora.py and win
#
# Environment overrides: MODEL_NAME, DATASET_NAME (a hub name or a local dataset folder), OUTPUT_DIR,
# MIXED_PRECISION (no | fp16 | bf16; fp16 needs a CUDA GPU).
set -eu
TASK2_DIR=$(cd "$(dirname "$0")/.." && pwd)

MODEL_NAME=${MODEL_NAME:-CompVis/stable-diffusion-v1-4}
DATASET_NAME=${DATASET_NAME:-lambdalabs/naruto-blip-captions}
OUTPUT_DIR=${OUTPUT_DIR:-$TASK2_DIR/runs/sd-naruto-model-lora}
MIXED_PRECISION=${MIXED_PRECISION:-no}

# Explicit launcher flags: no `accelerate config` file is needed and no question is asked.
accelerate launch --quiet --num_processes=1 --num_machines=1 --dynamo_backend=no \
  --mixed_precision="$MIXED_PRECISION" "$TASK2_DIR/train_lora.py" \
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
