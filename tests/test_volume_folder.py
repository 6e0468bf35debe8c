"""Your own volumes (issue 20): folders of NIfTI / NumPy files and `datasets` datasets, their preprocessing saved
with the model, clear errors, and results that do not depend on the file format.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_safety import digest

from vivit_medmnist import VivitMedmnistImageProcessor
from vivit_medmnist import volume_folder as vf
from vivit_medmnist.volume_files import InputError
from vivit_medmnist.volume_folder import load_volume_dataset, load_volume_folder

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import export_volumes

nibabel = pytest.importorskip("nibabel")
TINY = "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64"


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def exported(shared_data_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exported")
    common = ["--data_dir", str(shared_data_dir), "--max_per_split", "32"]
    return {
        "nifti": export_volumes.main([*common, "--output", str(root / "nifti")]),
        "npy": export_volumes.main([*common, "--output", str(root / "npy"), "--format", "npy"]),
        "saved": export_volumes.main([*common, "--output", str(root / "saved"), "--format", "datasets",
                                      "--volume_column_name", "image", "--label_column_name", "diagnosis"]),
    }  # fmt: skip


def train_in_process(argv: list[str]) -> None:
    from vivit_medmnist.train import main

    main(argv)


def test_training_from_nifti_npy_and_datasets_equals_training_from_the_npz(exported, shared_data_dir, tmp_path):
    """The equivalence that cannot be faked: the same volumes in four formats, the same seed, the same weights
    and metrics bit for bit."""
    common = ["--config_overrides", TINY, "--num_train_epochs", "2", "--per_device_train_batch_size", "8",
              "--seed", "3", "--max_shift", "1", "--disable_tqdm", "true", "--report_to", "none"]  # fmt: skip
    sources = {
        "npz": ["--dataset_name", "adrenalmnist3d", "--data_dir", str(shared_data_dir), "--max_train_samples", "32",
                "--max_eval_samples", "32", "--max_test_samples", "32"],
        "nifti": ["--data_folder", str(exported["nifti"]), "--class_names", "normal", "hyperplasia"],
        "npy": ["--train_dir", str(exported["npy"] / "train"), "--validation_dir", str(exported["npy"] / "validation"),
                "--test_dir", str(exported["npy"] / "test"), "--class_names", "normal", "hyperplasia"],
        "saved": ["--dataset_name", str(exported["saved"]), "--volume_column_name", "image",
                  "--label_column_name", "diagnosis"],
    }  # fmt: skip
    before = {name: tree_digest(path) for name, path in exported.items()}
    for name, args in sources.items():
        train_in_process([*args, *common, "--output_dir", str(tmp_path / name)])
    reference = load_file(tmp_path / "npz" / "model.safetensors")
    expected = json.loads((tmp_path / "npz" / "all_results.json").read_text())
    for name in ("nifti", "npy", "saved"):
        weights = load_file(tmp_path / name / "model.safetensors")
        assert all(torch.equal(weights[k], reference[k]) for k in reference), name
        got = json.loads((tmp_path / name / "all_results.json").read_text())
        for key in ("test_accuracy", "test_auc", "test_loss", "eval_loss", "train_eval_loss", "test_ece"):
            assert got[key] == expected[key], (name, key)
    assert {name: tree_digest(path) for name, path in exported.items()} == before  # nothing written in them


def test_missing_splits_are_cut_stratified_from_the_seed_and_recorded(tmp_path):
    root = tmp_path / "crops"
    rng = np.random.default_rng(0)
    for name, count in (("cyst", 30), ("solid", 20)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            np.save(root / name / f"{name}_{i:02d}.npy", rng.integers(0, 255, (20, 24, 24), dtype=np.uint8))
    processor = VivitMedmnistImageProcessor(do_resize=True, size=16)
    data = load_volume_folder(root, processor, seed=7, validation_fraction=0.2, test_fraction=0.2)
    assert [len(data[s]) for s in ("train", "validation", "test")] == [30, 10, 10]
    for split in ("validation", "test"):
        assert sorted(np.bincount(np.asarray(data[split]["label"]))) == [4, 6]  # 60/40 kept in each
    assert data["train"][0]["volume"].shape == (16, 16, 16) and data["train"].features["label"].names == ["cyst", "solid"]
    made = data.splits_made
    assert made["seed"] == 7 and len(made["files"]["validation"]) == 10 and made["files"]["test"][0].endswith(".npy")
    again = load_volume_folder(root, processor, seed=7, validation_fraction=0.2, test_fraction=0.2)
    assert again.splits_made == made  # the seed decides, nothing else


def test_a_second_load_reads_the_cache_not_the_files(tmp_path, monkeypatch):
    root = tmp_path / "crops"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(6):
            np.save(root / name / f"{i}.npy", np.full((8, 8, 8), i * 20, dtype=np.uint8))
    processor = VivitMedmnistImageProcessor(do_resize=True, size=8)
    calls = []
    original = vf._read
    monkeypatch.setattr(vf, "_read", lambda *a: calls.append(a) or original(*a))
    first = load_volume_folder(root, processor, cache_dir=str(tmp_path / "cache"))
    read = len(calls)
    second = load_volume_folder(root, processor, cache_dir=str(tmp_path / "cache"))
    assert read == 12 and len(calls) == read  # the second load read no file
    assert np.array_equal(first["train"]["volume"], second["train"]["volume"])
    np.save(root / "a" / "0.npy", np.full((8, 8, 8), 255, dtype=np.uint8))  # a changed file is read again
    load_volume_folder(root, processor, cache_dir=str(tmp_path / "cache"))
    assert len(calls) > read


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda r: (r / "b").mkdir(), "b: the class folder holds no volume file"),
        (lambda r: (r / "a" / "broken.nii.gz").write_bytes(b"not a nifti"), "broken.nii.gz: not a readable NIfTI file"),
        (lambda r: np.save(r / "a" / "slice.npy", np.zeros((8, 8), np.uint8)), "slice.npy: expected a 3D volume (D, H, W), got a 2D image"),
        (lambda r: np.save(r / "a" / "ct.npy", np.full((8, 8, 8), -1000.0)), "ct.npy: expected float volumes scaled to [0, 1]"),
    ],
)  # fmt: skip
def test_a_bad_folder_or_file_is_named(tmp_path, make, message):
    root = tmp_path / "crops"
    for name in ("a", "c"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            np.save(root / name / f"{i}.npy", np.zeros((8, 8, 8), np.uint8))
    make(root)
    before = tree_digest(root)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        load_volume_folder(root, VivitMedmnistImageProcessor(do_resize=True, size=8), cache_dir=str(tmp_path / "cache"))
    assert tree_digest(root) == before


def test_a_class_in_validation_that_training_has_not_is_an_error(tmp_path):
    for split, classes in (("train", ("a", "b")), ("validation", ("a", "b", "z"))):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            np.save(tmp_path / split / name / "0.npy", np.zeros((8, 8, 8), np.uint8))
    with pytest.raises(InputError, match="the validation split has classes that training has not: z"):
        load_volume_folder(tmp_path, VivitMedmnistImageProcessor(do_resize=True, size=8))


def test_a_label_column_that_is_not_a_class_label_is_an_error(tmp_path):
    rows = {"volume": [np.zeros((4, 4, 4), np.uint8)] * 4, "label": ["x", "y", "x", "y"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(InputError, match="the label column 'label' is .*expected a ClassLabel"):
        load_volume_dataset(str(tmp_path / "ds"), VivitMedmnistImageProcessor(do_resize=True, size=4))
    with pytest.raises(InputError, match="no column 'image'"):
        load_volume_dataset(str(tmp_path / "ds"), VivitMedmnistImageProcessor(do_resize=True, size=4), volume_column="image")


def test_ct_window_and_spacing_are_saved_with_the_model_and_predict_repeats_them_exactly(tmp_path):
    """A CT volume in Hounsfield units with anisotropic voxels: the folder loader stores what the processor makes
    of it, and predict.py on the raw NIfTI feeds the model exactly those values."""
    from test_hub_files import make_folder, tiny_model

    rng = np.random.default_rng(1)
    hu = rng.normal(40, 300, (30, 50, 44)).astype(np.float32)
    spacing = (3.0, 0.8, 0.8)
    (tmp_path / "ct" / "liver").mkdir(parents=True)
    (tmp_path / "ct" / "spleen").mkdir(parents=True)
    nibabel.save(nibabel.Nifti1Image(hu, np.diag([*spacing, 1.0])), tmp_path / "ct" / "liver" / "scan.nii.gz")
    nibabel.save(nibabel.Nifti1Image(hu[::-1].copy(), np.diag([*spacing, 1.0])), tmp_path / "ct" / "spleen" / "scan.nii.gz")
    processor = VivitMedmnistImageProcessor(intensity_window=[-160, 240], keep_aspect_ratio=True, do_resize=True, size=28)
    data = load_volume_folder({"test": tmp_path / "ct"}, processor, make_missing_splits=False)
    stored = np.asarray(data["test"][0]["volume"], dtype=np.uint8)  # the liver scan (files by name, then class)
    assert stored.shape == (28, 28, 28) and data["test"].features["volume"].dtype == "uint8"
    depth_rows = np.flatnonzero(stored.reshape(28, -1).max(1) > 0)
    assert len(depth_rows) == 28 and (stored.max((0, 1)) > 0).sum() < 28  # D is the longest side: W padded

    model_dir = tmp_path / "model"
    make_folder(model_dir, tiny_model())
    processor.save_pretrained(model_dir)  # the processor a run on these volumes saves
    from vivit_medmnist.predict import main

    main(["--model_name_or_path", str(model_dir), str(tmp_path / "ct" / "liver" / "scan.nii.gz"),
          "--output_file", str(tmp_path / "p.json"), "--precision", "fp32", "--top_k", "2"])  # fmt: skip
    got = json.loads((tmp_path / "p.json").read_text())[0]["top_k"]
    with torch.no_grad():
        logits = tiny_model()(pixel_values=torch.from_numpy(stored).float().div(255)[None, :, None]).logits[0]
    expected = logits.softmax(-1)
    np.testing.assert_allclose([e["probability"] for e in sorted(got, key=lambda e: e["label_id"])], expected, atol=1e-5)


def test_default_preprocessing_keeps_medmnist_volumes_unchanged():
    volume = np.random.default_rng(2).integers(0, 256, (28, 28, 28), dtype=np.uint8)
    processor = VivitMedmnistImageProcessor(do_resize=True, size=28)
    assert vf.preprocess_volume(volume, processor) is volume
    plain = VivitMedmnistImageProcessor()(volume, return_tensors="pt")["pixel_values"]
    assert torch.equal(processor(volume, return_tensors="pt")["pixel_values"], plain)  # no window: nothing new
