"""Mixup and cutmix in 3D (issue 23): the label weights are the voxels' shares, the loss is the Trainer's label
smoothing for integer labels, the mixing is reproducible per (seed, epoch, volume), and a run trains with it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_scripts import TINY_OVERRIDES, run_in_process
from transformers.trainer_pt_utils import LabelSmoother

from vivit_medmnist.augmentation import AugmentedDataset
from vivit_medmnist.data import MedMNIST3DCollator
from vivit_medmnist.mixing import mix_volumes, mixing_options, soft_target_loss


@pytest.mark.parametrize(
    "options", [{"mixup_alpha": 0.2}, {"cutmix_alpha": 1.0}, {"mixup_alpha": 0.8, "cutmix_alpha": 1.0}]
)
def test_the_label_weight_is_the_share_of_the_volume_kept(options):
    rng = np.random.default_rng(0)
    empty, full = np.zeros((28, 28, 28), np.uint8), np.full((28, 28, 28), 255, np.uint8)
    weights = []
    for _ in range(20):
        mixed, lam = mix_volumes(empty, full, rng, **options)
        assert mixed.dtype == np.uint8 and mixed.shape == empty.shape and 0.0 <= lam <= 1.0
        # mixup rounds to uint8 (within half a grey level), cutmix is exact
        assert 1.0 - mixed.mean() / 255 == pytest.approx(lam, abs=0.5 / 255 + 1e-9)
        weights.append(lam)
    assert len(set(np.round(weights, 6))) > 10  # drawn, not fixed
    assert mix_volumes(empty, full, rng, **options, mix_prob=0.0) == (empty, 1.0)


def test_no_mixing_options_when_both_are_off():
    assert mixing_options(0.0, 0.0) == {}
    assert mixing_options(0.2, 0.0) == {"mixup_alpha": 0.2, "cutmix_alpha": 0.0, "mix_prob": 1.0}


def test_soft_target_loss_is_the_trainers_label_smoothing_for_class_indices():
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 1, 0, 2])
    smoother, loss = LabelSmoother(0.1), soft_target_loss(0.1)
    assert loss({"logits": logits}, labels).item() == pytest.approx(smoother({"logits": logits}, labels).item())
    # with the Trainer's count of label entries over accumulated batches: sum / count, as its contract asks
    count = torch.tensor(12)
    expected = smoother({"logits": logits}, labels, num_items_in_batch=count).item()
    assert loss({"logits": logits}, labels, count).item() == pytest.approx(expected)
    # one-hot weights are the same targets; the Trainer counts 3 entries per volume for them
    one_hot = torch.nn.functional.one_hot(labels, 3).float()
    assert loss({"logits": logits}, one_hot, torch.tensor(36)).item() == pytest.approx(expected)
    # half-half weights: the mean of the two classes' losses
    half = torch.tensor([[0.5, 0.5, 0.0]])
    plain = soft_target_loss(0.0)
    both = [plain({"logits": logits[:1]}, torch.tensor([c])).item() for c in (0, 1)]
    assert plain({"logits": logits[:1]}, half).item() == pytest.approx(sum(both) / 2)


def rows(n: int = 12):
    rng = np.random.default_rng(3)
    return [{"volume": rng.integers(0, 256, (8, 8, 8), dtype=np.uint8), "label": i % 3} for i in range(n)]


def test_mixed_training_rows_are_reproducible_weights_and_collate_as_float_labels():
    plain = AugmentedDataset(rows(), seed=1, max_shift=1)
    before = [plain[i] for i in range(12)]
    mixed = AugmentedDataset(rows(), seed=1, mixing=mixing_options(0.4, 1.0), num_labels=4, max_shift=1)
    again = AugmentedDataset(rows(), seed=1, mixing=mixing_options(0.4, 1.0), num_labels=4, max_shift=1)
    for i in range(12):
        row = mixed[i]
        assert row["label"].dtype == np.float32 and row["label"].shape == (4,)
        assert row["label"].sum() == pytest.approx(1.0) and row["label"][3] == 0
        assert np.count_nonzero(row["label"]) <= 2  # its own class and its partner's, nothing else
        np.testing.assert_array_equal(row["volume"], again[i]["volume"])
        np.testing.assert_array_equal(row["label"], again[i]["label"])
    assert any(not np.array_equal(mixed[i]["volume"], before[i]["volume"]) for i in range(12))
    mixed.set_epoch(1)
    assert any(not np.array_equal(mixed[i]["label"], again[i]["label"]) for i in range(12))  # another epoch
    # without mixing, the rows are what they were (the augmentation's draws are untouched)
    for i, row in enumerate(before):
        np.testing.assert_array_equal(row["volume"], AugmentedDataset(rows(), seed=1, max_shift=1)[i]["volume"])
    batch = MedMNIST3DCollator()([mixed[i] for i in range(4)])
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (4, 4)
    assert MedMNIST3DCollator()(before[:4])["labels"].dtype == torch.long
    # MedMNIST's own (N, 1) integer labels stay class indices
    as_in_the_npz = [{"volume": row["volume"], "label": np.array([row["label"]])} for row in before[:4]]
    assert MedMNIST3DCollator()(as_in_the_npz)["labels"].tolist() == [0, 1, 2, 0]


def test_a_run_trains_with_mixup_and_cutmix(shared_data_dir, tmp_path):
    out = tmp_path / "run"
    done = run_in_process(
        "train", "--dataset_name", "adrenalmnist3d", "--data_dir", shared_data_dir, "--output_dir", out,
        "--config_overrides", TINY_OVERRIDES, "--max_train_samples", 64, "--max_eval_samples", 16,
        "--max_test_samples", 16, "--per_device_train_batch_size", 16, "--num_train_epochs", 1,
        "--mixup_alpha", 0.4, "--cutmix_alpha", 1.0, "--label_smoothing_factor", 0.1, "--report_to", "none",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    train = json.loads((out / "train_results.json").read_text())
    assert np.isfinite(train["train_loss"]) and train["train_loss"] > 0
    assert (out / "model.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert "mixup_alpha" in card and "cutmix_alpha" in card  # the card lists the mixing with the augmentation
    assert 0 <= json.loads((out / "eval_results.json").read_text())["eval_accuracy"] <= 1
    bad = run_in_process("train", "--dataset_name", "adrenalmnist3d", "--data_dir", shared_data_dir,
                         "--output_dir", tmp_path / "bad", "--mix_prob", 1.5)  # fmt: skip
    assert bad.returncode == 2 and "--mix_prob must be in [0, 1], got 1.5" in bad.stderr
