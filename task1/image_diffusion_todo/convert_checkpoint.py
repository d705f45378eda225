"""Convert a course (Lab-1) checkpoint into this project's format.

    python convert_checkpoint.py LAB1.ckpt converted.ckpt [--predictor noise]

The course's DiffusionModule.save pickles the network and scheduler objects; this reads them
without running any code from the file (course_checkpoint.py), rebuilds the UNet and the noise
schedule they describe, and writes {"config", "state_dict"} (loadable with weights_only=True)
atomically. sampling.py, train.py and fid_grid.py read Lab-1 files directly too: converting once
saves the checks at every load and gives a file that needs nothing but tensors.
"""
from pathlib import Path

from cli import ArgumentParser, UsageError, run
from model import CheckpointError, DiffusionModule
from scheduler import PREDICTORS


def describe(ddpm: DiffusionModule) -> str:
    net, sched = ddpm.network.config, ddpm.var_scheduler.config
    cfg = f", CFG with {net['num_classes']} classes" if net["use_cfg"] else ""
    betas = "" if sched["mode"] == "cosine" else f" {sched['beta_1']:g}..{sched['beta_T']:g}"
    return (f"UNet ch={net['ch']} ch_mult={net['ch_mult']} attn={net['attn']} num_res_blocks={net['num_res_blocks']} "
            f"at {net['image_resolution']}x{net['image_resolution']}{cfg}; {sched['mode']} betas{betas}, "
            f"T={sched['num_train_timesteps']}; predictor {ddpm.predictor}")


def main(args):
    source, target = Path(args.input), Path(args.output)
    if target.exists():
        raise UsageError(f"{target} already exists: choose another output path (nothing was written)")
    if not target.parent.is_dir():
        raise UsageError(f"no folder {target.parent} to write {target.name} into: create it or choose another output path")
    ddpm = DiffusionModule(None, None)
    checkpoint = ddpm.load(source, predictor=args.predictor)
    if checkpoint.get("format") != "course":
        raise UsageError(f"{source} is already in this project's format: use it as it is")
    ddpm.save(target)
    if checkpoint["config"]["predictor"] is not None:
        origin = "from the file"
    else:
        origin = "from --predictor" if args.predictor else "the course's default"
    print(f"Converted {source} -> {target}: {describe(ddpm)} ({origin})")


def parse_args(argv=None):
    parser = ArgumentParser(description="Convert a course (Lab-1) checkpoint into this project's format, "
                                        "without running code from it.")
    parser.add_argument("input", help="checkpoint written by the course's DiffusionModule.save")
    parser.add_argument("output", help="where to write the converted checkpoint (must not exist)")
    parser.add_argument("--predictor", choices=PREDICTORS, default=None,
                        help="what the network predicts, for a file that does not record it (the 2025 "
                             "template's; default then: noise, the course's); must agree with a file that does")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run(main, parse_args(), (UsageError, CheckpointError))
