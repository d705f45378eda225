"""Run sampling.py's main() once for each argument list, in every process of one torchrun launch.

    torchrun --standalone --nproc_per_node 2 image_sampling_worker.py '[["--ckpt_path", ...], ...]'

One launch so serves several sampling runs (torchrun and its processes take 10-20 s to start on a
busy 2-core machine). Run from inside task1/image_diffusion_todo, as sampling.py is.
"""
import json
import os
import sys

sys.path.insert(0, os.getcwd())
import sampling  # noqa: E402  (sampling.py's folder is the working directory)

for argv in json.loads(sys.argv[1]):
    sampling.main(sampling.parse_args(argv))
sampling.PartialState().destroy_process_group()
