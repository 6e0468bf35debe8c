"""VivitMedmnistImageProcessor: raw volumes -> pixel_values (N, D, 1, H, W) float32."""

import warnings

import numpy as np
import pytest
import torch

from vivit_medmnist import (
    VivitMedmnistConfig,
    VivitMedmnistForVideoClassification,
    VivitMedmnistImageProcessor,
)


@pytest.fixture()
def volumes() -> np.ndarray:
    return np.random.RandomState(0).randint(0, 256, size=(3, 28, 28, 28), dtype=np.uint8)


def test_uint8_batch_is_scaled_like_the_reference(volumes):
    pixel_values = VivitMedmnistImageProcessor()(volumes, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (3, 28, 1, 28, 28) and pixel_values.dtype == torch.float32
    expected = torch.from_numpy(
        volumes.astype(np.float32) / 255.0
    )  # the Keras example: tf.cast(x, f32) / 255
    torch.testing.assert_close(pixel_values[:, :, 0], expected)
    assert pixel_values.min() >= 0 and pixel_values.max() <= 1


def test_one_volume_torch_input_list_input_and_channels_last(volumes):
    processor = VivitMedmnistImageProcessor()
    batch = processor(volumes, return_tensors="pt")["pixel_values"]
    assert processor(volumes[1], return_tensors="pt")["pixel_values"].shape == (1, 28, 1, 28, 28)
    torch.testing.assert_close(processor(volumes[1], return_tensors="pt")["pixel_values"][0], batch[1])
    torch.testing.assert_close(
        processor(torch.from_numpy(volumes), return_tensors="pt")["pixel_values"], batch
    )
    torch.testing.assert_close(processor(list(volumes), return_tensors="pt")["pixel_values"], batch)
    torch.testing.assert_close(processor(volumes[..., None], return_tensors="pt")["pixel_values"], batch)
    floats = volumes[:1].astype(np.float32) / 255
    torch.testing.assert_close(
        processor(floats.tolist(), return_tensors="pt")["pixel_values"], batch[:1]
    )  # nested Python lists


def test_float_volumes_are_left_as_they_are():
    processor = VivitMedmnistImageProcessor()
    floats = np.random.RandomState(1).rand(2, 8, 8, 8)  # float64, already in [0, 1]
    pixel_values = processor(floats, return_tensors="pt")["pixel_values"]
    assert pixel_values.dtype == torch.float32
    torch.testing.assert_close(pixel_values[:, :, 0], torch.from_numpy(floats).float())


def test_numpy_output_normalisation_and_overrides(volumes):
    processor = VivitMedmnistImageProcessor(do_normalize=True, image_mean=0.5, image_std=0.25)
    out = processor(volumes, return_tensors="np")["pixel_values"]
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (3, 28, 1, 28, 28)
    np.testing.assert_allclose(out[:, :, 0], (volumes / 255.0 - 0.5) / 0.25, rtol=1e-5, atol=1e-5)
    raw = processor(volumes, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(raw[:, :, 0], torch.from_numpy(volumes).float())
    # normalising a float32 input must not modify the caller's array
    floats = np.ones((1, 4, 4, 4), dtype=np.float32)
    processor(floats)
    assert np.all(floats == 1)


def test_read_only_arrays_are_accepted_without_warnings(volumes):
    volumes.setflags(write=False)  # as np.load(..., mmap_mode="r") gives
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixel_values = VivitMedmnistImageProcessor()(volumes[:, ::-1], return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (3, 28, 1, 28, 28)


@pytest.mark.parametrize(
    "images, pattern",
    [
        (np.zeros((28, 28), dtype=np.uint8), r"expected one volume \(D, H, W\).*got shape \(28, 28\)"),
        (np.zeros((2, 28, 1, 28, 28), dtype=np.uint8), r"already \(N, D, C, H, W\) pixel_values"),
        (np.zeros((1, 2, 3, 4, 5, 6), dtype=np.uint8), r"got shape \(1, 2, 3, 4, 5, 6\)"),
        (
            np.full((2, 8, 8, 8), 300, dtype=np.int16),
            r"expected uint8 volumes \(0..255\) or floats scaled to \[0, 1\], got torch.int16 values in \[300, 300\]",
        ),
        (np.full((8, 8, 8), -1, dtype=np.int64), r"got torch.int64 values in \[-1, -1\]"),
        (np.full((8, 8, 8), 1.5), r"float volumes scaled to \[0, 1\].*got values in \[1.5, 1.5\]"),
        (np.full((8, 8, 8), np.nan, np.float32), r"got values in \[nan, nan\] \(NaN or inf\)"),
        (np.zeros((2, 8, 8, 8), dtype=bool), "got dtype torch.bool"),
        ([], "empty list"),
        ([np.zeros((8, 8, 8), np.uint8), np.zeros((8, 8, 9), np.uint8)], "same shape"),
        ("volume.npy", "expected a numpy array, a torch tensor"),
    ],
)
def test_bad_inputs_raise_a_clear_error(images, pattern):
    with pytest.raises(ValueError, match=pattern):
        VivitMedmnistImageProcessor()(images)


def test_bad_return_tensors():
    with pytest.raises(ValueError, match="return_tensors must be None, 'pt' or 'np', got 'tf'"):
        VivitMedmnistImageProcessor()(np.zeros((8, 8, 8), np.uint8), return_tensors="tf")


def test_save_and_load(tmp_path):
    processor = VivitMedmnistImageProcessor(do_normalize=True, image_mean=0.1, image_std=0.3)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    loaded = VivitMedmnistImageProcessor.from_pretrained(tmp_path)
    assert (loaded.do_normalize, loaded.image_mean, loaded.image_std) == (True, 0.1, 0.3)
    assert loaded.rescale_factor == pytest.approx(1 / 255)


def test_real_medmnist_volumes_feed_the_model(shared_data_dir):
    with np.load(shared_data_dir / "adrenalmnist3d.npz") as data:
        images = data["test_images"][:4]
    assert images.dtype == np.uint8 and images.shape == (4, 28, 28, 28)
    pixel_values = VivitMedmnistImageProcessor()(images, return_tensors="pt")["pixel_values"]
    model = VivitMedmnistForVideoClassification(VivitMedmnistConfig(num_labels=2, num_hidden_layers=1)).eval()
    with torch.no_grad():
        logits = model(pixel_values).logits
    assert logits.shape == (4, 2) and torch.isfinite(logits).all()


def test_return_tensors_none_gives_one_tensor_per_volume_like_other_image_processors(volumes):
    out = VivitMedmnistImageProcessor()(volumes)
    assert isinstance(out["pixel_values"], list) and len(out["pixel_values"]) == 3
    batch = VivitMedmnistImageProcessor()(volumes, return_tensors="pt")["pixel_values"]
    for one, expected in zip(out["pixel_values"], batch):
        assert one.shape == (28, 1, 28, 28)
        torch.testing.assert_close(one, expected)
    as_numpy = VivitMedmnistImageProcessor()(volumes, return_tensors="np")["pixel_values"]
    assert isinstance(as_numpy, np.ndarray) and as_numpy.shape == (3, 28, 1, 28, 28)


def test_documented_call_arguments_are_accepted(volumes):
    processor = VivitMedmnistImageProcessor()
    expected = processor(volumes, return_tensors="pt")["pixel_values"]
    got = processor(
        volumes, return_tensors="pt", data_format="channels_first", input_data_format="channels_last"
    )
    torch.testing.assert_close(got["pixel_values"], expected)
    with pytest.raises(ValueError, match="data_format: pixel_values are"):
        processor(volumes, data_format="channels_last")
    with pytest.raises(TypeError, match="unexpected arguments"):
        processor(volumes, do_center_crop=True)


def test_resize_to_the_models_volume_size(volumes):
    processor = VivitMedmnistImageProcessor(do_resize=True, size=14)
    small = processor(volumes, return_tensors="pt")["pixel_values"]
    assert small.shape == (3, 14, 1, 14, 14)
    # trilinear, align_corners=False: a 2x downsample averages each 2x2x2 block of the scaled volume
    scaled = torch.from_numpy(volumes).float() / 255
    blocks = scaled.reshape(3, 14, 2, 14, 2, 14, 2).mean(dim=(2, 4, 6))
    torch.testing.assert_close(small[:, :, 0], blocks)
    # volumes of different sizes become one batch; a volume already of that size is unchanged
    mixed = processor([volumes[0], np.zeros((20, 30, 40), np.uint8)], return_tensors="pt")["pixel_values"]
    assert mixed.shape == (2, 14, 1, 14, 14)
    torch.testing.assert_close(mixed[0], small[0])
    unchanged = VivitMedmnistImageProcessor(do_resize=True, size=[28, 28, 28])(volumes, return_tensors="pt")
    torch.testing.assert_close(
        unchanged["pixel_values"], VivitMedmnistImageProcessor()(volumes, return_tensors="pt")["pixel_values"]
    )
    # per call, and saved with the processor
    assert VivitMedmnistImageProcessor()(
        volumes, do_resize=True, size={"depth": 7, "height": 7, "width": 7}, return_tensors="pt"
    )["pixel_values"].shape == (3, 7, 1, 7, 7)
    with pytest.raises(ValueError, match="do_resize=True needs size"):
        VivitMedmnistImageProcessor(do_resize=True)
    with pytest.raises(ValueError, match="size must be a positive int or 3 of them"):
        VivitMedmnistImageProcessor(size=[28, 28])


def test_resize_settings_round_trip(tmp_path):
    VivitMedmnistImageProcessor(do_resize=True, size=[28, 28, 28]).save_pretrained(tmp_path)
    loaded = VivitMedmnistImageProcessor.from_pretrained(tmp_path)
    assert loaded.do_resize and loaded.size == [28, 28, 28]
