"""Task 1-1 in one command: train a DDPM on the Swiss roll, sample with DDPM and a DDIM grid,
and measure the Chamfer distance (CD) of each against the target, as the course evaluates it.

    python run_experiment.py --recipe course --seed 0 --out ../../results/2d_course

The DDIM grid (steps x eta) uses --timestep_spacing; a second table compares every spacing
(leading, linspace, trailing, quadratic: see ddpm.ddim_timesteps) at the same steps and etas; a
third puts DPM-Solver++ and SDE-DPM-Solver++ (dpm_solver.py, orders --solver_orders), whose order 1 is
DDIM with eta 0 and 1, side by side at few network calls, on every spacing and, at --fit_calls, on
timesteps fitted to the trained model (fit_timesteps.py).
Writes OUT/results.json, OUT/results.md, OUT/model.ckpt and figures (loss, samples, CD and time
against steps, CD against steps per spacing).
"""
import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Iterator, List, Optional

import numpy as np
import torch
from tqdm import tqdm

from chamferdist import chamfer_distance
from dataset import get_data_iterator, load_twodim
from atomic_write import atomic_write_text
from ddpm import TIMESTEP_SPACINGS, BaseScheduler, DiffusionModule, check_denoises, check_eta, ddim_timesteps
from dpm_solver import SOLVER_ORDERS, SOLVER_SPACINGS, solver_orders, solver_timesteps
from fit_timesteps import ddpm_target, fit_timesteps, solver_cds
from network import SimpleNet

NUM_TRAIN_TIMESTEPS = 1000
NUM_TARGET_POINTS = 1_000_000  # the course's target set; its first NUM_EVAL_SAMPLES points are the reference
NUM_EVAL_SAMPLES = 2048
DDIM_STEPS = [10, 20, 50, 100, 1000]
DDIM_ETAS = [0.0, 0.2, 0.5, 1.0]
SOLVER_CALLS = [10, 20, 50]  # DPM-Solver++ rows: network calls
FIT_CALLS = [10]  # calls at which the solvers also take timesteps fitted to the model (fit_timesteps.py)
# The few-step CD is a sum over points dominated by the few that land off the roll, so its draws
# scatter widely; the few-step table, cheap next to the DDIM grid's 1000-step rows, takes more of them.
SOLVER_DRAWS = 20
# Sampling times are medians over --timing_rounds interleaved rounds (every sampler once per
# round, so a change of machine load mid-run affects all alike); within a round a sampler with few
# steps is called until MIN_TIMED_STEPS steps ran, since a single 10-step call is too short to time.
TIMING_ROUNDS = 3
MIN_TIMED_STEPS = 300
OUTPUTS = ("model.ckpt", "results.json", "results.md")  # what a run writes besides its figures


@dataclass
class Recipe:
    dim_hids: List[int]
    lr: float
    batch_size: int
    num_iterations: int
    warmup_steps: int
    cosine_decay: bool  # decay the learning rate to 0 along a cosine after warm-up
    ema_decay: Optional[float]  # sample with an exponential moving average of the weights
    # True: batches read in order from the target set through a DataLoader, as the course
    # notebook's training cell does (so the reference points are trained on). False: batches
    # drawn at random from an independent draw of the Swiss roll.
    batches_in_order_from_target: bool


RECIPES = {
    # The course notebook's training cell: Adam at a constant 1e-3, no warm-up, batches of 128
    # read in order from the 1M-point target, 5000 iterations.
    "course": Recipe(dim_hids=[128, 128, 128], lr=1e-3, batch_size=128, num_iterations=5000,
                     warmup_steps=0, cosine_decay=False, ema_decay=None, batches_in_order_from_target=True),
    # Ours (see README): a wider network, a 4x larger batch and 4x more iterations, a warm-up and
    # a cosine learning-rate decay so the last iterations settle, EMA weights, random batches
    # from a training set that does not hold the reference points.
    "improved": Recipe(dim_hids=[192, 192, 192], lr=2e-3, batch_size=512, num_iterations=20000,
                       warmup_steps=200, cosine_decay=True, ema_decay=0.9995, batches_in_order_from_target=False),
}


class OneLineArgumentParser(argparse.ArgumentParser):
    """Bad input gets one line on stderr and exit code 2, not a usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--recipe", default="course", choices=sorted(RECIPES),
                        help="training hyperparameters: the course's, or our improved recipe")
    parser.add_argument("--seed", type=int, default=0, help="seeds data, training and sampling")
    parser.add_argument("--out", default="results", help="output folder (created if missing)")
    parser.add_argument("--ddim_steps", type=int, nargs="+", default=DDIM_STEPS, help="DDIM step counts S")
    parser.add_argument("--etas", type=float, nargs="+", default=DDIM_ETAS,
                        help="DDIM eta values, in [0, 1] (0: deterministic; 1: DDPM's posterior variance)")
    parser.add_argument("--timestep_spacing", default="leading", choices=TIMESTEP_SPACINGS,
                        help="DDIM sub-sequence of the steps x eta grid (leading is the course's); "
                             "every spacing is compared in a second table either way")
    parser.add_argument("--solver_orders", type=int, nargs="*", default=list(SOLVER_ORDERS), choices=SOLVER_ORDERS,
                        help="DPM-Solver++ orders of the few-step table (see dpm_solver.py; none: no table); "
                             "SDE-DPM-Solver++ rows take those of them up to 2")
    parser.add_argument("--solver_calls", type=int, nargs="+", default=SOLVER_CALLS,
                        help="network calls of the DPM-Solver++ rows (each spacing, each order)")
    parser.add_argument("--fit_calls", type=int, nargs="*", default=FIT_CALLS,
                        help="network calls at which every solver row also takes timesteps fitted to the trained "
                             "model, from the quadratic ones (fit_timesteps.py; 1-2 CPU minutes per sampler; "
                             "none: no fit)")
    parser.add_argument("--solver_draws", type=int, default=SOLVER_DRAWS,
                        help="draws of x_T per row of the few-step table (its mean and standard error)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="override the recipe's number of training iterations (for quick checks)")
    parser.add_argument("--num_samples", type=int, default=NUM_EVAL_SAMPLES,
                        help="points generated per setting and reference points (the course uses 2048)")
    parser.add_argument("--sampling_seeds", type=int, default=3,
                        help="draws of x_T per setting: the spacing table gives the CD's mean and standard "
                             "error over them; the steps x eta grid shows the first draw (seeded by --seed)")
    parser.add_argument("--timing_rounds", type=int, default=TIMING_ROUNDS,
                        help="interleaved rounds over which each sampler's time is the median")
    parser.add_argument("--gpu", type=int, default=0, help="which CUDA device to use when CUDA is available")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results and model.ckpt of an earlier run in --out")
    args = parser.parse_args(argv)

    for flag, values in (("--ddim_steps", args.ddim_steps), ("--solver_calls", args.solver_calls),
                         ("--fit_calls", args.fit_calls)):
        bad_steps = [s for s in values if not 1 <= s <= NUM_TRAIN_TIMESTEPS]
        if bad_steps:
            parser.error(f"{flag} must be between 1 and {NUM_TRAIN_TIMESTEPS}, got {bad_steps[0]}")
    for eta in args.etas:
        try:
            check_eta(eta)
        except ValueError as error:
            parser.error(f"--etas: {error}")
    # every sub-sequence sampled must denoise; the solver's table covers every spacing
    sub_sequences = [("--ddim_steps", steps, args.timestep_spacing) for steps in args.ddim_steps]
    if args.solver_orders:
        sub_sequences += [("--solver_calls", calls, spacing) for calls in args.solver_calls
                          for spacing in TIMESTEP_SPACINGS]
        sub_sequences += [("--fit_calls", calls, "quadratic") for calls in args.fit_calls]  # where the fit starts
    for flag, steps, spacing in sub_sequences:
        try:
            check_denoises(ddim_timesteps(NUM_TRAIN_TIMESTEPS, steps, spacing)[0], spacing)
        except ValueError as error:
            parser.error(f"{flag} {steps}: {error}")
    if args.iterations is not None and args.iterations < 1:
        parser.error(f"--iterations must be >= 1, got {args.iterations}")
    if args.num_samples < 1:
        parser.error(f"--num_samples must be >= 1, got {args.num_samples}")
    for flag, draws in (("--sampling_seeds", args.sampling_seeds), ("--solver_draws", args.solver_draws)):
        if draws < 1:
            parser.error(f"{flag} must be >= 1, got {draws}")
    if args.timing_rounds < 1:
        parser.error(f"--timing_rounds must be >= 1, got {args.timing_rounds}")
    earlier = [name for name in OUTPUTS if os.path.exists(os.path.join(args.out, name))]
    if earlier and not args.overwrite:
        parser.error(f"--out {args.out} holds an earlier run ({', '.join(earlier)}): pass --overwrite to replace it, "
                     f"or choose another --out")
    try:
        os.makedirs(args.out, exist_ok=True)
        with tempfile.TemporaryFile(dir=args.out):
            pass
    except OSError as error:
        parser.error(f"cannot write to --out {args.out!r}: {error.strerror or error}")
    return args


def learning_rate_factor(iteration: int, recipe: Recipe) -> float:
    """Linear warm-up to 1, then constant (course) or a cosine decay to 0 (improved)."""
    if iteration < recipe.warmup_steps:
        return (iteration + 1) / recipe.warmup_steps
    if not recipe.cosine_decay:
        return 1.0
    progress = (iteration - recipe.warmup_steps) / max(1, recipe.num_iterations - recipe.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress))


def build_model(recipe: Recipe, device) -> DiffusionModule:
    network = SimpleNet(dim_in=2, dim_out=2, dim_hids=recipe.dim_hids, num_timesteps=NUM_TRAIN_TIMESTEPS)
    var_scheduler = BaseScheduler(NUM_TRAIN_TIMESTEPS, beta_1=1e-4, beta_T=0.02, mode="linear")
    return DiffusionModule(network, var_scheduler).to(device)


def training_batches(recipe: Recipe, target_points: torch.Tensor,
                     train_points: Optional[torch.Tensor] = None) -> Iterator[torch.Tensor]:
    """The recipe's batches [batch_size, 2], endlessly.

    In order from target_points [N, 2] through a DataLoader (the course notebook's way), or at
    random from train_points [M, 2], an independent draw (needed then).
    """
    if recipe.batches_in_order_from_target:
        return get_data_iterator(torch.utils.data.DataLoader(target_points, batch_size=recipe.batch_size))
    return random_batches(train_points, recipe.batch_size)


def random_batches(points: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    while True:
        yield points[torch.randint(len(points), (batch_size,))]


def train(model: DiffusionModule, batches: Iterator[torch.Tensor], recipe: Recipe, progress: bool = True):
    """Minimise compute_loss with Adam over recipe.num_iterations batches from `batches` ([B, 2] each).

    Returns (the model to sample with: the EMA copy when the recipe has one, the per-iteration losses).
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: learning_rate_factor(it, recipe))
    ema_model = copy.deepcopy(model).requires_grad_(False) if recipe.ema_decay else None
    losses = []
    model.train()
    for _ in tqdm(range(recipe.num_iterations), desc="training", disable=not progress, mininterval=1.0):
        batch = next(batches).to(model.device)
        loss = model.compute_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema_model is not None:
            for ema_param, param in zip(ema_model.network.parameters(), model.network.parameters()):
                ema_param.lerp_(param.detach(), 1 - recipe.ema_decay)
        losses.append(loss.item())
    model.eval()
    return (ema_model or model).eval(), losses


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_samplers(samplers: dict, device, rounds: int, progress: bool = True) -> dict:
    """{key: (sample_fn, num_steps)} -> {key: median seconds per call of sample_fn over `rounds` rounds}."""
    seconds = {key: [] for key in samplers}
    for _ in tqdm(range(rounds), desc="timing rounds", disable=not progress):
        for key, (sample_fn, num_steps) in samplers.items():
            calls = math.ceil(MIN_TIMED_STEPS / num_steps)
            synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                sample_fn()
            synchronize(device)
            seconds[key].append((time.perf_counter() - start) / calls)
    return {key: statistics.median(values) for key, values in seconds.items()}


def mean_and_standard_error(values: List[float]):
    """(mean, standard error of the mean); the error is None for a single value."""
    if len(values) == 1:
        return values[0], None
    return statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))


def denoises(num_train_timesteps: int, steps: int, spacing: str) -> bool:
    """False for a sub-sequence of t = 0 alone (ddpm.check_denoises), which returns x_T as x_0."""
    try:
        check_denoises(ddim_timesteps(num_train_timesteps, steps, spacing)[0], spacing)
    except ValueError:
        return False
    return True


def evaluate(model: DiffusionModule, reference: torch.Tensor, args, progress: bool = True):
    """CD against reference [N, 2] of DDPM and of DDIM for every (spacing, steps, eta), over
    args.sampling_seeds draws of x_T; the time of DDPM and of the grid's spacing
    (args.timestep_spacing) at every (steps, eta).

    Draw k of every sampler starts from seed args.seed + 1000 k, so all samplers share each x_T,
    and a sub-sequence that two spacings share (all four coincide at S = T) is sampled once.
    Returns (ddpm, ddim rows of the grid's spacing, rows of every spacing, samples of the first
    draw by key), keys "ddpm" and (spacing, steps, eta). "cd" is always the first draw's.
    """
    device = model.device
    num_train_timesteps = model.var_scheduler.num_train_timesteps
    shape = tuple(reference.shape)
    spacings = [args.timestep_spacing] + [s for s in TIMESTEP_SPACINGS if s != args.timestep_spacing]
    samplers = {"ddpm": (lambda: model.p_sample_loop(shape), num_train_timesteps)}
    for spacing in spacings:
        for eta in args.etas:
            for steps in args.ddim_steps:
                if denoises(num_train_timesteps, steps, spacing):  # no cell for x_T returned as x_0
                    samplers[(spacing, steps, eta)] = (
                        lambda steps=steps, eta=eta, spacing=spacing: model.ddim_p_sample_loop(
                            shape, num_inference_timesteps=steps, eta=eta, timestep_spacing=spacing),
                        steps,
                    )

    samples, cds, key_of_trajectory = {}, {}, {}
    for key, (sample_fn, _) in tqdm(samplers.items(), desc="sampling", disable=not progress):
        if key != "ddpm":
            spacing, steps, eta = key
            trajectory = (tuple(ddim_timesteps(num_train_timesteps, steps, spacing)[0].tolist()), eta)
            if trajectory in key_of_trajectory:
                same = key_of_trajectory[trajectory]
                samples[key], cds[key] = samples[same], cds[same]
                continue
            key_of_trajectory[trajectory] = key
        cds[key] = []
        for draw in range(args.sampling_seeds):
            torch.manual_seed(args.seed + 1000 * draw)
            sample = sample_fn().cpu()
            samples.setdefault(key, sample)
            cds[key].append(float(chamfer_distance(sample, reference)))

    timed = {key: value for key, value in samplers.items() if key == "ddpm" or key[0] == args.timestep_spacing}
    seconds = time_samplers(timed, device, args.timing_rounds, progress)

    def cd_fields(key) -> dict:
        if key not in cds:  # a sub-sequence that never denoises: no CD
            return {"cd": None, "cd_mean": None, "cd_se": None, "cds": []}
        mean, standard_error = mean_and_standard_error(cds[key])
        return {"cd": cds[key][0], "cd_mean": mean, "cd_se": standard_error, "cds": cds[key]}

    ddpm = {**cd_fields("ddpm"), "seconds": seconds["ddpm"]}
    ddim = [{"steps": steps, "eta": eta, "cd": cds[(args.timestep_spacing, steps, eta)][0],
             "seconds": seconds[(args.timestep_spacing, steps, eta)]}
            for eta in args.etas for steps in args.ddim_steps]
    spacing_rows = [{"timestep_spacing": spacing, "steps": steps, "eta": eta, **cd_fields((spacing, steps, eta))}
                    for spacing in TIMESTEP_SPACINGS for eta in args.etas for steps in args.ddim_steps]
    return ddpm, ddim, spacing_rows, samples


def evaluate_dpm_solver(model: DiffusionModule, reference: torch.Tensor, args, progress: bool = True) -> List[dict]:
    """CD of DPM-Solver++ (ODE; "sde": False) and SDE-DPM-Solver++ ("sde": True) for every (order,
    spacing, calls), and at args.fit_calls on timesteps fitted to the model ("fitted": see
    fit_timesteps.py; the row keeps them and the fit's objective before and after), over
    args.solver_draws draws of x_T, draw k seeded by args.seed + 1000 k as in evaluate (its first
    draws are the DDIM rows' x_T) -> the rows of results["dpm_solver"]; "steps" counts network calls,
    and "cd" is the first draw's. Order 1 is DDIM with eta 0 (ODE) or 1 (SDE)."""
    alphas_cumprod = model.var_scheduler.alphas_cumprod
    samplers = [(sde, order) for sde in (False, True) for order in args.solver_orders if order in solver_orders(sde)]
    settings = [(sde, order, spacing, calls) for sde, order in samplers
                for spacing in SOLVER_SPACINGS for calls in args.solver_calls]
    settings += [(sde, order, "fitted", calls) for sde, order in samplers for calls in args.fit_calls]
    target = ddpm_target(model, len(reference)) if args.fit_calls else None
    rows = []
    for sde, order, spacing, calls in tqdm(settings, desc="DPM-Solver++", disable=not progress):
        fit = {}
        if spacing == "fitted":
            start = time.perf_counter()
            timesteps, before, after = fit_timesteps(model, solver_timesteps(alphas_cumprod, calls, "quadratic"),
                                                     order, sde, target, progress=progress)
            fit = {"timesteps": timesteps.tolist(), "fit_objective": [before, after],
                   "fit_seconds": time.perf_counter() - start}
        else:
            timesteps = solver_timesteps(alphas_cumprod, calls, spacing)
        cds = solver_cds(model, timesteps, order, sde, reference,
                         [args.seed + 1000 * draw for draw in range(args.solver_draws)])
        mean, standard_error = mean_and_standard_error(cds)
        rows.append({"sde": sde, "order": order, "timestep_spacing": spacing, "steps": calls, "cd": cds[0],
                     "cd_mean": mean, "cd_se": standard_error, "cds": cds, **fit})
    return rows


def format_cd(row: Optional[dict]) -> str:
    """'mean ± SE' of a row with cd_mean and cd_se; '-' for None."""
    if row is None:
        return "-"
    return f"{row['cd_mean']:.3f}" + ("" if row["cd_se"] is None else f" ± {row['cd_se']:.3f}")


def solver_name(sde: bool, order: int) -> str:
    """'DPM-Solver++(2M)', 'SDE-DPM-Solver++(2M)', order 1 with the DDIM it equals."""
    if order == 1:
        return f"{'SDE-' if sde else ''}DPM-Solver++ order 1 (= DDIM eta {1 if sde else 0})"
    return f"{'SDE-' if sde else ''}DPM-Solver++({order}M)"


def dpm_solver_markdown(results: dict) -> str:
    """The few-step table: calls x sampler x spacing, DPM-Solver++ (ODE) and SDE-DPM-Solver++; their
    order 1 is DDIM (eta 0 and 1), on the same timesteps and draws."""
    rows = results["dpm_solver"]
    solver = {(r["sde"], r["order"], r["timestep_spacing"], r["steps"]): r for r in rows}
    samplers = sorted({(r["sde"], r["order"]) for r in rows})
    fitted = [r for r in rows if r["timestep_spacing"] == "fitted"]
    spacings = list(SOLVER_SPACINGS) + (["fitted"] if fitted else [])
    lines = ["", f"**Few network calls: DPM-Solver++ and DDIM**, Chamfer distance, mean ± standard error "
                 f"over {len(rows[0]['cds'])} draws of x_T (the first draws of the tables above). Order 1 of "
                 f"the ODE solver is DDIM with eta 0, of the SDE solver DDIM with eta 1; eta does not apply "
                 f"to the higher orders. logsnr: timesteps evenly spaced in log-SNR (the solvers only); "
                 f"fitted: timesteps fitted to this model for each sampler (fit_timesteps.py), listed below. "
                 f"DDPM (1000 calls): {format_cd(results['ddpm'])}; floor {results['floor_cd']:.3f}.",
             "", "| calls | sampler | " + " | ".join(spacings) + " |",
             "|---|---|" + "---|" * len(spacings)]
    for calls in sorted({r["steps"] for r in rows}):
        for sde, order in samplers:
            cells = [format_cd(solver.get((sde, order, spacing, calls))) for spacing in spacings]
            lines.append(f"| {calls} | {solver_name(sde, order)} | " + " | ".join(cells) + " |")
    if fitted:
        lines += ["", "**Fitted timesteps** (the fit's objective: mean CD to the model's own DDPM samples over "
                      "the fit's draws, from the quadratic timesteps to the fit):", "",
                  "| calls | sampler | timesteps | objective | fit time (s) |", "|---|---|---|---|---|"]
        lines += [f"| {r['steps']} | {solver_name(r['sde'], r['order'])} | {', '.join(map(str, r['timesteps']))} | "
                  f"{r['fit_objective'][0]:.3f} -> {r['fit_objective'][1]:.3f} | {r['fit_seconds']:.0f} |"
                  for r in fitted]
    return "\n".join(lines) + "\n"


def results_markdown(results: dict) -> str:
    steps = sorted({row["steps"] for row in results["ddim"]})
    etas = sorted({row["eta"] for row in results["ddim"]})
    by_setting = {(row["steps"], row["eta"]): row for row in results["ddim"]}

    def grid(field: str, fmt: str) -> List[str]:
        lines = ["| eta \\ steps | " + " | ".join(str(s) for s in steps) + " |",
                 "|---" * (len(steps) + 1) + "|"]
        for eta in etas:
            lines.append(f"| {eta} | " + " | ".join(format(by_setting[(s, eta)][field], fmt) for s in steps) + " |")
        return lines

    spacing_rows = {(row["timestep_spacing"], row["steps"], row["eta"]): row for row in results["spacings"]}

    def mean_pm_se(row: dict) -> str:
        if row["cd_mean"] is None:
            return "n/a (only t = 0)"
        return f"{row['cd_mean']:.3f}" + ("" if row["cd_se"] is None else f" ± {row['cd_se']:.3f}")

    spacing_table = ["| steps S | eta | " + " | ".join(TIMESTEP_SPACINGS) + " |",
                     "|---|---|" + "---|" * len(TIMESTEP_SPACINGS)]
    for eta in etas:
        for s in steps:
            row = [spacing_rows[(spacing, s, eta)] for spacing in TIMESTEP_SPACINGS]
            best = min(r["cd_mean"] for r in row if r["cd_mean"] is not None)
            cells = [f"**{mean_pm_se(r)}**" if r["cd_mean"] == best else mean_pm_se(r) for r in row]
            spacing_table.append(f"| {s} | {eta} | " + " | ".join(cells) + " |")
    num_draws = len(results["ddpm"]["cds"])

    ddpm = results["ddpm"]
    lines = [
        f"# Swiss roll, recipe `{results['recipe']}`, seed {results['seed']}",
        "",
        f"Training: {results['train_seconds']:.1f} s wall, {results['train_cpu_seconds']:.1f} s CPU (the two "
        f"differ when other work shares the machine). Floor (two independent draws of the target): "
        f"CD = {results['floor_cd']:.3f}.",
        "",
        f"**DDPM** (1000 steps): CD = {ddpm['cd']:.3f}, sampling {ddpm['seconds']:.3f} s; over {num_draws} "
        f"draws of x_T: {mean_pm_se(ddpm)}.",
        "",
        f"**DDIM Chamfer distance**, `{results['timestep_spacing']}` spacing (lower is better):",
        "",
        *grid("cd", ".3f"),
        "",
        "**DDIM sampling time** (seconds per call):",
        "",
        *grid("seconds", ".4f"),
        "",
        "**DDIM time relative to DDPM**, against the ideal S/1000:",
        "",
        "| steps S | S/1000 | measured (mean over eta) |",
        "|---|---|---|",
    ]
    for s in steps:
        ratio = statistics.mean(by_setting[(s, eta)]["seconds"] for eta in etas) / ddpm["seconds"]
        lines.append(f"| {s} | {s / NUM_TRAIN_TIMESTEPS:.3f} | {ratio:.3f} |")
    lines += [
        "",
        f"**DDIM Chamfer distance by timestep spacing**: mean ± standard error over {num_draws} draws of x_T "
        f"(the same draws for every cell; the lowest mean of each row in bold):",
        "",
        *spacing_table,
    ]
    return "\n".join(lines) + "\n"


def scatter_panel(ax, reference: torch.Tensor, samples: torch.Tensor, title: str) -> None:
    ax.scatter(reference[:, 0], reference[:, 1], s=2, c="lightgray", label="target")
    ax.scatter(samples[:, 0], samples[:, 1], s=2, c="tab:blue", label="samples")
    ax.set(title=title, xlim=(-4.5, 4.5), ylim=(-4.5, 4.5), aspect="equal", xticks=[], yticks=[])


def save_loss_figure(plt, out: str, results: dict, losses: List[float]) -> None:
    window = max(1, len(losses) // 100)
    smoothed = np.convolve(losses, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(losses, alpha=0.3, label="loss")
    ax.plot(np.arange(window - 1, len(losses)), smoothed, label=f"moving average ({window})")
    ax.set(xlabel="iteration", ylabel="noise-matching loss", yscale="log", title=f"Training loss ({results['recipe']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"), dpi=120)
    plt.close(fig)


def save_samples_figure(plt, out: str, results: dict, samples: dict, reference: torch.Tensor) -> None:
    """DDPM and DDIM at every S (the first eta) on the grid's spacing, over the target."""
    spacing, steps, etas = grid_axes(results)
    cds = {(row["steps"], row["eta"]): row["cd"] for row in results["ddim"]}
    panels = [("ddpm", f"DDPM 1000 steps\nCD {results['ddpm']['cd']:.2f}")]
    panels += [((spacing, s, etas[0]), f"DDIM {s} steps, eta {etas[0]}\nCD {cds[(s, etas[0])]:.2f}") for s in steps]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.8), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        scatter_panel(ax, reference, samples[key], title)
    axes[0][0].legend(loc="lower left", markerscale=4, fontsize=8)
    fig.suptitle(f"DDIM with {spacing} spacing")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "samples.png"), dpi=120, bbox_inches="tight")
    plt.close(fig)


def save_cd_time_figure(plt, out: str, results: dict) -> None:
    """CD and sampling time against S, one line per eta, on the grid's spacing."""
    spacing, steps, etas = grid_axes(results)
    fig, (ax_cd, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
    for eta in etas:
        rows = [r for r in results["ddim"] if r["eta"] == eta]
        ax_cd.plot([r["steps"] for r in rows], [r["cd"] for r in rows], marker="o", label=f"DDIM eta={eta}")
        ax_time.plot([r["steps"] for r in rows], [r["seconds"] for r in rows], marker="o", label=f"DDIM eta={eta}")
    ax_cd.axhline(results["ddpm"]["cd"], color="black", linestyle="--", label="DDPM (1000 steps)")
    ax_cd.axhline(results["floor_cd"], color="gray", linestyle=":", label="floor (two target draws)")
    ax_cd.set(xscale="log", yscale="log", xlabel="steps S", ylabel="Chamfer distance",
              title=f"CD against steps ({spacing} spacing)")
    ideal = [results["ddpm"]["seconds"] * s / NUM_TRAIN_TIMESTEPS for s in steps]
    ax_time.plot(steps, ideal, color="black", linestyle="--", label="DDPM time x S/1000")
    ax_time.set(xscale="log", yscale="log", xlabel="steps S", ylabel="seconds", title="Sampling time against steps")
    for ax in (ax_cd, ax_time):
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "cd_time_vs_steps.png"), dpi=120)
    plt.close(fig)


def save_spacing_figures(plt, out: str, results: dict, samples: dict, reference: torch.Tensor) -> None:
    """CD against S per spacing (one panel per eta), and every spacing's samples at the fewest S."""
    _, steps, etas = grid_axes(results)
    fig, axes = plt.subplots(1, len(etas), figsize=(4.5 * len(etas), 4), squeeze=False, sharey=True)
    for ax, eta in zip(axes[0], etas):
        for name in TIMESTEP_SPACINGS:
            rows = [r for r in results["spacings"]
                    if r["timestep_spacing"] == name and r["eta"] == eta and r["cd_mean"] is not None]
            ax.errorbar([r["steps"] for r in rows], [r["cd_mean"] for r in rows], marker="o", capsize=3,
                        yerr=[r["cd_se"] or 0 for r in rows], label=name)
        ax.axhline(results["ddpm"]["cd"], color="black", linestyle="--", label="DDPM (1000 steps)")
        ax.axhline(results["floor_cd"], color="gray", linestyle=":", label="floor")
        ax.set(xscale="log", yscale="log", xlabel="steps S", title=f"eta = {eta}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel(f"Chamfer distance (mean ± SE, {len(results['ddpm']['cds'])} draws)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"DDIM CD against steps by timestep spacing ({results['recipe']} recipe)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "cd_vs_steps_by_spacing.png"), dpi=120)
    plt.close(fig)

    # The fewest steps, every spacing: where they differ most.
    fewest = steps[0]
    fig, axes = plt.subplots(len(etas), len(TIMESTEP_SPACINGS), squeeze=False,
                             figsize=(3.2 * len(TIMESTEP_SPACINGS), 3.4 * len(etas)))
    spacing_cd = {(r["timestep_spacing"], r["steps"], r["eta"]): r["cd"] for r in results["spacings"]}
    for row, eta in zip(axes, etas):
        for ax, name in zip(row, TIMESTEP_SPACINGS):
            key = (name, fewest, eta)
            if key in samples:
                scatter_panel(ax, reference, samples[key], f"{name}, eta {eta}\nCD {spacing_cd[key]:.2f}")
            else:
                scatter_panel(ax, reference, reference[:0], f"{name}, eta {eta}\nonly t = 0: never denoises")
    fig.suptitle(f"DDIM with {fewest} steps")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "samples_by_spacing.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)


def grid_axes(results: dict):
    """(the grid's spacing, its steps sorted, its etas sorted)."""
    return (results["timestep_spacing"], sorted({row["steps"] for row in results["ddim"]}),
            sorted({row["eta"] for row in results["ddim"]}))


def save_figures(out: str, results: dict, losses: List[float], samples: dict, reference: torch.Tensor):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    save_loss_figure(plt, out, results, losses)
    save_samples_figure(plt, out, results, samples, reference)
    save_cd_time_figure(plt, out, results)
    save_spacing_figures(plt, out, results, samples, reference)
    if results.get("dpm_solver"):
        save_dpm_solver_figure(plt, out, results)


def save_dpm_solver_figure(plt, out: str, results: dict) -> None:
    """CD against network calls on the quadratic timesteps: DPM-Solver++ and SDE-DPM-Solver++ of every
    order (order 1: DDIM with eta 0 and 1), each on its fitted timesteps where fitted, DDPM and the floor."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))

    def draw(sde, order, spacing, x_shift=1.0, **style):
        rows = [r for r in results["dpm_solver"]
                if (r["sde"], r["order"], r["timestep_spacing"]) == (sde, order, spacing)]
        ax.errorbar([r["steps"] * x_shift for r in rows], [r["cd_mean"] for r in rows],
                    yerr=[r["cd_se"] or 0 for r in rows], color=f"C{order}", marker="s" if sde else "o", capsize=3,
                    **style)

    for sde, order in sorted({(r["sde"], r["order"]) for r in results["dpm_solver"]}):
        draw(sde, order, "quadratic", linestyle="--" if sde else "-", label=solver_name(sde, order))
        # hollow markers: the same sampler on timesteps fitted to this model, drawn a little to the
        # right of the quadratic rows, which they would hide
        draw(sde, order, "fitted", x_shift=1.05, linestyle="none", markerfacecolor="none", markersize=9)
    if any(r["timestep_spacing"] == "fitted" for r in results["dpm_solver"]):
        ax.plot([], [], color="gray", marker="o", markerfacecolor="none", markersize=9, linestyle="none",
                label="the same sampler, fitted timesteps")
    ax.axhline(results["ddpm"]["cd_mean"], color="black", linestyle=":", label="DDPM (1000 calls)")
    ax.axhline(results["floor_cd"], color="gray", linestyle=":", label="floor")
    ax.set(xscale="log", yscale="log", xlabel="network calls", ylabel="Chamfer distance (mean ± SE)",
           title=f"Few-step samplers, {results['recipe']} recipe, seed {results['seed']}\n"
                 f"lines: quadratic timesteps; hollow: fitted timesteps")
    calls = sorted({r["steps"] for r in results["dpm_solver"]})
    ax.set_xticks(calls, labels=[str(c) for c in calls], minor=False)
    ax.set_xticks([], minor=True)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "cd_vs_calls_dpm_solver.png"), dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    recipe = RECIPES[args.recipe]
    if args.iterations is not None:
        recipe = replace(recipe, num_iterations=args.iterations)
    device = torch.device(f"cuda:{args.gpu}" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        # a 2D MLP gains little from a second thread, and OpenMP threads that spin-wait for each
        # other on a busy machine make the timings erratic
        torch.set_num_threads(1)

    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    target_points = load_twodim(NUM_TARGET_POINTS, "swiss_roll")
    train_points = None if recipe.batches_in_order_from_target else load_twodim(NUM_TARGET_POINTS, "swiss_roll")
    reference = target_points[: args.num_samples]
    floor_cd = float(chamfer_distance(target_points[args.num_samples: 2 * args.num_samples], reference))

    model = build_model(recipe, device)
    start, start_cpu = time.perf_counter(), time.process_time()
    sampling_model, losses = train(model, training_batches(recipe, target_points, train_points), recipe)
    train_seconds, train_cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    sampling_model.save(os.path.join(args.out, "model.ckpt"))

    ddpm, ddim, spacing_rows, samples = evaluate(sampling_model, reference, args)
    results = {"recipe": args.recipe, "seed": args.seed, "train_seconds": train_seconds,
               "floor_cd": floor_cd, "ddpm": ddpm, "ddim": ddim,
               "train_cpu_seconds": train_cpu_seconds, "recipe_config": asdict(recipe),
               "num_samples": args.num_samples, "timestep_spacing": args.timestep_spacing,
               "spacings": spacing_rows}
    if args.solver_orders:
        results["dpm_solver"] = evaluate_dpm_solver(sampling_model, reference, args)
    atomic_write_text(os.path.join(args.out, "results.json"), json.dumps(results, indent=2) + "\n")
    markdown = results_markdown(results) + (dpm_solver_markdown(results) if args.solver_orders else "")
    atomic_write_text(os.path.join(args.out, "results.md"), markdown)
    save_figures(args.out, results, losses, samples, reference)

    print(markdown)
    print(f"Results, model and figures (loss.png, samples.png, cd_time_vs_steps.png, cd_vs_steps_by_spacing.png, "
          f"samples_by_spacing.png, cd_vs_calls_dpm_solver.png) are in {os.path.abspath(args.out)}")
    return results


if __name__ == "__main__":
    # the one place errors of the code below become one line (bad flags: parse_args, exit 2)
    try:
        main(sys.argv[1:])
    except (ValueError, OSError) as error:
        sys.exit(f"run_experiment.py: error: {error}")
