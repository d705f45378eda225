"""DiffusionModule: the training loss, the sampling loop (with classifier-free guidance) and
checkpoints for a network + noise scheduler pair."""
import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from cli import atomic_write
from network import UNet
from scheduler import DDPMScheduler, check_predictor
from tqdm import tqdm


class CheckpointError(ValueError):
    """A checkpoint file that is missing or is not one this module wrote."""


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

    def get_loss(self, x0, class_label=None, noise=None):
        """Simple loss: || target - network(x_t, t) ||^2 for a random t  (DDPM eq. 14 / Algorithm 1).

        The target is what the network predicts: the noise eps, x_0, or the posterior mean
        mu~_t(x_t, x_0) (DDPM eq. 7). x0: [B, C, H, W] in [-1, 1]; class_label: [B] or None.
        """
        t = self.var_scheduler.uniform_sample_t(x0.shape[0], x0.device)
        x_t, eps = self.var_scheduler.add_noise(x0, t, eps=noise)
        net_out = self.network(x_t, t, class_label)
        if self.predictor == "noise":
            target = eps
        elif self.predictor == "x0":
            target = x0
        else:
            target = self.var_scheduler.posterior_mean(x0, x_t, t)
        return F.mse_loss(net_out, target)

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
        generator: Optional[torch.Generator] = None,
    ):
        """Run the reverse process of `var_scheduler` from x_T ~ N(0, I).

        class_label: [batch_size] (1..num_classes) or None; generator: draws x_T and every step's
        noise (for reproducible samples). Returns x_0: [B, 3, R, R], or with return_traj the list
        [x_T, ..., x_0] (earlier entries moved to the CPU).
        """
        if class_label is not None:
            if len(class_label) != batch_size:
                raise ValueError(f"len(class_label) != batch_size: {len(class_label)} != {batch_size}")
            class_label = class_label.to(self.device)
        shape = (batch_size, 3, self.image_resolution, self.image_resolution)

        def randn():
            return torch.randn(shape, generator=generator, device=self.device)

        x_t = randn()
        traj = [x_t]
        for t in tqdm(self.var_scheduler.timesteps, desc="sampling", leave=False):
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

    def save(self, file_path, extra: Optional[dict] = None):
        """Write {"config", "state_dict"[, extra entries]} atomically: a crash never leaves a
        half-written file at file_path. `extra` must hold tensors and plain Python values only."""
        checkpoint = {"config": self.config, "state_dict": self.network.state_dict(), **(extra or {})}
        atomic_write(file_path, lambda f: torch.save(checkpoint, f))

    def load(self, file_path):
        """Rebuild network and DDPM scheduler from a checkpoint written by `save`; returns the
        whole checkpoint dict. Raises CheckpointError for a missing or unreadable file."""
        checkpoint = load_checkpoint(file_path)
        try:
            config = checkpoint["config"]
            network = UNet(**config["network"])
            network.load_state_dict(checkpoint["state_dict"])
            var_scheduler = DDPMScheduler(**config["scheduler"])
            check_predictor(config["predictor"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            reason = str(error).strip().splitlines()[0]
            raise CheckpointError(f"checkpoint {file_path} does not match this code: {reason}") from None
        self.network, self.var_scheduler, self.predictor = network, var_scheduler, config["predictor"]
        return checkpoint



def load_checkpoint(file_path) -> dict:
    """torch.load with weights_only=True (tensors and plain values only, no code runs)."""
    if not os.path.isfile(file_path):
        raise CheckpointError(f"checkpoint not found: {file_path}")
    try:
        checkpoint = torch.load(file_path, map_location="cpu", weights_only=True)
    except Exception as error:
        if "Weights only load failed" in str(error):
            reason = "it is corrupt, or holds pickled Python objects (only config + tensors load, weights_only=True)"
        else:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"cannot read checkpoint {file_path}: {reason}") from None
    if not isinstance(checkpoint, dict) or not {"config", "state_dict"} <= checkpoint.keys():
        raise CheckpointError(f"{file_path} is not a diffusion checkpoint (no config/state_dict)")
    return checkpoint
