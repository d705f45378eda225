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
from pathlib import Path

import torch

import cli
import images
import models
import options
import training
from loss import diffusion_loss


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
    data = parser.add_argument_group("data (one of --dataset_name or --train_data_dir)")
    data.add_argument("--dataset_name", default=None,
                      help="A Hugging Face hub dataset (lambdalabs/naruto-blip-captions) or a local dataset folder.")
    data.add_argument("--dataset_config_name", default=None, help="The dataset's configuration, if it has several.")
    data.add_argument("--train_data_dir", default=None,
                      help="An image folder with metadata.jsonl (datasets' imagefolder layout).")
    data.add_argument("--image_column", default="image", help="Dataset column holding the images.")
    data.add_argument("--caption_column", default="text", help="Dataset column holding the captions.")
    data.add_argument("--max_train_samples", type=int, default=None,
                      help="Train on this many images drawn at random (with --seed, else seed 0).")
    options.add_common_args(parser)
    parser.set_defaults(train_text_encoder=False)  # the training loop's setting; only DreamBooth has the flag
    args = parser.parse_args(argv)

    if (args.dataset_name is None) == (args.train_data_dir is None):
        raise cli.UsageError("give exactly one of --dataset_name and --train_data_dir")
    if args.train_data_dir is not None:
        folder = Path(args.train_data_dir)
        if not folder.is_dir():
            raise cli.UsageError(f"--train_data_dir {folder} is not a folder")
        if not any(folder.rglob("metadata.jsonl")):
            raise cli.UsageError(f"--train_data_dir {folder} has no metadata.jsonl with the captions")
        images.check_images_readable(folder)
        images.check_captions(folder, args.caption_column)
    options.check_common_args(args)
    return args


def load_captioned_images(args):
    """The training split as a datasets.Dataset, checked to have the image and caption columns and a
    caption in every row; with --max_train_samples a random subset of that size."""
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
        raise cli.UsageError(f"cannot load the dataset {source}: {cli.first_line(error)}") from error
    for flag, column in (("--image_column", args.image_column), ("--caption_column", args.caption_column)):
        if column not in dataset.column_names:
            raise cli.UsageError(f"{flag} {column!r} is not a column of the dataset "
                                 f"(columns: {', '.join(dataset.column_names)})")
    if len(dataset) == 0:
        raise cli.UsageError("the dataset has no images")
    for row, caption in enumerate(dataset[args.caption_column]):
        if not (isinstance(caption, str) and caption.strip() or images.is_caption_list(caption)):
            raise cli.UsageError(f"row {row} of the dataset has no caption in {args.caption_column!r} "
                                 f"(got {caption!r}); fix the dataset or pick another --caption_column")
    if args.max_train_samples is not None:
        dataset = dataset.shuffle(seed=args.seed or 0).select(range(min(args.max_train_samples, len(dataset))))
    return dataset


class CaptionedImages(torch.utils.data.Dataset):
    """A datasets.Dataset as the model sees it: item i holds ``pixel_values`` [3, H, W] in [-1, 1] (the
    image upright, resized and cropped) and ``input_ids`` [tokenizer.model_max_length] (its caption, or
    one of its captions at random); the random draws are seeded per item and epoch (images.SampleRandomness)."""

    def __init__(self, args, dataset, tokenizer):
        self.dataset, self.tokenizer = dataset, tokenizer
        self.image_column, self.caption_column = args.image_column, args.caption_column
        self.transform = images.image_transforms(args)
        self.randomness = images.SampleRandomness(args.seed)

    def __len__(self):
        return len(self.dataset)

    def set_epoch(self, epoch):
        self.randomness.set_epoch(epoch)

    def __getitem__(self, i):
        row = self.dataset[i]
        caption = row[self.caption_column]
        with self.randomness.of_item(i):
            if not isinstance(caption, str):
                caption = caption[torch.randint(len(caption), ()).item()]
            pixels = self.transform(images.upright_rgb(row[self.image_column]))
        return {"pixel_values": pixels, "input_ids": models.tokenize(self.tokenizer, [caption])[0]}


def training_dataset(args, dataset, tokenizer):
    """The data set the loop trains on, as train_dreambooth_lora.training_dataset gives it."""
    return CaptionedImages(args, dataset, tokenizer)


def collate(examples):
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "input_ids": torch.stack([e["input_ids"] for e in examples])}


def main(argv=None):
    with cli.usage_errors_exit():
        args = parse_args(argv)
        dataset = load_captioned_images(args)

        from diffusers.training_utils import cast_training_params

        options.check_output_dir_free(args)
        accelerator = training.make_accelerator(args, "train_lora")
        sd = models.load_models(args, accelerator)
        models.add_lora(sd.unet, args.rank, models.UNET_LORA_TARGETS, args.lora_dropout)
        cast_training_params(sd.unet, dtype=torch.float32)
        if args.gradient_checkpointing:
            sd.unet.enable_gradient_checkpointing()
        trainable, total = models.count_parameters([sd.unet, sd.vae, sd.text_encoder])
        accelerator.print(f"Trainable parameters: {trainable} (LoRA, rank {args.rank}) of {total} "
                          f"({100 * trainable / total:.2f}%)")
        train_dataloader = training.make_dataloader(args, training_dataset(args, dataset, sd.tokenizer), collate)
        lora_parameters = [p for p in sd.unet.parameters() if p.requires_grad]
        optimizer = training.make_optimizer(args, lora_parameters, accelerator.num_processes)

        def compute_loss(model_pred, target, timesteps):
            """|| eps - eps_theta(z_t, t, CLIP(caption)) ||^2 averaged over the batch (Min-SNR weighted with
            --snr_gamma). model_pred, target: [B, 4, h, w]; timesteps: [B]."""
            return diffusion_loss(model_pred, target, timesteps, sd.noise_scheduler, args.snr_gamma)

        accelerator.print(f"Training on {len(dataset)} images.")
        training.train(args, accelerator, sd, train_dataloader, optimizer, compute_loss)


if __name__ == "__main__":
    main()
