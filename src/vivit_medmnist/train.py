"""Train ViViT on a MedMNIST 3D set and leave a publishable model folder in --output_dir.

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
from vivit_medmnist.model_card import hub_id, training_summary
from vivit_medmnist.model_folder import save_publishable_folder, save_results
from vivit_medmnist.safe_io import staged_files
from vivit_medmnist.trainer_setup import (
    attention_for,
    build_image_processor,
    build_model,
    build_trainer,
    check_output_dir,
    describe_device,
    finish_distributed,
    load_data,
    remove_checkpoints,
    resolve_checkpoint,
    setup_logging,
)

logger = logging.getLogger("train")


def main(argv=None):
    run = parse_args(argv)
    setup_logging(run.training)
    logger.setLevel(logging.INFO if run.training.should_log else logging.WARNING)
    logger.info(f"{describe_device(run.training)} output_dir={run.output_dir}")
    try:
        # Bad arguments and missing data end here with the message, not a traceback.
        check_output_dir(run)  # a finished model there is replaced only when the user asked
        checkpoint = resolve_checkpoint(run.training, overwrite=run.overwrite_output_dir)
        with run.training.main_process_first(desc="loading the data"):  # the first run downloads it once
            data = load_data(run.data)
        label_names = data["train"].features["label"].names
        set_seed(run.training.seed)  # before the model is made: its initial weights depend on it
        attention = attention_for(run.training.device)  # decided once, here: see attention_for
        model = build_model(run.model, label_names, run.data.size, run.recipe_override_keys, attention)
        image_processor = build_image_processor(run.model)
    except (ValueError, OSError) as err:
        finish_distributed(wait=False)
        raise SystemExit(f"error: {err}") from None

    trainer = build_trainer(model, image_processor, data, run)
    if checkpoint is not None:
        logger.info(f"resuming from {checkpoint}")
    elif run.overwrite_output_dir and trainer.is_world_process_zero():
        remove_checkpoints(run.training)
    start = time.perf_counter()
    train_metrics = trainer.train(resume_from_checkpoint=checkpoint).metrics
    train_seconds = time.perf_counter() - start
    eval_metrics = trainer.evaluate()  # the final model (the best one with --load_best_model_at_end)
    # Does the final model fit its training data? The training split without augmentation: train_eval_*.
    fit_metrics = trainer.evaluate(data["train"], metric_key_prefix="train_eval")
    test = trainer.predict(data["test"], metric_key_prefix="test")  # the only look at the test set
    splits = (
        ("train", train_metrics),
        ("train_eval", fit_metrics),
        ("eval", eval_metrics),
        ("test", test.metrics),
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
            )
        logger.info(f"publishable folder: {run.output_dir} (checkpoints in {run.training.output_dir})")
    finish_distributed()


if __name__ == "__main__":
    main()
