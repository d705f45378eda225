"""The LoRA file, pytorch_lora_weights.safetensors: written in diffusers' Stable Diffusion 1.x layout,
which StableDiffusionPipeline.load_lora_weights reads, and read back into the training adapters."""
from pathlib import Path

from atomic_write import atomic_write

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def lora_layers(model):
    """The LoRA tensors of ``model`` under peft's names (``<module>.lora_A.weight``, ``.lora_B.weight``),
    fp32 on the CPU."""
    from peft.utils import get_peft_model_state_dict

    # No embedding layer is adapted; saying so spares peft a look-up of the base model's config.
    layers = get_peft_model_state_dict(model, save_embedding_layers=False)
    return {name: tensor.detach().float().contiguous().cpu() for name, tensor in layers.items()}


def save_lora_weights(folder, unet, text_encoder=None):
    """Write ``folder/pytorch_lora_weights.safetensors`` atomically, in diffusers' own SD 1.x layout.

    UNet: ``unet.<module>.lora.down.weight`` / ``.lora.up.weight``; text encoder:
    ``text_encoder.text_model.<module>.lora_linear_layer.down.weight`` / ``.up.weight``. The file keeps
    ``text_model.``, which transformers 5 dropped from CLIPTextModel: diffusers before 0.36 (the course's
    0.35.1) maps only keys with it, and newer diffusers strip it for a model without that level.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    text_encoder_layers = None
    if text_encoder is not None:
        text_encoder_layers = {name if name.startswith("text_model.") else f"text_model.{name}": tensor
                               for name, tensor in convert_state_dict_to_diffusers(lora_layers(text_encoder)).items()}
    with atomic_write(Path(folder) / LORA_WEIGHTS_NAME) as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp.parent, unet_lora_layers=convert_state_dict_to_diffusers(lora_layers(unet)),
            text_encoder_lora_layers=text_encoder_layers, weight_name=tmp.name)


def read_lora_weights(folder):
    """The LoRA tensors of ``folder/pytorch_lora_weights.safetensors`` under peft's names, by model:
    ``{"unet": {...}, "text_encoder": {...}}`` (a model without adapters is absent).

    Reads this layout and peft's own (``unet.<module>.lora_A.weight``, text-encoder modules without
    ``text_model.``); the text encoder's names keep ``text_model.`` when the file has it.
    """
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    from safetensors.torch import load_file

    state = load_file(Path(folder) / LORA_WEIGHTS_NAME)
    parts = {}
    for prefix in ("unet", "text_encoder"):
        part = {name.removeprefix(f"{prefix}."): tensor for name, tensor in state.items()
                if name.startswith(f"{prefix}.")}
        if part and prefix == "unet":
            parts[prefix] = convert_unet_state_dict_to_peft(part)
        elif part:
            parts[prefix] = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
    return parts


def load_lora_weights(folder, unet, text_encoder=None):
    """Inverse of ``save_lora_weights``: copy the saved LoRA tensors into the models' adapters. Every
    adapter of the models must get a tensor and every tensor an adapter."""
    from peft import set_peft_model_state_dict

    parts = read_lora_weights(folder)
    for name, model in (("unet", unet), ("text_encoder", text_encoder)):
        if model is None:
            continue
        part = parts.get(name, {})
        if not hasattr(model, "text_model"):
            part = {key.removeprefix("text_model."): tensor for key, tensor in part.items()}
        result = set_peft_model_state_dict(model, part)
        missing = [key for key in result.missing_keys if "lora_" in key]
        if result.unexpected_keys or missing:
            raise ValueError(f"{folder} does not match the {name}'s adapters: "
                             f"unexpected {result.unexpected_keys[:3]}, missing {missing[:3]}")
