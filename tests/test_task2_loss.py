"""Task 2: the loss the DreamBooth loop logs, checked against a hand computation for every batch of a
run that turns on the flags no other test trains with together: gradient accumulation, gradient
checkpointing, Min-SNR weighting, bf16, prior preservation, the text encoder's LoRA, random flips,
--num_train_epochs and a data-loader worker."""
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import TASK2, load_module
from task2_tiny_pipeline import read_tensorboard

SNR_GAMMA, PRIOR_LOSS_WEIGHT = 5.0, 0.5


def alpha_bar_by_hand(t):
    """alpha_bar_t of Stable Diffusion's "scaled_linear" schedule (the tiny pipeline's):
    beta_t = (sqrt(0.00085) + t / 999 (sqrt(0.012) - sqrt(0.00085)))^2, alpha_bar_t = prod_{s <= t} (1 - beta_s)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)[t]


def loss_by_hand(model_pred, noise, timesteps):
    """Ruiz et al. Eq. 2 with Min-SNR weights (Hang et al. Eq. 8), batch = [instance, class]:
    w(t) ||eps - eps_theta||^2 of the instance + PRIOR_LOSS_WEIGHT x the same of the class image."""
    alpha_bar = alpha_bar_by_hand(timesteps)
    snr = alpha_bar / (1 - alpha_bar)
    weight = torch.clamp(snr, max=SNR_GAMMA) / snr
    squared_error = ((model_pred.double() - noise.double()) ** 2).mean(dim=(1, 2, 3))
    instance, prior = weight * squared_error
    return instance + PRIOR_LOSS_WEIGHT * prior


def reset_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    """This test runs the script in-process with bf16: it must not inherit the accelerate state an
    earlier in-process run left in this worker, and later tests must not inherit its own."""
    reset_accelerate_state()
    yield
    reset_accelerate_state()


def test_the_logged_loss_is_the_min_snr_prior_preservation_loss_by_hand(tiny_model, tmp_path, monkeypatch,
                                                                          fresh_accelerate_state):
    dreambooth = load_module(TASK2, "train_dreambooth_lora")
    training = sys.modules["training"]
    noised, losses = [], []
    noise_and_target, dreambooth_loss = training.noise_and_target, dreambooth.dreambooth_loss

    def record_noise(noise_scheduler, latents, noise_offset=0.0):
        noisy, timesteps, target = noise_and_target(noise_scheduler, latents, noise_offset)
        noised.append((latents.detach().clone(), noisy.detach().clone(), timesteps.clone(), target.detach().clone()))
        return noisy, timesteps, target

    def record_loss(args, noise_scheduler, model_pred, target, timesteps):
        loss = dreambooth_loss(args, noise_scheduler, model_pred, target, timesteps)
        losses.append((model_pred.detach().clone(), loss.item()))
        return loss

    monkeypatch.setattr(training, "noise_and_target", record_noise)
    monkeypatch.setattr(dreambooth, "dreambooth_loss", record_loss)
    out = tmp_path / "out"
    dreambooth.main([f"--pretrained_model_name_or_path={tiny_model}", f"--output_dir={out}",
                     f"--instance_data_dir={TASK2 / 'sample_data' / 'dreambooth-cat'}",
                     "--instance_prompt=a photo of sks cat", "--with_prior_preservation",
                     f"--class_data_dir={tmp_path / 'class'}", "--class_prompt=a photo of a cat",
                     "--num_class_images=2", f"--prior_loss_weight={PRIOR_LOSS_WEIGHT}", "--train_text_encoder",
                     "--gradient_accumulation_steps=2", "--gradient_checkpointing", f"--snr_gamma={SNR_GAMMA}",
                     "--mixed_precision=bf16", "--random_flip",
                     "--num_train_epochs=1", "--dataloader_num_workers=1", "--resolution=32", "--num_inference_steps=2",
                     "--learning_rate=1e-3", "--seed=0"])

    # 4 examples (4 instance photos, 2 class images), batch 1, 2 batches per step: 2 steps in the one epoch.
    assert len(noised) == len(losses) == 4
    scalars, _ = read_tensorboard(out / "logs" / "train_dreambooth_lora")
    assert [step for step, _ in scalars["loss"]] == [1, 2]
    for step, logged in scalars["loss"]:
        by_hand = []
        for (latents, noisy, timesteps, noise), (model_pred, loss) in zip(noised[2 * step - 2:2 * step],
                                                                           losses[2 * step - 2:2 * step]):
            assert model_pred.shape == (2, 4, 16, 16)  # [instance, class]
            # The noise is the one that made the UNet's input: z_t = sqrt(alpha_bar) z_0 + sqrt(1 - alpha_bar) eps.
            alpha_bar = alpha_bar_by_hand(timesteps).view(-1, 1, 1, 1)
            expected = alpha_bar.sqrt() * latents.double() + (1 - alpha_bar).sqrt() * noise.double()
            assert torch.allclose(noisy.double(), expected, atol=0.03 * expected.abs().max().item())
            by_hand.append(loss_by_hand(model_pred, noise, timesteps).item())
            assert loss == pytest.approx(by_hand[-1], rel=1e-5)
        # The logged loss of a step is the mean over its accumulated batches.
        assert logged == pytest.approx(sum(by_hand) / 2, rel=1e-5)
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert any(key.startswith("text_encoder.") for key in weights)
