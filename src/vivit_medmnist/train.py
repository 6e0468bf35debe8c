"""Train ViViT on a MedMNIST 3D set or your own volumes and leave a publishable model folder in --output_dir.

    vivit-medmnist-train --recipe recipes/organmnist3d.yaml --output_dir outputs/organmnist3d
    vivit-medmnist-train --recipe recipes/organmnist3d.yaml --output_dir outputs/organmnist3d --resume_from_checkpoint
    accelerate launch --multi_gpu --num_processes 2 -m vivit_medmnist.train --recipe keras_reference ...

Every `TrainingArguments` field is an option (`--learning_rate`, `--bf16`, `--torch_compile`, ...); see
`--help`, and the package modules it names below for each step.
"""

import logging
import time

from transformers import set_seed

from vivit_medmnist.arguments import parse_args
from vivit_medmnist.calibration import calibrate
from vivit_medmnist.checkpoints import set_aside
from vivit_medmnist.dataset_card import data_card
from vivit_medmnist.model_card import hub_id, training_summary
from vivit_medmnist.model_folder import save_publishable_folder, save_results
from vivit_medmnist.safe_io import staged_files, unlock_folder
from vivit_medmnist.trainer_setup import (
    build_image_processor,
    build_model,
    build_trainer,
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

logger = logging.getLogger("vivit_medmnist.train")  # not __name__: `python -m` names it __main__


def main(argv=None):
    run = parse_args(argv)
    setup_logging(run.training)
    logger.info(f"{describe_device(run.training)} output_dir={run.output_dir}")
    try:
        # Bad arguments and missing data end here with the message, not a traceback; nothing is written before
        # the checks pass.
        checkpoint, damaged = resolve_checkpoint(run)  # the newest complete one (see vivit_medmnist.checkpoints)
        check_output_dir(run, checkpoint)  # a finished model there is replaced only when the user asked
        image_processor = build_image_processor(run.model, run.data)
        with run.training.main_process_first(desc="loading the data"):  # downloaded or preprocessed once
            data = load_data(run.data, image_processor, run.training.seed)
        label_names = data["train"].features["label"].names
        set_seed(run.training.seed)  # before the model is made: its initial weights depend on it
        model = build_model(run.model, label_names, run.data.size, run.recipe_override_keys)
        # the speed choices: decided once, here, never saved (trainer_setup.speed_up)
        speed_up(model, run.training.device, run.training.bf16)
        lock = lock_output_dir(run)  # a second run on this folder is refused while this one goes on
    except (ValueError, OSError) as err:
        finish_distributed(wait=False)
        fail(err)
    if run.training.process_index == 0:
        set_aside(damaged)  # damaged checkpoints newer than the one resumed, renamed with a warning

    trainer = build_trainer(model, image_processor, data, run, checkpoint)
    if checkpoint is not None:
        logger.info(f"resuming from {checkpoint}")
    elif run.overwrite_output_dir and trainer.is_world_process_zero():
        remove_checkpoints(run.training)
    start = time.perf_counter()
    train_metrics = trainer.train(resume_from_checkpoint=checkpoint).metrics
    train_seconds = time.perf_counter() - start
    # the final model (the best one with --load_best_model_at_end) on validation
    validation = trainer.predict(data["validation"], metric_key_prefix="eval")
    # Does the final model fit its training data? The training split without augmentation: train_eval_*.
    fit_metrics = trainer.evaluate(data["train"], metric_key_prefix="train_eval")
    test = trainer.predict(data["test"], metric_key_prefix="test")  # the only look at the test set
    # temperature scaling, fitted on validation and saved in the config; test's calibration measured with it
    eval_calibrated, test_calibrated = calibrate(trainer.model.config, validation, test)
    splits = (
        ("train", train_metrics),
        ("train_eval", fit_metrics),
        ("eval", {**validation.metrics, **eval_calibrated}),
        ("test", {**test.metrics, **test_calibrated}),
    )
    for split, metrics in splits:
        trainer.log_metrics(split, metrics)

    if trainer.is_world_process_zero():
        # Written in a staging folder, then renamed into output_dir: a crash leaves the old files whole.
        with staged_files(run.output_dir) as staging:
            results = save_results(staging, **dict(splits))
            logits = test.predictions[0] if isinstance(test.predictions, tuple) else test.predictions
            save_publishable_folder(
                staging,
                trainer.model,
                image_processor,
                dataset_name=run.data.dataset_name,
                size=run.data.size,
                log_history=trainer.state.log_history,
                test_labels=test.label_ids,
                test_logits=logits,
                results=results,
                training_summary=training_summary(run, trainer, data, train_seconds),
                split_sizes={split: len(rows) for split, rows in data.items()},
                base_model=hub_id(run.model.model_name_or_path),
                test_volumes=data["test"].with_format("numpy")["volume"],
                dataset=data_card(run.data, data),
                splits_made=data.splits_made,
            )
        logger.info(f"publishable folder: {run.output_dir} (checkpoints in {run.training.output_dir})")
    finish_distributed()
    unlock_folder(lock)


if __name__ == "__main__":
    main()
