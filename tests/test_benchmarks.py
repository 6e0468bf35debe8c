"""The benchmark scripts run on a tiny setting and report sane numbers (a smoke test, not a timing test).

Each script runs as its own process, forked from a server that has done the imports (`forked_runs.py`)."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys

import pytest
from forked_runs import run_forked


def test_speed_benchmark_tiny(repo_root, tmp_path):
    out = tmp_path / "speed.json"
    done = run_forked(
        [str(repo_root / "benchmarks" / "speed.py"), "--tiny", "--json", str(out)], tmp_path / "logs" / "run", timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ratio ours/native train:" in done.stdout
    assert "ratio ours/native inference:" in done.stdout

    report = json.loads(out.read_text())
    assert set(report["results"]) == {"ours", "native"}
    for variant, modes in report["results"].items():
        for mode in ("train", "inference"):
            result = modes[mode]
            assert result["steps"] == 1, (variant, mode)
            assert result["median_step_s"] > 0, (variant, mode)
            assert result["volumes_per_s"] > 0, (variant, mode)
            # throughput is batch / median step time, not an unrelated number
            assert abs(result["volumes_per_s"] * result["median_step_s"] - 2) < 1e-6
    assert set(report["memory"]) == {"ours"}  # --tiny: one variant's memory children (train and inference)
    for mode in ("train", "inference"):
        memory = report["memory"]["ours"][mode]
        assert memory["peak_rss_mib"] >= memory["rss_before_mib"] > 0 and memory["added_mib"] >= 0
    for mode in ("train", "inference"):
        value = report["ratios"]["ours/native"][mode]
        assert value["of_medians"] > 0 and value["median_of_rounds"] > 0
    # the native side is configured as the docstring says: same size, activation and dropout
    native = report["native_config"]
    assert native["hidden_act"] == "gelu_pytorch_tanh" and native["attention_probs_dropout_prob"] == 0.1
    assert (native["hidden_size"], native["num_hidden_layers"], native["intermediate_size"]) == (128, 8, 512)


def test_reference_run_dry_run(repo_root, tmp_path):
    done = run_forked(
        [str(repo_root / "benchmarks" / "reference_run.py"), "--dry_run", "--output_dir", str(tmp_path / "ref")],
        tmp_path / "logs" / "run",
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "recipes/keras_reference.yaml" in done.stdout and "adrenalmnist3d" in done.stdout


def run_accuracy(repo_root, logs, *args):
    return run_forked([str(repo_root / "benchmarks" / "accuracy.py"), *map(str, args)], logs, timeout=900)


def test_accuracy_benchmark_tiny(repo_root, shared_data_dir, tmp_path):
    """Two tiny seeds trained at once through train.py; the summary is the mean/std of their own results, and a
    second call trains nothing."""
    root = tmp_path / "acc"
    tiny = [
        "--",
        "--num_train_epochs", 1, "--max_train_samples", 32, "--max_eval_samples", 32, "--max_test_samples", 32,
        "--config_overrides", "hidden_size=16,num_hidden_layers=1,num_attention_heads=2,intermediate_size=32",
        "--save_strategy", "no", "--eval_strategy", "no", "--load_best_model_at_end", "false",
    ]  # fmt: skip
    recipe = repo_root / "recipes" / "adrenalmnist3d.yaml"
    args = ["--recipe", recipe, "--output_root", root, "--seeds", 3, 4, "--data_dir", shared_data_dir]
    done = run_accuracy(repo_root, tmp_path / "logs" / "first", *args, "--jobs", 2, "--json", tmp_path / "acc.json", *tiny)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "acc.json").read_text())
    assert list(report["runs"]) == ["seed_3", "seed_4"]
    for key in (
        "train_eval_accuracy",
        "train_eval_loss",
        "eval_accuracy",
        "eval_auc",
        "test_accuracy",
        "test_auc",
    ):
        values = [
            json.loads((root / seed / "all_results.json").read_text())[key] for seed in ("seed_3", "seed_4")
        ]
        assert report["summary"][key]["mean"] == pytest.approx(sum(values) / 2)
        assert report["summary"][key]["std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    assert "mean ± std (2)" in done.stdout
    assert (
        "| run | train loss | train accuracy | train auc | val accuracy | val auc | test accuracy |"
        in done.stdout
    )

    again = run_accuracy(repo_root, tmp_path / "logs" / "again", *args, *tiny)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("not training again") == 2


def test_accuracy_benchmark_without_runs_says_what_it_expected(repo_root, tmp_path):
    done = run_accuracy(repo_root, tmp_path / "logs" / "run", "--output_root", tmp_path, "--summarize_only")
    assert done.returncode != 0
    assert "expected seed_*/all_results.json" in done.stderr


def test_gpu_check_dry_run(repo_root, shared_data_dir, tmp_path):
    # every step of the GPU check, tiny and on the CPU, so that the script is ready when a GPU is
    out = tmp_path / "gpu_check"
    done = subprocess.run(  # through the shell wrapper that the GPU machine runs
        ["bash", str(repo_root / "benchmarks" / "gpu_check.sh"), str(out), str(shared_data_dir), "--dry_run"],
        capture_output=True, text=True, timeout=1200, check=False, cwd=repo_root,
        env={**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WHEELS": str(tmp_path / "no_wheels")},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] and report["environment"]["device"] == "cpu"
    assert report["cuda_tests"]["returncode"] == 0 and "skipped" in report["cuda_tests"]["summary"]
    for name in ("fp32", "bf16"):
        run = report["training"][name]
        assert run["returncode"] == 0 and run["train_runtime_s"] > 0 and 0 <= run["test_accuracy"] <= 1, run
    # a dry run's speed step is tiny (batch 2): one run per distinct setting (fp32, bf16, 64^3)
    assert set(report["speed"]) == {"batch_32", "batch_1024_bf16", "volume_64_batch_32_bf16"}
    for name, run in report["speed"].items():
        assert run["returncode"] == 0, name
        assert run["results"]["ours"]["train"]["volumes_per_s"] > 0 and run["ratios"]["ours/native"]


def test_overhead_benchmark_tiny(repo_root, shared_data_dir, tmp_path):
    out = tmp_path / "overhead.json"
    done = run_forked(
        [str(repo_root / "benchmarks" / "overhead.py"), "--output_dir", str(tmp_path / "run"),
         "--data_dir", str(shared_data_dir), "--json", str(out), "--", "--num_train_epochs", "1",
         "--max_train_samples", "64", "--max_eval_samples", "16", "--max_test_samples", "16",
         "--config_overrides", "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64"],
        tmp_path / "logs" / "run", timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["steps"] == 2  # 64 volumes, batch 32, 1 epoch
    pieces = report["seconds"]
    assert set(pieces) == {"model step", "data", "validation", "checkpoints", "other"}
    assert all(value >= 0 for name, value in pieces.items() if name != "other")
    # the pieces add up to the Trainer's train_runtime ("other" is the rest, small but not negative beyond jitter)
    assert abs(sum(pieces.values()) - report["train_runtime_s"]) < 1e-6 and pieces["other"] > -0.05
    assert 0 < report["overhead_fraction"] < 1


def test_transfer_check_scores_a_stem_model_before_and_after_scaling(
    repo_root, shared_data_dir, tmp_path, capsys
):
    import torch

    from vivit_medmnist import VivitMedmnistConfig, VivitMedmnistForVideoClassification

    torch.manual_seed(0)
    config = VivitMedmnistConfig(
        conv_stem_channels=[4, 8, 16], tubelet_size=1, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=2,
    )  # fmt: skip
    VivitMedmnistForVideoClassification(config).save_pretrained(tmp_path / "model")
    out = tmp_path / "transfer.json"
    done = run_forked(
        [str(repo_root / "benchmarks" / "transfer_check.py"), "--model", str(tmp_path / "model"),
         "--data_dir", str(shared_data_dir), "--json", str(out)],
        tmp_path / "logs" / "run", timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {
        "at_28", "interpolate", "transfer", "transfer_stem_scale_2_trilinear", "transfer_stem_scale_2_nearest",
    }  # fmt: skip
    for metrics in results.values():
        assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["auc"] <= 1.0
    # interpolating at run time and transferring without rescaling are the same model
    assert results["interpolate"] == results["transfer"]
    # --only: the one variant a rule chose, scored alike; a name the model has not is refused
    script = runpy.run_path(str(repo_root / "benchmarks" / "transfer_check.py"), run_name="transfer_check")
    args = ["--model", str(tmp_path / "model"), "--data_dir", str(shared_data_dir)]
    reads, read = [], script["main"].__globals__["volumes_and_labels"]
    script["main"].__globals__["volumes_and_labels"] = lambda *a: reads.append(a[1]) or read(*a)
    only = script["main"]([*args, "--only", "transfer_stem_scale_2_trilinear"])["results"]
    assert only == {"transfer_stem_scale_2_trilinear": results["transfer_stem_scale_2_trilinear"]}
    assert reads == [64]  # only the size it scores is read
    with pytest.raises(SystemExit):
        script["main"]([*args, "--only", "transfer_stem_scale_3"])
    assert "--only takes" in capsys.readouterr().err


def test_seed_ensemble_averages_the_models_softmax(repo_root, shared_data_dir, tmp_path):
    import numpy as np
    import torch

    from vivit_medmnist import VivitMedmnistConfig, VivitMedmnistForVideoClassification

    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = VivitMedmnistConfig(
            conv_stem_channels=[4, 8, 16], tubelet_size=1, hidden_size=16, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=32, num_labels=2,
        )  # fmt: skip
        VivitMedmnistForVideoClassification(config).save_pretrained(tmp_path / f"seed_{seed}")
        folders.append(str(tmp_path / f"seed_{seed}"))
    script = runpy.run_path(str(repo_root / "benchmarks" / "seed_ensemble.py"), run_name="seed_ensemble")
    args = ["--data_dir", str(shared_data_dir), "--json", str(tmp_path / "ensemble.json")]
    results = script["main"](["--models", *folders, *args])
    assert json.loads((tmp_path / "ensemble.json").read_text()) == results
    assert results["split"] == "validation"
    # the average is the softmax's: recompute it from the two models by hand
    volumes, labels = script["volumes_and_labels"]("adrenalmnist3d", 28, str(shared_data_dir), "validation")
    probs = np.mean([script["probabilities"](folder, volumes) for folder in folders], axis=0)
    assert results["average_of_softmax"] == script["scores"](probs, labels)
    models = results["models"]
    assert results["mean_of_models"]["auc"] == pytest.approx(np.mean([m["auc"] for m in models.values()]))
    with pytest.raises(SystemExit):  # one model is no average
        script["main"](["--models", folders[0], "--data_dir", str(shared_data_dir)])


def test_cpu_speed_benchmark_tiny(repo_root, tmp_path):
    out = tmp_path / "cpu_speed.json"
    done = run_forked(
        [str(repo_root / "benchmarks" / "cpu_speed.py"), "--tiny", "--profile", "1", "--json", str(out)],
        tmp_path / "logs" / "run", timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"before", "after"}
    assert report["settings"]["before_commit"] == "57e35e2"  # the yardstick is the code before issue 22
    for variant in ("before", "after"):
        for mode in ("train", "inference"):
            result = report["results"][variant][mode]
            assert result["median_step_ms"] > 0 and result["speedup_median_of_rounds"] > 0
    assert report["results"]["before"]["train"]["speedup_of_medians"] == 1.0
    assert report["machine"]["variants"]["after"]["keep_freed_memory"] is True
    for variant in ("before", "after"):  # --profile: the operators of one profiled training step, by family
        profile = report["results"][variant]["train"]["profile"]
        assert profile["wall_ms_per_step"] > 0 and profile["self_ms_per_step"] > 0
        # the families still match torch's operator names: were they renamed, "other" would hold the step
        assert profile["families_ms_per_step"]["other"] < profile["self_ms_per_step"] / 2
        assert profile["families_ms_per_step"]["matrix products"] > 0
        assert any(op["op"] == "aten::mm" for op in profile["ops"])
    # bernoulli_ masks: the attention's dropout before issue 22, after it only drop-path's
    assert report["results"]["before"]["train"]["profile"]["families_ms_per_step"]["dropout masks"] > 0
    assert report["results"]["after"]["train"]["profile"]["families_ms_per_step"]["dropout masks"] < (
        report["results"]["before"]["train"]["profile"]["families_ms_per_step"]["dropout masks"]
    )


def test_explanations_benchmark_tiny(repo_root, tmp_path):
    out = tmp_path / "explanations.json"
    done = run_forked(
        [str(repo_root / "benchmarks" / "explanations.py"), "--options", "stem3", "--epochs", "1",
         "--train", "32", "--val", "20", "--volumes", "2", "--random_volumes", "1", "--json", str(out)],
        tmp_path / "logs" / "run", timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert 0 < report["chance"]["uniform_voxel"] < report["chance"]["tube_voxel"] < 1
    methods = report["options"][0]["methods"]
    assert set(methods) == {"rollout", "hires_cam", "integrated_gradients", "occlusion"}
    for result in methods.values():
        assert 0 <= result["pointing_game"] <= 1 and -1 <= result["spearman_trained_vs_randomised"] <= 1
        assert result["seconds_per_volume"] > 0


def test_volume_folder_benchmark_tiny(repo_root, tmp_path):
    out = tmp_path / "volume_folder.json"
    done = run_forked(
        [str(repo_root / "benchmarks" / "volume_folder.py"), "--root", str(tmp_path / "volumes"),
         "--count", "60", "--edge", "32", "--skip_training", "--json", str(out)],
        tmp_path / "logs" / "run", timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["preprocess"]["volumes"] == 60 and report["preprocess_tenth"]["volumes"] == 6
    assert report["preprocess"]["cached_seconds"] < report["preprocess"]["seconds"]
    assert len(list((tmp_path / "volumes" / "lesion").glob("*.nii"))) == 30


def test_speed_benchmark_compares_the_four_models_with_the_recipes_stem(repo_root):
    # in-process: the model comparison of issue 21 (--models), with the recipe's stem (--stem), tiny
    import runpy

    speed = runpy.run_path(str(repo_root / "benchmarks" / "speed.py"), run_name="speed_benchmark")
    report = speed["main"](
        ["--tiny", "--memory_steps", "0", "--stem", "--eager", "--models", "model2", "model3", "model4"]
    )
    assert report["settings"]["stem"] is True
    assert set(report["results"]) == {"ours", "native", "ours_eager", "ours_model2", "ours_model3", "ours_model4"}
    for name in ("model2", "model3", "model4"):
        for mode in ("train", "inference"):
            assert report["ratios"][f"ours_{name}/ours_eager"][mode]["of_medians"] > 0
    assert speed["OURS_OVERRIDES"] == speed["STEM"]  # the models built were the stem's


def test_explanation_choices_benchmark_tiny(repo_root, tmp_path):
    out = tmp_path / "choices.json"
    done = run_forked(
        [str(repo_root / "benchmarks" / "explanation_choices.py"), "--options", "stem3", "--epochs", "1",
         "--train", "32", "--val", "20", "--skip", "2", "--volumes", "2", "--random_volumes", "1", "--json", str(out)],
        tmp_path / "logs" / "run", timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    forms = json.loads(out.read_text())["options"]["stem3"]["forms"]
    # 4 baselines, and Grad-CAM's and HiResCAM's forms at the input of each of the 8 blocks
    assert len(forms) == 4 + 2 * 8 and {"integrated_gradients_mean", "hires_cam_1", "grad_cam_7"} <= set(forms)
    for result in forms.values():
        assert 0 <= result["pointing_game"] <= 1 and -1 <= result["spearman_trained_vs_randomised"] <= 1
