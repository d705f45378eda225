"""Load a LoRA file written by task2/ into a tiny Stable Diffusion with whatever diffusers, transformers
and peft this Python imports, and report what landed.

The tests call ``check`` in this project's environment, and run this file in a subprocess whose
PYTHONPATH puts the course's pins (diffusers 0.35.1, transformers 4.56.2, peft 0.17.1) first:
    python tests/task2_lora_load_check.py LORA_DIR SCRATCH_DIR   # prints one JSON line
There the tiny pipeline is built by that environment's own libraries (transformers 4 cannot read the
text encoder transformers 5 saved: the weight names lost their ``text_model.`` level).
"""
import json
import logging
import sys
import warnings
from pathlib import Path

import torch

from task2_tiny_pipeline import RESOLUTION, build_tiny_pipeline, merge_lora

PROMPT = "a photo of sks cat"
# Log and warning texts by which diffusers, transformers and peft say that keys did not land.
NOT_LANDED = ("unexpected", "missing", "not found", "no lora keys", "were not used", "not initialized")


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def file_tensors_by_model(lora_file):
    """The file's tensors as peft names them inside each model (``<module>.lora_A.weight``), by model;
    text-encoder modules keep the file's ``text_model.``."""
    from safetensors.torch import load_file

    renames = {".lora.down.weight": ".lora_A.weight", ".lora.up.weight": ".lora_B.weight",
               ".lora_linear_layer.down.weight": ".lora_A.weight", ".lora_linear_layer.up.weight": ".lora_B.weight"}
    by_model = {}
    for key, tensor in load_file(lora_file).items():
        model_name, name = key.split(".", 1)
        for old, new in renames.items():
            name = name.removesuffix(old) + new if name.endswith(old) else name
        by_model.setdefault(model_name, {})[name] = tensor
    return by_model


@torch.no_grad()
def outputs(pipeline, encoder_hidden_states=None):
    """(text-encoder output [1, L, D] for PROMPT, UNet output [1, 4, h, w] on fixed inputs). The UNet
    gets ``encoder_hidden_states`` when given, so that its change is its own."""
    ids = pipeline.tokenizer(PROMPT, padding="max_length", max_length=pipeline.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
    text = pipeline.text_encoder(ids)[0]
    latents = torch.randn(1, 4, RESOLUTION // 2, RESOLUTION // 2, generator=torch.Generator().manual_seed(0))
    unet = pipeline.unet(latents, torch.tensor([500]), text if encoder_hidden_states is None
                         else encoder_hidden_states).sample
    return text, unet


def check(model_dir, lora_dir):
    """Load ``lora_dir`` into a stock pipeline of ``model_dir`` and compare with the base model and with
    the base model's weights plus B A merged by hand. Returns a JSON-able dict."""
    import diffusers
    import peft
    import transformers
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    def load():
        pipeline = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None,
                                                           requires_safety_checker=False)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    lora_file = Path(lora_dir) / "pytorch_lora_weights.safetensors"
    base, with_lora, merged = load(), load(), load()
    collect = Collect()
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    for logger in loggers:
        logger.addHandler(collect)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with_lora.load_lora_weights(lora_dir)
    for logger in loggers:
        logger.removeHandler(collect)
    messages = collect.messages + [str(w.message) for w in caught]
    merge_lora(merged, lora_file)

    base_text, base_unet = outputs(base)
    lora_text, lora_unet = outputs(with_lora, base_text)
    merged_text, merged_unet = outputs(merged, base_text)

    in_file = file_tensors_by_model(lora_file)
    landed = {}
    for model_name, names in with_lora.get_list_adapters().items():
        model = getattr(with_lora, model_name)
        in_model = get_peft_model_state_dict(model, adapter_name=names[0])
        expected = in_file.get(model_name, {})
        if not hasattr(model, "text_model"):  # transformers 5 flattened CLIPTextModel
            expected = {k.removeprefix("text_model."): v for k, v in expected.items()}
        landed[model_name] = {
            "in_file": len(expected), "in_model": len(in_model),
            "missing_from_model": sorted(set(expected) - set(in_model))[:5],
            "not_from_file": sorted(set(in_model) - set(expected))[:5],
            "max_value_difference": max((float((in_model[k].float() - expected[k].float()).abs().max())
                                         for k in set(expected) & set(in_model)), default=None),
        }
    return {
        "versions": {"diffusers": diffusers.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "torch": torch.__version__},
        "not_landed_messages": [m for m in messages if any(word in m.lower() for word in NOT_LANDED)],
        "landed": landed,
        "text_encoder_change": float((lora_text - base_text).abs().max()),
        "unet_change": float((lora_unet - base_unet).abs().max()),
        "text_encoder_vs_merged": float((lora_text - merged_text).abs().max()),
        "unet_vs_merged": float((lora_unet - merged_unet).abs().max()),
    }


if __name__ == "__main__":
    lora_dir, scratch = Path(sys.argv[1]), Path(sys.argv[2])
    report = check(build_tiny_pipeline(scratch), lora_dir)
    print(json.dumps(report))
