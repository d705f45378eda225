#!/bin/sh
# The Task 1-2 FID/KID table from a trained AFHQ checkpoint, on a GPU, in one command:
#
#   sh experiments/fid_grid.sh CKPT GT_DIR [extra fid_grid.py flags]
#   sh experiments/fid_grid.sh --help     # this text and fid_grid.py's flags
#
# CKPT    a checkpoint written by train.py (e.g. results/diffusion-.../last.ckpt)
# GT_DIR  the real images to measure against (the course's: data/afhq/eval, made by dataset.py)
#
# Samples 500 images with DDPM and with DDIM for steps {10, 20, 50, 100, 1000} x
# eta {0.0, 0.2, 0.5, 1.0}, measures each FID and KID with fid/afhq_inception_v3.ckpt at 256x256
# (the course's protocol), and writes OUT_DIR/results.md (the tables), results.json,
# fid_vs_steps.png and a sample grid per setting. Environment: OUT_DIR (default: results/fid_grid
# in task1/image_diffusion_todo), PYTHON (default: python). Extra flags go to
# experiments/fid_grid.py, e.g. --gpu 1, --num_samples 1000, --batch_size 250,
# --floor_dir data/afhq/train, --extra_spacings quadratic. Relative paths are taken from where
# the script is called.
set -eu

here=$(dirname "$0")/..
case "${1:-}" in
    -h | --help)
        sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
        cd "$here" && exec "${PYTHON:-python}" -m experiments.fid_grid --help ;;
esac
if [ "$#" -lt 2 ]; then
    echo "usage: $0 CKPT GT_DIR [fid_grid.py flags]" >&2
    exit 2
fi
ckpt=$(realpath -m -- "$1")
gt_dir=$(realpath -m -- "$2")
out_dir=$(realpath -m -- "${OUT_DIR:-$here/results/fid_grid}")
shift 2

cd "$here"
exec "${PYTHON:-python}" -m experiments.fid_grid --ckpt_path "$ckpt" --gt_dir "$gt_dir" --out "$out_dir" "$@"
