"""DiffusionModule: the training loss, the sampling loop (with classifier-free guidance) and
checkpoints for a network + noise scheduler pair."""
import os
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from atomic_write import atomic_write
from course_checkpoint import CourseCheckpointError, read_course_checkpoint
from network import UNet
from scheduler import DDPMScheduler, check_predictor
from tqdm import tqdm


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, refused (it asks to run code), or neither this
    project's nor a course (Lab-1) checkpoint this code can rebuild."""


class DiffusionModule(nn.Module):
    def __init__(self, network, var_scheduler, **kwargs):
        super().__init__()
        self.network = network
        self.var_scheduler = var_scheduler
        self.predictor = kwargs.get("predictor", "noise")
        check_predictor(self.predictor)

    @property
    def device(self):
        return next(self.network.parameters()).device

    @property
    def image_resolution(self):
        return self.network.image_resolution

    def _noised_prediction(self, x0, class_label=None, noise=None):
        """t ~ U{0..T-1}, x_t ~ q(x_t | x_0) with noise eps (DDPM Algorithm 1, lines 3-5), and the
        network's output at (x_t, t). x0: [B, C, H, W] in [-1, 1]; class_label: [B] or None."""
        t = self.var_scheduler.uniform_sample_t(x0.shape[0], x0.device)
        x_t, eps = self.var_scheduler.add_noise(x0, t, eps=noise)
        return t, x_t, eps, self.network(x_t, t, class_label)

    def get_loss_noise(self, x0, class_label=None, noise=None):
        """|| eps - eps_theta(x_t, t) ||^2  (DDPM eq. 14, the "simple" loss)."""
        _, _, eps, eps_pred = self._noised_prediction(x0, class_label, noise)
        return F.mse_loss(eps_pred, eps)

    def get_loss_x0(self, x0, class_label=None, noise=None):
        """|| x_0 - x0_theta(x_t, t) ||^2."""
        _, _, _, x0_pred = self._noised_prediction(x0, class_label, noise)
        return F.mse_loss(x0_pred, x0)

    def get_loss_mean(self, x0, class_label=None, noise=None):
        """|| mu~_t(x_t, x_0) - mu_theta(x_t, t) ||^2, mu~ the posterior mean (DDPM eq. 7)."""
        t, x_t, _, mean_pred = self._noised_prediction(x0, class_label, noise)
        return F.mse_loss(mean_pred, self.var_scheduler.posterior_mean(x0, x_t, t))

    def get_loss(self, x0, class_label=None, noise=None):
        """The loss of this module's predictor (get_loss_noise, get_loss_x0 or get_loss_mean)."""
        if self.predictor == "noise":
            return self.get_loss_noise(x0, class_label, noise)
        if self.predictor == "x0":
            return self.get_loss_x0(x0, class_label, noise)
        if self.predictor == "mean":
            return self.get_loss_mean(x0, class_label, noise)
        check_predictor(self.predictor)

    def predict(self, x_t, t, class_label=None, guidance_scale: float = 1.0):
        """The network output at x_t: [B, C, H, W], with classifier-free guidance when
        guidance_scale != 1: out = out(null) + w (out(class) - out(null))  (Ho & Salimans 2022, eq. 6)."""
        if class_label is None or guidance_scale == 1.0:
            return self.network(x_t, t, class_label)
        # one batch of 2B: the first half unconditional (label 0 = null), the second conditional
        labels = torch.cat([torch.zeros_like(class_label), class_label])
        out_uncond, out_cond = self.network(torch.cat([x_t, x_t]), t, labels).chunk(2)
        return out_uncond + guidance_scale * (out_cond - out_uncond)

    @torch.no_grad()
    def sample(
        self,
        batch_size,
        return_traj=False,
        class_label: Optional[torch.Tensor] = None,
        guidance_scale: Optional[float] = 1.0,
        *,
        generator: Union[None, torch.Generator, Sequence[torch.Generator]] = None,
        progress: bool = True,
    ):
        """Run the reverse process of `var_scheduler` from x_T ~ N(0, I).

        class_label: [batch_size] (1..num_classes) or None: a class-conditional (use_cfg) network
        then gets the null label 0, the condition it learnt for "no class"; guidance_scale None
        means 1 (no guidance). generator: draws x_T and every step's noise (for reproducible
        samples); a list of batch_size generators, as diffusers' pipelines take, gives image b its
        own stream (x_T[b] and b's noise at every step come from generator[b] alone), so an image
        does not depend on the others in its batch. progress: show a progress bar over the steps.
        Returns x_0: [B, 3, R, R], or with return_traj the list [x_T, ..., x_0] (earlier entries
        moved to the CPU).
        """
        if guidance_scale is None:
            guidance_scale = 1.0
        if class_label is None and self.network.use_cfg:
            class_label, guidance_scale = torch.zeros(batch_size, dtype=torch.long), 1.0
        if class_label is not None:
            if len(class_label) != batch_size:
                raise ValueError(f"len(class_label) != batch_size: {len(class_label)} != {batch_size}")
            class_label = class_label.to(self.device)
        shape = (batch_size, 3, self.image_resolution, self.image_resolution)

        def randn():
            return randn_per_image(shape, generator, self.device)

        x_t = randn()
        traj = [x_t]
        for t in tqdm(self.var_scheduler.timesteps, desc="sampling", leave=False, disable=not progress):
            t = t.to(self.device)
            net_out = self.predict(x_t, t, class_label, guidance_scale)
            x_t = self.var_scheduler.step(x_t, t, net_out, self.predictor, noise=randn())
            if return_traj:
                traj[-1] = traj[-1].cpu()
                traj.append(x_t)
        return traj if return_traj else x_t

    @property
    def config(self) -> dict:
        """Everything needed to rebuild this module: network, noise schedule, predictor."""
        return {"network": self.network.config, "scheduler": self.var_scheduler.config, "predictor": self.predictor}

    def save(self, file_path, *, extra: Optional[dict] = None):
        """Write {"config", "state_dict"[, extra entries]} atomically: a crash never leaves a
        half-written file at file_path. `extra` must hold tensors and plain Python values only."""
        checkpoint = {"config": self.config, "state_dict": self.network.state_dict(), **(extra or {})}
        atomic_write(file_path, lambda f: torch.save(checkpoint, f))

    def load(self, file_path, *, predictor: Optional[str] = None):
        """Rebuild network and DDPM scheduler from a checkpoint (this project's, or a course Lab-1
        file: see load_checkpoint); returns the whole checkpoint dict.

        predictor: for a file that does not record one (a 2025 Lab-1 file; default "noise", the
        course's); one that contradicts the file's raises CheckpointError. Raises CheckpointError
        for a missing, unreadable or foreign file.
        """
        checkpoint = load_checkpoint(file_path)
        config = checkpoint["config"]
        stored = config.get("predictor")
        if predictor is not None and stored is not None and predictor != stored:
            raise CheckpointError(f"predictor {predictor!r} contradicts {file_path}, trained with predictor {stored!r}")
        predictor = stored or predictor or "noise"
        try:
            network = UNet(**config["network"])
            network.load_state_dict(checkpoint["state_dict"])
            var_scheduler = DDPMScheduler(**config["scheduler"])
            check_predictor(predictor)
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            reason = str(error).strip().splitlines()[0]
            raise CheckpointError(f"checkpoint {file_path} does not match this code: {reason}") from None
        self.network, self.var_scheduler, self.predictor = network, var_scheduler, predictor
        return checkpoint


def randn_per_image(shape, generator: Union[None, torch.Generator, Sequence[torch.Generator]], device) -> torch.Tensor:
    """N(0, I) samples of shape [B, ...]: all from one generator (or torch's global one), or, for a
    list of B generators, row b from generator[b] alone."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=device)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}: give one per image")
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=device) for g in generator])


def load_checkpoint(file_path) -> dict:
    """A checkpoint as {"config", "state_dict", ...}, without running code from the file.

    This project's files ({"config", "state_dict"[, "train_state"]}, written by save) load with
    torch.load(weights_only=True). A course file ({"hparams": pickled network and scheduler,
    "state_dict"}, written by the course's DiffusionModule.save) is read by
    course_checkpoint.read_course_checkpoint's restricted unpickler; its config["predictor"] is
    None when the file does not record one.
    """
    if not os.path.isfile(file_path):
        raise CheckpointError(f"checkpoint not found: {file_path}")
    try:
        checkpoint = torch.load(file_path, map_location="cpu", weights_only=True)
    except Exception as error:
        if "Weights only load failed" not in str(error):
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise CheckpointError(f"cannot read checkpoint {file_path}: {reason}") from None
        # pickled objects: a course checkpoint, or something that must not be loaded
        try:
            checkpoint = read_course_checkpoint(file_path)
        except CourseCheckpointError as course_error:
            raise CheckpointError(f"cannot read checkpoint {file_path}: {course_error}") from None
    if not isinstance(checkpoint, dict) or not {"config", "state_dict"} <= checkpoint.keys():
        raise CheckpointError(f"{file_path} is not a diffusion checkpoint (no config/state_dict)")
    return checkpoint
