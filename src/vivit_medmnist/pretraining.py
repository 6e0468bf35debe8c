"""Pretrain the encoder by masked volume modelling on the training volumes themselves, then fine-tune it.

    vivit-medmnist-pretrain --recipe recipes/medmnist3d_pretrain.yaml --output_dir outputs/pretrained
    vivit-medmnist-train --recipe recipes/medmnist3d.yaml --model_name_or_path outputs/pretrained --output_dir ...

The model is `VivitMedmnistForPreTraining` (SimMIM in 3D: masked tokens' voxels zeroed in the input, a mask token
in their place, their voxels reconstructed). Each volume's tokens are masked at random, `--mask_ratio` of them,
by `MaskedVolumeCollator`; the volumes are augmented as in training (`--max_shift` and friends). Labels are never
read, and neither are the validation and test splits: what the pretraining is worth is decided by the
fine-tuning run's validation metrics. The run writes a bare `VivitMedmnistModel` folder (config, safetensors,
image processor) to `--output_dir`, which `--model_name_or_path` of `vivit-medmnist-train` takes; a killed run
resumes with `--resume_from_checkpoint`, as training does.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import Trainer, set_seed

from .arguments import parse_args
from .augmentation import AugmentedDataset, EpochCallback
from .checkpoints import set_aside
from .config_overrides import OptionError, parse_config_overrides
from .configuration_vivit_medmnist import VivitMedmnistConfig
from .data import VOLUME_COLUMN
from .image_processing_vivit_medmnist import VivitMedmnistImageProcessor
from .model_folder import save_results
from .modeling_vivit_medmnist import VivitMedmnistForPreTraining, VivitMedmnistModel
from .safe_io import staged_files, unlock_folder
from .trainer_setup import (
    build_image_processor,
    check_output_dir,
    describe_device,
    fail,
    finish_distributed,
    load_data,
    lock_output_dir,
    remove_checkpoints,
    resolve_checkpoint,
    setup_logging,
    speed_up,
)

logger = logging.getLogger("vivit_medmnist.pretraining")
DESCRIPTION = "Pretrain a ViViT encoder by masked volume modelling on a MedMNIST 3D set's training volumes."

__all__ = ["MaskedVolumeCollator", "PretrainingOptions", "encoder_for_fine_tuning", "main"]


@dataclass
class PretrainingOptions:
    """`vivit-medmnist-pretrain`'s own options, beside training's (`arguments.parse_args(extra_options=...)`)."""

    mask_ratio: float = field(
        default=0.75,
        metadata={"help": "The fraction of each volume's tokens masked (and their voxels reconstructed), in (0, 1)."},
    )


class MaskedVolumeCollator:
    """Rows -> `{"pixel_values": (B, D, 1, H, W) float32, "bool_masked_pos": (B, num_tokens) bool}`: the volumes
    through `image_processor`, and for each volume exactly `round(mask_ratio * num_tokens)` tokens masked, drawn
    uniformly with torch's default generator (seeded by the Trainer, so a seed repeats the masks)."""

    def __init__(self, image_processor, num_tokens: int, mask_ratio: float):
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.image_processor = image_processor
        self.num_tokens = num_tokens
        self.num_masked = max(1, min(num_tokens - 1, round(mask_ratio * num_tokens)))

    def __call__(self, rows: Sequence[Mapping]) -> dict:
        volumes = np.stack([np.asarray(row[VOLUME_COLUMN]) for row in rows])
        pixel_values = self.image_processor(volumes, return_tensors="pt")["pixel_values"]
        order = torch.rand(len(rows), self.num_tokens).argsort(dim=1)
        return {"pixel_values": pixel_values, "bool_masked_pos": order < self.num_masked}


def encoder_for_fine_tuning(model: VivitMedmnistForPreTraining) -> VivitMedmnistModel:
    """The pretrained encoder as a bare `VivitMedmnistModel` (without the mask token and the decoder), which a
    classification model loads with `from_pretrained`."""
    encoder = VivitMedmnistModel(copy.deepcopy(model.config))  # its save_pretrained names its own architecture
    weights = {name: value for name, value in model.vivit.state_dict().items() if name != "embeddings.mask_token"}
    encoder.load_state_dict(weights, strict=True)
    return encoder


def build_pretraining_model(run, size: int) -> VivitMedmnistForPreTraining:
    """A new `VivitMedmnistForPreTraining` for `size`^3 volumes, changed by `--config_overrides` (OptionError
    for an invalid configuration)."""
    overrides = parse_config_overrides(run.model.config_overrides)
    try:
        return VivitMedmnistForPreTraining(VivitMedmnistConfig(volume_size=size, **overrides))
    except (TypeError, ValueError) as err:  # the config's and the model's checks
        raise OptionError(f"--config_overrides: invalid model configuration for pretraining: {err}") from err


def refused_options(run) -> str | None:
    """Options that pretraining cannot honour, as a message; None when all are fine."""
    if not 0 < run.extra.mask_ratio < 1:
        return f"--mask_ratio must be in (0, 1), got {run.extra.mask_ratio}"
    if run.model.model_name_or_path is not None:
        return "--model_name_or_path: pretraining starts from a new model (resume a killed run with --resume_from_checkpoint)"
    if run.data.mixing():
        return "--mixup_alpha / --cutmix_alpha mix labels, which pretraining does not read"
    if run.weight_average_decay is not None:
        return "--weight_average_decay is not available for pretraining"
    if run.sam_rho is not None:
        return "--sam_rho is not available for pretraining"
    if run.training.eval_strategy != "no" or run.training.load_best_model_at_end:
        return (
            f"--eval_strategy {run.training.eval_strategy.value}: pretraining has no validation metric (the "
            "fine-tuning run's validation decides); use --eval_strategy no and no --load_best_model_at_end"
        )
    return None


def main(argv=None):
    run = parse_args(argv, PretrainingOptions, DESCRIPTION)
    mask_ratio = run.extra.mask_ratio
    setup_logging(run.training)
    logger.info(f"{describe_device(run.training)} output_dir={run.output_dir} mask_ratio={mask_ratio}")
    try:
        if problem := refused_options(run):
            raise OptionError(problem)
        checkpoint, damaged = resolve_checkpoint(run)
        check_output_dir(run, checkpoint)
        image_processor = build_image_processor(run.model, run.data)
        with run.training.main_process_first(desc="loading the data"):
            data = load_data(run.data, image_processor, run.training.seed)
        set_seed(run.training.seed)
        model = build_pretraining_model(run, run.data.size)
        speed_up(model, run.training.device, run.training.bf16)
        lock = lock_output_dir(run)
    except (ValueError, OSError) as err:
        finish_distributed(wait=False)
        fail(err)
    if run.training.process_index == 0:
        set_aside(damaged)

    train = AugmentedDataset(data["train"], run.training.seed, **run.data.augmentation())
    # stored volumes are preprocessed already (uint8 at the model's size): the collator only scales them
    stored = VivitMedmnistImageProcessor() if run.data.own_volumes() else image_processor
    collator = MaskedVolumeCollator(stored, model.config.num_tokens, mask_ratio)
    trainer = Trainer(
        model=model, args=run.training, train_dataset=train, data_collator=collator, callbacks=[EpochCallback(train)]
    )
    if checkpoint is not None:
        logger.info(f"resuming from {checkpoint}")
    elif run.overwrite_output_dir and trainer.is_world_process_zero():
        remove_checkpoints(run.training)
    metrics = trainer.train(resume_from_checkpoint=checkpoint).metrics
    metrics.update(mask_ratio=mask_ratio, masked_tokens=collator.num_masked, train_volumes=len(train))
    trainer.log_metrics("train", metrics)
    if trainer.is_world_process_zero():
        with staged_files(run.output_dir) as staging:
            encoder_for_fine_tuning(trainer.model).save_pretrained(staging)
            image_processor.save_pretrained(staging)
            save_results(staging, train=metrics)
        logger.info(f"pretrained encoder: {run.output_dir} (fine-tune it with --model_name_or_path)")
    finish_distributed()
    unlock_folder(lock)


if __name__ == "__main__":
    main()
