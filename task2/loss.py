"""The training objective: noise a latent, and the (Min-SNR weighted) regression loss on the UNet's output."""
import torch
import torch.nn.functional as F


def noise_and_target(noise_scheduler, latents, noise_offset=0.0):
    """Draw t ~ U{0..T-1} and eps ~ N(0, I); return x_t, t and the UNet's regression target.

    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps   (Ho et al. 2020, Eq. 4); latents, x_t: [B, C, h, w].
    The target is eps (epsilon-prediction, SD 1.x) or v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0
    (v-prediction, SD 2.x). ``noise_offset`` adds noise_offset * N(0, 1) per image and channel to eps
    (offset noise), so that the model learns to shift an image's mean brightness, which zero-mean
    noise never asks of it.
    """
    noise = torch.randn_like(latents)
    if noise_offset:
        noise += noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device,
                                            dtype=latents.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              device=latents.device).long()
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction type {noise_scheduler.config.prediction_type}")
    return noisy_latents, timesteps, target


def diffusion_loss(model_pred, target, timesteps, noise_scheduler, snr_gamma=None):
    """Mean squared error between prediction and target, [B, C, h, w] -> scalar.

    With ``snr_gamma``, each sample is weighted by min(SNR(t), gamma) / SNR(t) (Min-SNR, Hang et al. 2023,
    Eq. 8), with SNR(t) = alpha_bar_t / (1 - alpha_bar_t); for v-prediction the denominator is SNR(t) + 1.
    """
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
    if snr_gamma is None:
        return per_sample.mean()
    alpha_bar = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alpha_bar / (1 - alpha_bar)
    if noise_scheduler.config.prediction_type == "v_prediction":
        weight = torch.clamp(snr, max=snr_gamma) / (snr + 1)
    else:
        weight = torch.clamp(snr, max=snr_gamma) / snr
    return (per_sample * weight).mean()
