"""The benchmark scripts run on a tiny setting and report sane numbers (a smoke test, not a timing test)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_speed_benchmark_tiny(repo_root, tmp_path):
    out = tmp_path / "speed.json"
    done = subprocess.run(
        [sys.executable, str(repo_root / "benchmarks" / "speed.py"), "--tiny", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
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
            memory = report["memory"][variant][mode]
            assert memory["peak_rss_mib"] >= memory["rss_before_mib"] > 0 and memory["added_mib"] >= 0
    for mode in ("train", "inference"):
        value = report["ratios"]["ours/native"][mode]
        assert value["of_medians"] > 0 and value["median_of_rounds"] > 0
    # the native side is configured as the docstring says: same size, activation and dropout
    native = report["native_config"]
    assert native["hidden_act"] == "gelu_pytorch_tanh" and native["attention_probs_dropout_prob"] == 0.1
    assert (native["hidden_size"], native["num_hidden_layers"], native["intermediate_size"]) == (128, 8, 512)


def test_reference_run_dry_run(repo_root, tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(repo_root / "benchmarks" / "reference_run.py"),
            "--dry_run",
            "--output_dir",
            str(tmp_path / "ref"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "recipes/keras_reference.yaml" in done.stdout and "adrenalmnist3d" in done.stdout
