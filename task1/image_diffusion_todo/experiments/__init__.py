"""Tooling beyond the course's assignment, run from the folder above as a package:

    python -m experiments.image_experiment   the whole Task 1-2 experiment on a CPU stand-in
    python -m experiments.fid_grid           FID and KID for DDPM and DDIM steps x eta, one checkpoint
    python -m experiments.train_classifier   an Inception-v3 FID network for any AFHQ-layout data
    python -m experiments.standin_dataset    the stand-in dataset (shapes in AFHQ's layout)
    experiments/fid_grid.sh                  the FID grid on a GPU with the course's settings

The course's own files (train.py, sampling.py, fid/measure_fid.py, ...) stay in the folder
above; these modules import them as the course runs them (flat, from that folder).
"""
