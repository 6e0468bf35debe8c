"""The MedMNIST 3D loader: real files, synthetic files, downloads from a loopback server, errors, collator."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import huggingface_hub.constants
import medmnist
import numpy as np
import pytest
import torch
from medmnist_fakes import (
    FAKE_LABELS,
    FAKE_NAME,
    FAKE_SPLITS,
    LoopbackServer,
    Route,
    fake_arrays,
    fake_info,
    md5,
    npz_bytes,
)

from vivit_medmnist import data
from vivit_medmnist.data import (
    DEFAULT_DATA_DIR,
    MEDMNIST_CITATION,
    MedMNIST3DCollator,
    dataset_names,
    download_medmnist3d,
    load_medmnist3d,
    resolve_data_dir,
    resolve_dataset,
)

REAL_SPLITS = {"train": 1188, "validation": 98, "test": 298}
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` (hidden temp files included) with its size and mtime."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture(autouse=True)
def online(monkeypatch):
    """Tests start online with no data_dir override; each test opts into offline mode itself."""
    for var in (*OFFLINE_VARS, data.DATA_DIR_ENV):
        monkeypatch.delenv(var, raising=False)
    # huggingface_hub read HF_HUB_OFFLINE at import; the loopback downloads must not depend on the caller's env.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def fake(monkeypatch):
    """A tiny synthetic set (5/2/3 volumes of 28³, 3 classes) registered in medmnist.INFO as `tinymnist3d`."""
    arrays = fake_arrays()
    payload = npz_bytes(arrays)
    monkeypatch.setitem(medmnist.INFO, FAKE_NAME, fake_info(md5(payload)))
    return arrays, payload


@pytest.fixture
def server():
    srv = LoopbackServer().start()
    yield srv
    srv.stop()


def put(folder: Path, payload: bytes, name: str = f"{FAKE_NAME}.npz") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(payload)
    return folder / name


# ---------------------------------------------------------------------------------------------------------------
# Names, sizes, folders
# ---------------------------------------------------------------------------------------------------------------


def test_dataset_names_are_medmnist_3d_sets():
    assert dataset_names() == [
        "organmnist3d",
        "nodulemnist3d",
        "adrenalmnist3d",
        "fracturemnist3d",
        "vesselmnist3d",
        "synapsemnist3d",
    ]


@pytest.mark.parametrize("name", ["organmnist3d", "vesselmnist3d"])
@pytest.mark.parametrize("size, suffix", [(28, ""), (64, "_64")])
def test_resolve_dataset_reads_medmnist_info(name, size, suffix):
    src = resolve_dataset(name.upper(), size)
    info = medmnist.INFO[name]
    assert src.filename == f"{name}{suffix}.npz"
    assert (src.url, src.md5) == (info[f"url{suffix}"], info[f"MD5{suffix}"])
    assert list(src.label_names) == [info["label"][str(i)] for i in range(len(info["label"]))]
    assert src.n_samples == info["n_samples"]


def test_organmnist3d_label_names_in_order():
    names = resolve_dataset("organmnist3d").label_names
    assert len(names) == 11 and names[0] == "liver" and names[1] == "kidney-right" and names[-1] == "pancreas"


def test_unknown_name_or_size_lists_the_valid_ones():
    with pytest.raises(ValueError, match="organmnist3d, nodulemnist3d, adrenalmnist3d") as err:
        load_medmnist3d("pathmnist")  # a 2D set
    assert "'pathmnist'" in str(err.value)
    with pytest.raises(ValueError, match=r"no size 32.*expected one of: 28, 64"):
        load_medmnist3d("organmnist3d", size=32)


def test_data_dir_argument_then_env_then_default(monkeypatch, tmp_path):
    assert resolve_data_dir() == DEFAULT_DATA_DIR
    assert DEFAULT_DATA_DIR.name == "vivit_medmnist"
    monkeypatch.setenv("VIVIT_MEDMNIST_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"  # read at call time
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"


# ---------------------------------------------------------------------------------------------------------------
# Real data (../shared/data)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [28, 64])
def test_real_adrenalmnist3d(shared_data_dir, size):
    before = snapshot(shared_data_dir)
    ds = load_medmnist3d("adrenalmnist3d", size=size, data_dir=shared_data_dir, download=False)
    assert (
        snapshot(shared_data_dir) == before
    )  # loading a verified file writes nothing (the folder is read-only)

    assert isinstance(ds, datasets.DatasetDict)
    assert {split: len(d) for split, d in ds.items()} == REAL_SPLITS
    train = ds["train"]
    assert train.features["label"].names == ["normal", "hyperplasia"]
    assert train.features["volume"] == datasets.Array3D(shape=(size, size, size), dtype="uint8")
    assert train.info.license == "CC BY 4.0"
    assert train.info.citation == MEDMNIST_CITATION and "MedMNIST v2" in train.info.citation
    assert train.info.homepage == "https://medmnist.com/"
    assert "adrenal" in train.info.description.lower()

    suffix = "" if size == 28 else "_64"
    with np.load(shared_data_dir / f"adrenalmnist3d{suffix}.npz") as raw:
        for split, key in (("train", "train"), ("validation", "val"), ("test", "test")):
            row = ds[split][len(ds[split]) - 1]
            assert row["volume"].shape == (size,) * 3
            np.testing.assert_array_equal(row["volume"], raw[f"{key}_images"][-1])
            assert row["label"] == raw[f"{key}_labels"][-1, 0]
        np.testing.assert_array_equal(ds["test"][:]["label"], raw["test_labels"][:, 0])


def test_real_64_load_costs_at_most_1_5x_the_volumes(shared_data_dir):
    # In a fresh process: the peak RSS (ru_maxrss) added by load_medmnist3d, imports excluded.
    script = textwrap.dedent(
        f"""
        import json, resource
        import numpy as np
        from vivit_medmnist.data import load_medmnist3d
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        ds = load_medmnist3d("adrenalmnist3d", size=64, data_dir={str(shared_data_dir)!r}, download=False)
        row = ds["train"][0]
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        n = sum(len(d) for d in ds.values())
        print(json.dumps({{"delta": (after - before) * 1024, "volumes": n * 64**3}}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["volumes"] == 1584 * 64**3  # 415 MB
    assert result["delta"] <= 1.5 * result["volumes"], result


# ---------------------------------------------------------------------------------------------------------------
# Synthetic files: reading and validation
# ---------------------------------------------------------------------------------------------------------------


def test_synthetic_file_roundtrip(fake, tmp_path):
    arrays, payload = fake
    put(tmp_path, payload)
    before = snapshot(tmp_path)
    ds = load_medmnist3d(FAKE_NAME, data_dir=tmp_path, download=False)
    assert snapshot(tmp_path) == before
    assert {split: len(d) for split, d in ds.items()} == {"train": 5, "validation": 2, "test": 3}
    for split, key in (("train", "train"), ("validation", "val"), ("test", "test")):
        d = ds[split]
        assert d.split == split
        assert d.features["label"].names == list(FAKE_LABELS)
        batch = d[:]
        assert batch["volume"].dtype == np.int64  # datasets' numpy format: the stored uint8 values, widened
        np.testing.assert_array_equal(batch["volume"], arrays[f"{key}_images"])
        np.testing.assert_array_equal(batch["label"], arrays[f"{key}_labels"][:, 0])
        assert int(d[1]["label"]) == int(arrays[f"{key}_labels"][1, 0])
    # The fingerprint is explicit and stable: same file -> same fingerprint, splits differ.
    again = load_medmnist3d(FAKE_NAME, data_dir=tmp_path, download=False)
    assert again["train"]._fingerprint == ds["train"]._fingerprint != ds["test"]._fingerprint
    # The usual datasets operations keep working on the zero-copy table.
    shuffled = ds["train"].shuffle(seed=0).select(range(3))
    assert shuffled[0]["volume"].shape == (28, 28, 28) and len(shuffled) == 3


def test_env_var_data_dir(fake, tmp_path, monkeypatch):
    put(tmp_path / "env", fake[1])
    monkeypatch.setenv("VIVIT_MEDMNIST_DATA_DIR", str(tmp_path / "env"))
    assert len(load_medmnist3d(FAKE_NAME, download=False)["train"]) == 5


def test_size_64_uses_the_64_file_and_md5(monkeypatch, tmp_path):
    arrays = fake_arrays(size=64, n_samples={"train": 2, "val": 1, "test": 1})
    payload = npz_bytes(arrays)
    monkeypatch.setitem(
        medmnist.INFO, FAKE_NAME, fake_info("0" * 32, md5(payload), {"train": 2, "val": 1, "test": 1})
    )
    put(tmp_path, payload, f"{FAKE_NAME}_64.npz")
    ds = load_medmnist3d(FAKE_NAME, size=64, data_dir=tmp_path, download=False)
    assert ds["train"][0]["volume"].shape == (64, 64, 64)
    with pytest.raises(FileNotFoundError, match=f"{FAKE_NAME}.npz not found"):
        load_medmnist3d(FAKE_NAME, size=28, data_dir=tmp_path, download=False)


def test_corrupt_existing_file_is_an_error_and_is_left_alone(fake, tmp_path, server):
    path = put(tmp_path, fake[1][:-10] + b"0123456789")
    with pytest.raises(ValueError) as err:
        load_medmnist3d(FAKE_NAME, data_dir=tmp_path, url=server.url("/x.npz"))
    message = str(err.value)
    assert str(path) in message and md5(path.read_bytes()) in message and md5(fake[1]) in message
    assert server.requests == []  # not silently replaced either
    assert path.read_bytes().endswith(b"0123456789")


def with_file(monkeypatch, tmp_path: Path, payload: bytes, n_samples: dict | None = None) -> None:
    """Put `payload` in place as the fake set's file, with medmnist.INFO's MD5 patched to match it."""
    monkeypatch.setitem(medmnist.INFO, FAKE_NAME, fake_info(md5(payload), n_samples=n_samples))
    put(tmp_path, payload)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(lambda good: good[: len(good) // 2], id="truncated"),
        pytest.param(lambda good: b"<html>", id="html"),
    ],
)
def test_unreadable_npz(fake, tmp_path, monkeypatch, payload):
    with_file(monkeypatch, tmp_path, payload(fake[1]))
    with pytest.raises(
        ValueError, match=r"not a readable \.npz archive .*expected MedMNIST's npz .* with keys"
    ):
        load_medmnist3d(FAKE_NAME, data_dir=tmp_path)


def test_pickled_member_is_refused_not_unpickled(fake, tmp_path, monkeypatch):
    images = np.empty(5, dtype=object)  # np.savez pickles object arrays
    with_file(monkeypatch, tmp_path, npz_bytes({**fake[0], "train_images": images}))
    with pytest.raises(
        ValueError, match=r"cannot read the train arrays \(ValueError: Object arrays cannot be loaded"
    ):
        load_medmnist3d(FAKE_NAME, data_dir=tmp_path)


def test_missing_keys(fake, tmp_path, monkeypatch):
    arrays = {k: v for k, v in fake[0].items() if k != "val_labels"}
    with_file(monkeypatch, tmp_path, npz_bytes(arrays))
    with pytest.raises(ValueError, match=r"lacks keys \['val_labels'\]: expected \['train_images'"):
        load_medmnist3d(FAKE_NAME, data_dir=tmp_path)


def test_split_size_disagrees_with_info(fake, tmp_path, monkeypatch):
    with_file(monkeypatch, tmp_path, fake[1], n_samples={**FAKE_SPLITS, "val": 7})
    with pytest.raises(ValueError, match=r"val split has 2 images and 2 labels, expected 7 \(medmnist.INFO"):
        load_medmnist3d(FAKE_NAME, data_dir=tmp_path)


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda a: a.astype(np.float32), r"train_images is float32 \(5, 28, 28, 28\), expected uint8"),
        (lambda a: a[:, :27], r"train_images is uint8 \(5, 27, 28, 28\), expected uint8 \(5, 28, 28, 28\)"),
    ],
    ids=["dtype", "shape"],
)
def test_wrong_image_dtype_or_shape(fake, tmp_path, monkeypatch, change, expected):
    arrays = {**fake[0], "train_images": change(fake[0]["train_images"])}
    with_file(monkeypatch, tmp_path, npz_bytes(arrays))
    with pytest.raises(ValueError, match=expected):
        load_medmnist3d(FAKE_NAME, data_dir=tmp_path)


def test_labels_out_of_range(fake, tmp_path, monkeypatch):
    arrays = {**fake[0], "test_labels": np.array([[0], [3], [1]], dtype=np.uint8)}
    with_file(monkeypatch, tmp_path, npz_bytes(arrays))
    with pytest.raises(
        ValueError, match=r"test_labels holds \[3\], expected labels in 0..2 \(zero, one, two\)"
    ):
        load_medmnist3d(FAKE_NAME, data_dir=tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Downloads from a loopback server
# ---------------------------------------------------------------------------------------------------------------


def test_download_succeeds_verifies_and_is_reused(fake, tmp_path, server, monkeypatch):
    arrays, payload = fake
    server.routes["/tiny.npz"] = Route(payload)
    folder = tmp_path / "cache" / "new"  # created on demand
    ds = load_medmnist3d(FAKE_NAME, data_dir=folder, url=server.url("/tiny.npz"))
    assert server.requests == ["/tiny.npz"]
    assert [p.name for p in folder.iterdir()] == [f"{FAKE_NAME}.npz"]  # no temp file left
    assert (folder / f"{FAKE_NAME}.npz").read_bytes() == payload
    np.testing.assert_array_equal(ds["test"][:]["volume"], arrays["test_images"])
    # Second call: verified from disk, no request, also offline.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    load_medmnist3d(FAKE_NAME, data_dir=folder, url=server.url("/tiny.npz"))
    assert server.requests == ["/tiny.npz"]


def test_download_function_returns_the_path(fake, tmp_path, server):
    server.routes["/tiny.npz"] = Route(fake[1])
    path = download_medmnist3d(FAKE_NAME, data_dir=tmp_path, url=server.url("/tiny.npz"))
    assert path == tmp_path / f"{FAKE_NAME}.npz" and path.read_bytes() == fake[1]


def test_download_retries_a_5xx(fake, tmp_path, server):
    server.routes["/tiny.npz"] = Route(fake[1], fail_first=1)
    download_medmnist3d(FAKE_NAME, data_dir=tmp_path, url=server.url("/tiny.npz"), max_retries=1)
    assert server.requests == ["/tiny.npz", "/tiny.npz"]


@pytest.mark.parametrize(
    "route, expected",
    [
        (lambda good: Route(good[:-1] + b"X"), r"is corrupt: MD5 [0-9a-f]{32}, expected [0-9a-f]{32}"),
        (lambda good: Route(status=404), r"failed: HTTP 404 Not Found"),
        (lambda good: Route(status=500), r"failed: HTTP 500 Internal Server Error|failed: .*500"),
        (
            lambda good: Route(good, truncate_to=len(good) // 3),
            r"was cut off: expected \d+ bytes; RemoteProtocolError",
        ),
    ],
    ids=["corrupt", "404", "500", "truncated"],
)
def test_failed_download_leaves_nothing(fake, tmp_path, server, route, expected):
    server.routes["/tiny.npz"] = route(fake[1])
    url = server.url("/tiny.npz")
    with pytest.raises(OSError, match=expected) as err:
        download_medmnist3d(FAKE_NAME, data_dir=tmp_path, url=url, max_retries=0)
    assert url in str(err.value) and f"{FAKE_NAME}.npz" in str(err.value)
    if "corrupt" in expected:
        assert md5(fake[1]) in str(err.value) and md5(fake[1][:-1] + b"X") in str(err.value)
    assert list(tmp_path.iterdir()) == []  # neither the final file nor the temp file
    assert server.requests == ["/tiny.npz"]
    # Through the loader as well (404 is not retried), still leaving nothing behind.
    if "404" in expected:
        with pytest.raises(OSError, match=expected):
            load_medmnist3d(FAKE_NAME, data_dir=tmp_path, url=url)
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("var", OFFLINE_VARS)
def test_offline_never_touches_the_network(fake, tmp_path, server, monkeypatch, var):
    server.routes["/tiny.npz"] = Route(fake[1])
    url = server.url("/tiny.npz")
    monkeypatch.setenv(var, "1")  # set after huggingface_hub/datasets were imported: read at call time
    with pytest.raises(FileNotFoundError) as err:
        load_medmnist3d(FAKE_NAME, data_dir=tmp_path, url=url)
    message = str(err.value)
    for part in (f"{FAKE_NAME}.npz", str(tmp_path), url, md5(fake[1]), "offline mode", var, "wget"):
        assert part in message, part
    with pytest.raises(OSError, match="offline mode is on"):
        download_medmnist3d(FAKE_NAME, data_dir=tmp_path, url=url)
    assert server.requests == []
    assert list(tmp_path.iterdir()) == []


def test_download_false_missing_file(fake, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_medmnist3d(FAKE_NAME, data_dir=tmp_path, download=False)
    message = str(err.value)
    src = resolve_dataset(FAKE_NAME)
    for part in (f"{FAKE_NAME}.npz not found in {tmp_path}", "download=False", src.url, src.md5, "wget"):
        assert part in message, part


# ---------------------------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------------------------


def test_collator_makes_model_inputs(fake, tmp_path):
    arrays, payload = fake
    put(tmp_path, payload)
    train = load_medmnist3d(FAKE_NAME, data_dir=tmp_path, download=False)["train"]
    rows = [train[i] for i in range(4)]
    batch = MedMNIST3DCollator()(rows)
    assert set(batch) == {"pixel_values", "labels"}
    assert batch["pixel_values"].dtype == torch.float32 and batch["pixel_values"].shape == (4, 28, 1, 28, 28)
    expected = torch.from_numpy(arrays["train_images"][:4]).float().div(255).unsqueeze(2)
    torch.testing.assert_close(batch["pixel_values"], expected)
    assert batch["labels"].dtype == torch.int64
    assert batch["labels"].tolist() == arrays["train_labels"][:4, 0].tolist()
    # The rows a torch DataLoader gets from Dataset.__getitems__ (labels come as uint8 there), "labels" instead
    # of "label", extra keys, and unformatted rows (nested Python lists) all work.
    batched_rows = train.__getitems__([0, 1])
    assert MedMNIST3DCollator()(batched_rows)["labels"].dtype == torch.int64
    renamed = [{"volume": r["volume"], "labels": r["label"], "id": i} for i, r in enumerate(rows)]
    torch.testing.assert_close(MedMNIST3DCollator()(renamed)["labels"], batch["labels"])
    plain = [train.with_format(None)[i] for i in range(4)]
    torch.testing.assert_close(MedMNIST3DCollator()(plain)["pixel_values"], batch["pixel_values"])


def test_collator_uses_the_given_processor_and_rejects_non_uint8(fake):
    class Processor:
        def __call__(self, volumes, return_tensors):
            assert volumes.dtype == np.uint8 and return_tensors == "pt"
            return {"pixel_values": torch.zeros(len(volumes), 1)}

    rows = [{"volume": fake[0]["val_images"][i], "label": 1} for i in range(2)]
    assert MedMNIST3DCollator(Processor())(rows)["pixel_values"].shape == (2, 1)
    with pytest.raises(ValueError, match=r"volume must be uint8 volumes \(0..255\), got int64"):
        MedMNIST3DCollator()([{"volume": np.full((2, 2, 2), 300), "label": 0}])


def test_trainer_feeds_collated_real_batches_to_the_model(shared_data_dir, tmp_path):
    # The pattern documented on MedMNIST3DCollator: remove_unused_columns=False keeps the raw "volume" column
    # (no argument of forward), as for any raw-image column; the collator turns the rows into model inputs.
    from transformers import Trainer, TrainingArguments

    from vivit_medmnist import VivitMedmnistConfig, VivitMedmnistForVideoClassification

    ds = load_medmnist3d("adrenalmnist3d", data_dir=shared_data_dir, download=False)
    model = VivitMedmnistForVideoClassification(VivitMedmnistConfig(num_labels=2)).eval()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=ds["validation"], data_collator=MedMNIST3DCollator()
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["pixel_values"].shape == (4, 28, 1, 28, 28) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.int64 and batch["labels"].shape == (4,)
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (4, 2) and torch.isfinite(out.loss)
