"""LoRA fine-tuning of Stable Diffusion on image-caption pairs (Task 2-1: a visual style).

Only low-rank adapters on the UNet's attention projections train: each adapted weight becomes
W + B A with A: [r, in] and B: [out, r] (Hu et al., 2021), while the UNet, the VAE and the text
encoder stay frozen. The loss is the usual noise-prediction MSE in the VAE's latent space:

    z_0 = VAE(x) * scaling_factor,  z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps,
    loss = || eps - eps_theta(z_t, t, CLIP(caption)) ||^2

Run it through scripts/train_lora.sh (a hub dataset) or scripts/train_lora_custom.sh (an image
folder), e.g.  cd task2 && sh scripts/train_lora_custom.sh
The result is OUTPUT_DIR/pytorch_lora_weights.safetensors, which
StableDiffusionPipeline.load_lora_weights(OUTPUT_DIR) loads.
"""
import random
from pathlib import Path

import torch

import utils


def parse_args(argv=None):
    parser = utils.ArgumentParser(description=__doc__.split("\n")[0])
    data = parser.add_argument_group("data (one of --dataset_name or --train_data_dir)")
    data.add_argument("--dataset_name", default=None,
                      help="A Hugging Face hub dataset (lambdalabs/naruto-blip-captions) or a local dataset folder.")
    data.add_argument("--dataset_config_name", default=None,
                      help="The dataset's configuration, for a hub dataset that has several.")
    data.add_argument("--train_data_dir", default=None,
                      help="An image folder with metadata.jsonl (the datasets 'imagefolder' layout), "
                           "e.g. sample_data/artistic-custom.")
    data.add_argument("--image_column", default="image", help="Dataset column holding the images.")
    data.add_argument("--caption_column", default="text", help="Dataset column holding the captions.")
    data.add_argument("--max_train_samples", type=int, default=None,
                      help="Train on this many images only, drawn at random (with --seed, else seed 0, so that "
                           "every process draws the same ones).")
    utils.add_common_args(parser)
    args = parser.parse_args(argv)

    if (args.dataset_name is None) == (args.train_data_dir is None):
        utils.exit_with_error("give exactly one of --dataset_name and --train_data_dir")
    if args.train_data_dir is not None:
        folder = Path(args.train_data_dir)
        if not folder.is_dir():
            utils.exit_with_error(f"--train_data_dir {folder} is not a folder")
        if not any(folder.rglob("metadata.jsonl")):
            utils.exit_with_error(f"--train_data_dir {folder} has no metadata.jsonl with the captions")
        utils.check_images_readable(folder)
    if args.max_train_samples is not None and args.max_train_samples < 1:
        utils.exit_with_error(f"--max_train_samples must be at least 1, got {args.max_train_samples}")
    utils.check_common_args(args)
    return args


def load_captioned_images(args):
    """The training split as a datasets.Dataset, checked to have the image and caption columns; with
    --max_train_samples a random subset of that size."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if args.train_data_dir is not None:
            dataset = datasets.load_dataset("imagefolder", data_dir=args.train_data_dir, split="train",
                                            cache_dir=args.cache_dir)
        else:
            dataset = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split="train",
                                            cache_dir=args.cache_dir)
    except Exception as error:  # datasets raises many types for a missing or malformed dataset
        source = args.train_data_dir or args.dataset_name
        utils.exit_with_error(f"cannot load the dataset {source}: {utils.first_line(error)}")
    for flag, column in (("--image_column", args.image_column), ("--caption_column", args.caption_column)):
        if column not in dataset.column_names:
            utils.exit_with_error(f"{flag} {column!r} is not a column of the dataset "
                                  f"(columns: {', '.join(dataset.column_names)})")
    if len(dataset) == 0:
        utils.exit_with_error("the dataset has no images")
    if args.max_train_samples is not None:
        dataset = dataset.shuffle(seed=args.seed or 0).select(range(min(args.max_train_samples, len(dataset))))
    return dataset


def training_dataset(args, dataset, tokenizer):
    """``dataset`` as the model sees it: item i holds ``pixel_values`` [3, H, W] in [-1, 1] (the image
    upright, resized and cropped) and ``input_ids`` [tokenizer.model_max_length] (its caption, or one
    of its captions at random)."""
    to_tensor = utils.image_transforms(args)

    def preprocess(examples):
        captions = [c if isinstance(c, str) else random.choice(c) for c in examples[args.caption_column]]
        return {"pixel_values": [to_tensor(utils.upright_rgb(image)) for image in examples[args.image_column]],
                "input_ids": utils.tokenize(tokenizer, captions)}

    return dataset.with_transform(preprocess)


def collate(examples):
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "input_ids": torch.stack([e["input_ids"] for e in examples])}


def main(argv=None):
    args = parse_args(argv)
    dataset = load_captioned_images(args)

    from diffusers.training_utils import cast_training_params

    accelerator = utils.make_accelerator(args, "train_lora")
    tokenizer, noise_scheduler, text_encoder, vae, unet = utils.load_models(args, accelerator)
    utils.add_lora(unet, args.rank, utils.UNET_LORA_TARGETS, args.lora_dropout)
    cast_training_params(unet, dtype=torch.float32)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    lora_parameters = [p for p in unet.parameters() if p.requires_grad]
    trainable, total = utils.count_parameters([unet, vae, text_encoder])
    accelerator.print(f"Trainable parameters: {trainable} (LoRA, rank {args.rank}) of {total} "
                      f"({100 * trainable / total:.2f}%)")

    train_dataloader = torch.utils.data.DataLoader(
        training_dataset(args, dataset, tokenizer), batch_size=args.train_batch_size, shuffle=True,
        collate_fn=collate, num_workers=args.dataloader_num_workers)
    optimizer = utils.make_optimizer(args, lora_parameters, accelerator.num_processes)

    def compute_loss(model_pred, target, timesteps):
        """|| eps - eps_theta(z_t, t, CLIP(caption)) ||^2 averaged over the batch (Min-SNR weighted with
        --snr_gamma). model_pred, target: [B, 4, h, w]; timesteps: [B]."""
        return utils.diffusion_loss(model_pred, target, timesteps, noise_scheduler, args.snr_gamma)

    accelerator.print(f"Training on {len(dataset)} images.")
    utils.train(args, accelerator, unet, text_encoder, vae, tokenizer, noise_scheduler, train_dataloader, optimizer,
                compute_loss)


if __name__ == "__main__":
    main()
