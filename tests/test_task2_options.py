"""Task 2: the options of the diffusers example scripts do what the examples do, checked in-process on
the tiny pipeline without training: EXIF rotation, offset noise, v-prediction, --variant, the AdamW
flags and --scale_lr, --lora_dropout, --image_interpolation_mode, --dataset_config_name and
--max_train_samples; --help's defaults, the LoRA file's permissions, the class images' size and
precision, validation in eval mode, and an error raised in a data-loader worker."""
import contextlib
import json
import os
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import TASK2, load_module

CPU = SimpleNamespace(mixed_precision="no", device=torch.device("cpu"))  # what load_models asks of an Accelerator


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")


def common_flags(tiny_model, tmp_path):
    return [f"--pretrained_model_name_or_path={tiny_model}", f"--output_dir={tmp_path / 'out'}", "--resolution=32",
            "--mixed_precision=no", "--report_to=none"]


def save_rotated_photo(path):
    """A JPEG as a phone stores a portrait photo: landscape pixels plus EXIF orientation 6 ("rotate 90
    degrees clockwise to view"). Upright it is 32 wide and 64 high, red above and blue below; the stored
    pixels are that turned a quarter counter-clockwise: red on the left, blue on the right."""
    upright = Image.new("RGB", (32, 64), (255, 0, 0))
    upright.paste((0, 0, 255), (0, 32, 32, 64))
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    stored.save(path, exif=exif, quality=95)
    assert stored.size == (64, 32)


def assert_upright(pixels):
    """pixels: [3, 32, 32] in [-1, 1], the centre crop of the upright photo: red rows on top, blue below
    (the sideways photo would be red on the left, blue on the right)."""
    red, blue = pixels[0], pixels[2]
    assert red[:8].min() > 0.5 and blue[:8].max() < -0.5, "the top of the image is not red"
    assert blue[-8:].min() > 0.5 and red[-8:].max() < -0.5, "the bottom of the image is not blue"


def test_a_rotated_exif_photo_reaches_the_model_upright(tiny_model, tokenizer, tmp_path):
    # DreamBooth: the photos of the subject.
    (tmp_path / "subject").mkdir()
    save_rotated_photo(tmp_path / "subject" / "portrait.jpg")
    dreambooth = load_module(TASK2, "train_dreambooth_lora")
    args = dreambooth.parse_args([*common_flags(tiny_model, tmp_path), "--center_crop",
                                  f"--instance_data_dir={tmp_path / 'subject'}",
                                  "--instance_prompt=a photo of sks cat"])
    assert_upright(dreambooth.training_dataset(args, tokenizer)[0]["instance_pixels"])

    # LoRA: an image folder with captions.
    (tmp_path / "style" / "train").mkdir(parents=True)
    save_rotated_photo(tmp_path / "style" / "train" / "portrait.jpg")
    (tmp_path / "style" / "train" / "metadata.jsonl").write_text(json.dumps({"file_name": "portrait.jpg",
                                                                              "text": "a boat"}))
    train_lora = load_module(TASK2, "train_lora")
    args = train_lora.parse_args([*common_flags(tiny_model, tmp_path), "--center_crop",
                                  f"--train_data_dir={tmp_path / 'style'}"])
    dataset = train_lora.load_captioned_images(args)
    assert_upright(train_lora.training_dataset(args, dataset, tokenizer)[0]["pixel_values"])


def test_image_interpolation_mode_picks_the_resampling_filter(tiny_model, tmp_path):
    """A 1-pixel checkerboard halved: nearest keeps pure black and white, lanczos averages to grey."""
    images = load_module(TASK2, "images")
    train_lora = load_module(TASK2, "train_lora")
    checkerboard = Image.fromarray(((torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2 * 255)
                                   .to(torch.uint8).numpy()).convert("RGB")
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "train" / "metadata.jsonl").write_text("")
    halved = {}
    for mode in ("nearest", "lanczos"):
        args = train_lora.parse_args([*common_flags(tiny_model, tmp_path), f"--train_data_dir={tmp_path / 'data'}",
                                      "--center_crop", f"--image_interpolation_mode={mode}"])
        halved[mode] = images.image_transforms(args)(checkerboard)
    assert set(halved["nearest"].unique().tolist()) <= {-1.0, 1.0}
    assert halved["lanczos"].abs().max() < 0.1


def test_noise_offset_adds_one_constant_per_image_and_channel():
    """eps = N(0, I) + offset * N(0, 1) per (image, channel): the spatial mean of each of the 8x8 maps has
    variance 1/64 + offset^2, while the variance within a map stays 1 (2048 maps: about 3% error)."""
    from diffusers import DDPMScheduler

    loss = load_module(TASK2, "loss")
    scheduler = DDPMScheduler(num_train_timesteps=1000)  # epsilon-prediction: the target is the noise
    latents = torch.zeros(512, 4, 8, 8)
    torch.manual_seed(0)
    _, _, plain = loss.noise_and_target(scheduler, latents)
    _, _, offset = loss.noise_and_target(scheduler, latents, noise_offset=0.5)
    assert plain.mean(dim=(2, 3)).var().item() == pytest.approx(1 / 64, rel=0.15)
    assert offset.mean(dim=(2, 3)).var().item() == pytest.approx(1 / 64 + 0.25, rel=0.15)
    assert offset.var(dim=(2, 3)).mean().item() == pytest.approx(1.0, rel=0.05)


def test_variant_and_prediction_type_reach_the_loaded_models(tiny_model, tmp_path):
    """A model folder with only fp16-variant weight files loads with --variant=fp16 (and not without);
    --prediction_type=v_prediction makes the target v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0."""
    model = tmp_path / "variant"
    shutil.copytree(tiny_model, model)
    for weights in [*model.glob("*/diffusion_pytorch_model.safetensors"), *model.glob("*/model.safetensors")]:
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    train_lora = load_module(TASK2, "train_lora")
    models, loss = load_module(TASK2, "models"), load_module(TASK2, "loss")
    flags = [*common_flags(model, tmp_path), f"--train_data_dir={TASK2 / 'sample_data' / 'artistic-custom'}"]
    with pytest.raises(models.UsageError):  # the model has no variant-less weights
        models.load_models(train_lora.parse_args(flags), CPU)

    args = train_lora.parse_args([*flags, "--variant=fp16", "--prediction_type=v_prediction"])
    _, noise_scheduler, _, _, unet = models.load_models(args, CPU)
    assert unet.config.sample_size == 16 and noise_scheduler.config.prediction_type == "v_prediction"
    x_0 = torch.randn(8, 4, 4, 4)
    torch.manual_seed(1)
    x_t, t, target = loss.noise_and_target(noise_scheduler, x_0)
    torch.manual_seed(1)
    eps = torch.randn_like(x_0)  # the same draw noise_and_target made first
    alpha_bar = noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(x_t, alpha_bar.sqrt() * x_0 + (1 - alpha_bar).sqrt() * eps, atol=1e-6)
    assert torch.allclose(target, alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x_0, atol=1e-6)


def test_adam_flags_scale_lr_and_lora_dropout(tiny_model, tmp_path):
    from diffusers import UNet2DConditionModel

    dreambooth = load_module(TASK2, "train_dreambooth_lora")
    models, training = load_module(TASK2, "models"), load_module(TASK2, "training")
    args = dreambooth.parse_args([*common_flags(tiny_model, tmp_path),
                                  f"--instance_data_dir={TASK2 / 'sample_data' / 'dreambooth-cat'}",
                                  "--instance_prompt=a photo of sks cat", "--learning_rate=1e-4", "--scale_lr",
                                  "--train_batch_size=2", "--gradient_accumulation_steps=3", "--adam_beta1=0.8",
                                  "--adam_beta2=0.99", "--adam_epsilon=1e-6", "--adam_weight_decay=0.05",
                                  "--lora_dropout=0.25"])
    optimizer = training.make_optimizer(args, [torch.nn.Parameter(torch.zeros(1))], num_processes=2)
    group = optimizer.param_groups[0]
    # --scale_lr: batch 2 x accumulation 3 x 2 processes = 12 images per step.
    assert group["lr"] == pytest.approx(1e-4 * 12)
    assert group["betas"] == (0.8, 0.99) and group["eps"] == 1e-6 and group["weight_decay"] == 0.05

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    models.add_lora(unet, args.rank, models.UNET_LORA_TARGETS, args.lora_dropout)
    dropouts = [m for name, m in unet.named_modules() if name.endswith("lora_dropout.default")]
    assert dropouts and all(isinstance(m, torch.nn.Dropout) and m.p == 0.25 for m in dropouts)


def test_dataset_config_name_and_max_train_samples(tiny_model, tmp_path):
    """A local dataset with two configurations (README.md's `configs`); --dataset_config_name picks one,
    --max_train_samples draws that many of its images, the same ones for the same --seed."""
    folder = tmp_path / "two-styles"
    for config, captions in (("boats", ["a boat", "a ship", "a raft"]), ("trees", ["an oak", "a pine", "a fir"])):
        (folder / config).mkdir(parents=True)
        rows = []
        for i, caption in enumerate(captions):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / config / f"{i}.png")
            rows.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
        (folder / config / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: boats\n  data_dir: boats\n"
                                      "- config_name: trees\n  data_dir: trees\n---\n")
    train_lora = load_module(TASK2, "train_lora")

    def captions(*flags):
        args = train_lora.parse_args([*common_flags(tiny_model, tmp_path), f"--dataset_name={folder}", *flags])
        return train_lora.load_captioned_images(args)["text"]

    assert sorted(captions("--dataset_config_name=trees")) == ["a fir", "a pine", "an oak"]
    two = captions("--dataset_config_name=trees", "--max_train_samples=2", "--seed=3")
    assert len(two) == 2 and set(two) < {"a fir", "a pine", "an oak"}
    assert captions("--dataset_config_name=trees", "--max_train_samples=2", "--seed=3") == two


def test_checkpoints_of_the_earlier_layout_still_resume(tiny_model, tmp_path):
    """Checkpoints written before the portable layout hold peft's names (``unet.<module>.lora_A.weight``,
    ``text_encoder.encoder.layers...``, transformers 5's paths): load_lora_weights restores every tensor
    from them, and a DreamBooth resume with --train_text_encoder accepts them."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    dreambooth = load_module(TASK2, "train_dreambooth_lora")
    models, lora_weights = load_module(TASK2, "models"), load_module(TASK2, "lora_weights")

    def adapted_models():
        unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
        text_encoder = CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder")
        models.add_lora(unet, 4, models.UNET_LORA_TARGETS)
        models.add_lora(text_encoder, 4, models.TEXT_ENCODER_LORA_TARGETS)
        return unet, text_encoder

    trained_unet, trained_text_encoder = adapted_models()
    torch.manual_seed(0)
    for model in (trained_unet, trained_text_encoder):
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    StableDiffusionPipeline.save_lora_weights(checkpoint, unet_lora_layers=lora_weights.lora_layers(trained_unet),
                                              text_encoder_lora_layers=lora_weights.lora_layers(trained_text_encoder))
    saved = load_file(checkpoint / "pytorch_lora_weights.safetensors")
    assert "text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight" in saved  # the earlier layout
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in saved
    unet, text_encoder = adapted_models()
    lora_weights.load_lora_weights(checkpoint, unet, text_encoder)
    for trained, restored in ((trained_unet, unet), (trained_text_encoder, text_encoder)):
        assert lora_weights.lora_layers(trained).keys() == lora_weights.lora_layers(restored).keys()
        assert all(torch.equal(lora_weights.lora_layers(trained)[k], lora_weights.lora_layers(restored)[k])
                   for k in lora_weights.lora_layers(trained))

    args = dreambooth.parse_args([*common_flags(tiny_model, tmp_path), "--train_text_encoder",
                                  f"--instance_data_dir={TASK2 / 'sample_data' / 'dreambooth-cat'}",
                                  "--instance_prompt=a photo of sks cat", "--resume_from_checkpoint=checkpoint-2"])
    assert args.resume_path == checkpoint


def test_help_shows_the_defaults_the_scripts_use(tiny_model, tmp_path, capsys):
    train_lora = load_module(TASK2, "train_lora")
    with pytest.raises(SystemExit) as exit_info:
        train_lora.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "diffusers example" not in text
    (tmp_path / "metadata.jsonl").write_text("")
    args = train_lora.parse_args([*common_flags(tiny_model, tmp_path), f"--train_data_dir={tmp_path}"])
    for flag in ("learning_rate", "train_batch_size", "num_train_epochs", "lr_warmup_steps", "validation_epochs",
                 "checkpointing_steps", "rank", "max_grad_norm"):
        # the flag's own help: up to the next flag with a metavar
        shown = re.search(rf"(?<!\[)--{flag} {flag.upper()} (?:(?! --[a-z_0-9]+ [A-Z]).)*?\(default: ([^)]*)\)", text)
        assert shown, flag
        assert shown.group(1) == str(getattr(args, flag)), flag


def test_lora_files_get_the_permissions_the_umask_gives(tiny_model, tmp_path):
    from diffusers import UNet2DConditionModel

    models, lora_weights = load_module(TASK2, "models"), load_module(TASK2, "lora_weights")
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    models.add_lora(unet, 4, models.UNET_LORA_TARGETS)
    for umask, expected in ((0o022, 0o644), (0o077, 0o600)):
        previous = os.umask(umask)
        try:
            lora_weights.save_lora_weights(tmp_path / f"umask-{umask:o}", unet)
        finally:
            os.umask(previous)
        assert (tmp_path / f"umask-{umask:o}" / "pytorch_lora_weights.safetensors").stat().st_mode & 0o777 == expected


def test_class_images_are_drawn_at_the_models_own_size_and_in_fp16_on_cuda(tiny_model, tmp_path):
    """The tiny model's native size is 32 (UNet sample size 16 x VAE factor 2); --resolution=16 must not
    shrink the class images (they are resized with the training images)."""
    dreambooth = load_module(TASK2, "train_dreambooth_lora")
    args = dreambooth.parse_args([*common_flags(tiny_model, tmp_path), "--resolution=16",
                                  f"--instance_data_dir={TASK2 / 'sample_data' / 'dreambooth-cat'}",
                                  "--instance_prompt=a photo of sks cat", "--with_prior_preservation",
                                  f"--class_data_dir={tmp_path / 'class'}", "--class_prompt=a photo of a cat",
                                  "--num_inference_steps=1"])
    accelerator = SimpleNamespace(device=torch.device("cpu"), process_index=0, is_local_main_process=True)
    dreambooth.draw_class_images(args, accelerator, [tmp_path / "class_0000.png"])
    assert Image.open(tmp_path / "class_0000.png").size == (32, 32)
    assert dreambooth.class_image_dtype(args, cuda_available=True) == torch.float16
    assert dreambooth.class_image_dtype(args, cuda_available=False) == torch.float32
    args.prior_generation_precision = "bf16"
    assert dreambooth.class_image_dtype(args, cuda_available=True) == torch.bfloat16


def test_validation_draws_one_image_per_call_with_lora_dropout_off(tiny_model, tmp_path, monkeypatch):
    models, validation = load_module(TASK2, "models"), load_module(TASK2, "validation")
    args = SimpleNamespace(pretrained_model_name_or_path=str(tiny_model), revision=None, variant=None, cache_dir=None,
                           prediction_type=None, validation_prompt="a house", resolution=32, num_inference_steps=2,
                           num_validation_images=2, seed=0)
    pipeline = models.load_pipeline(args, torch.float32)
    models.add_lora(pipeline.unet, 4, models.UNET_LORA_TARGETS, dropout=0.5)
    torch.manual_seed(0)
    for name, parameter in pipeline.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)
    pipeline.unet.train()  # as the training loop leaves it
    accelerator = SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext)
    prompts = []
    call = type(pipeline).__call__

    def recording_call(self, prompt, **kwargs):
        prompts.append(prompt)
        return call(self, prompt, **kwargs)

    monkeypatch.setattr(type(pipeline), "__call__", recording_call)
    first = validation.draw_validation_images(args, accelerator, pipeline)
    pipeline.unet.train()
    second = validation.draw_validation_images(args, accelerator, pipeline)
    assert prompts == ["a house"] * 4  # one image per call
    # Dropout on would draw other images each time; off, the same seed draws the same images.
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, second))


def test_an_unreadable_image_in_a_data_loader_worker_ends_in_one_line(tmp_path, capsys):
    """--dataloader_num_workers > 0: the error crosses from the worker process to the script's entry point,
    which prints its message alone, with no traceback."""
    dreambooth = load_module(TASK2, "train_dreambooth_lora")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a PNG")
    dataset = dreambooth.DreamBoothDataset([broken], torch.zeros(4, dtype=torch.long), [], None, lambda image: image)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=1, collate_fn=lambda batch: batch)
    with pytest.raises(SystemExit) as exit_info:
        with dreambooth.cli.usage_errors_exit():
            next(iter(loader))
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot read the image {broken}: "), lines
