"""Label 3D volumes stored as .npy / .npz / NIfTI files with a saved (or Hub) ViViT-MedMNIST model.

    vivit-medmnist-predict --model_name_or_path outputs/organmnist3d scan.npy batch.npz crop.nii.gz --top_k 3

Each array is one volume `(D, H, W)` or a batch `(N, D, H, W)`, uint8 (0..255, as MedMNIST stores them; other
integer types with values in 0..255 too) or floating point already scaled to [0, 1]. `D, H, W` must be the
model's `volume_size`, unless `--resize` (always for NIfTI) resizes it trilinearly with the model's processor.
A `.npz` contributes every array it holds, or only the one named by `--key`. Files are read with
`np.load(allow_pickle=False)`: pickled content (object arrays, pickles renamed .npy) is refused, never
unpickled. `.nii` / `.nii.gz` files are read with nibabel (`pip install 'vivit-medmnist[nifti]'`) as stored:
the first axis of the image array is taken as D.

What MedMNIST did to its volumes, which yours must match: each is a crop around the structure of interest
(OrganMNIST3D: CT mapped to grey levels with an abdominal window, then cropped to one organ's 3D bounding box),
resized to 28^3 (or 64^3), stored as uint8 0..255 (mask sets such as AdrenalMNIST3D hold only 0 and 255). A
raw scan in Hounsfield units is refused (floats outside [0, 1]): window and scale it first.

For every volume it prints the predicted label and the `--top_k` labels with their probabilities: calibrated,
`softmax(logits / T)` with the temperature T that training fitted on the validation split
(`config.calibration_temperature`), or the plain softmax for a model without one (the output says which);
`--output_file` also writes them as JSON: a list of `{"file", "key", "index", "label", "label_id",
"calibrated", "top_k": [{"label", "label_id", "probability"}, ...]}` (`key` is the array's name in a .npz, else
null; `index` the position in a batch, else null).

`--explain [METHOD]` also says why (`vivit_medmnist.explain`; default method: the one measured to localise best):
for every volume, in `--explain_dir` (default `explanations/`), the evidence map for the predicted class as
`<name>.<method>.npy` (`.nii.gz` with the input's affine when the input was NIfTI), aligned voxel for voxel with
the input (resized back to the input's shape where the volume was resized for the model), and
`<name>.<method>.png`: the three orthogonal slices through the map's peak, the volume as the model saw it in grey
with the map overlaid, a colour bar, and the predicted label with its probability. Existing files are refused
unless `--overwrite_output_file`; nothing is written into the model folder or over an input.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoModelForVideoClassification

import vivit_medmnist  # noqa: F401 -- registers the model with the Auto classes
from vivit_medmnist.cpu_speed import PRECISIONS, autocast_for, prepare_for_inference
from vivit_medmnist.explain import DEFAULT_METHOD, METHODS, explanation_paths, write_explanation
from vivit_medmnist.hub_files import check_model_path
from vivit_medmnist.safe_io import check_new_output, write_text_atomic
from vivit_medmnist.volume_files import InputError, is_nifti, load_arrays, nifti_header


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[3],  # what MedMNIST's preprocessing was
    )
    parser.add_argument(
        "files",
        nargs="+",
        help=".npy or .npz files of volumes (D, H, W) or batches (N, D, H, W), or .nii / .nii.gz volumes",
    )
    parser.add_argument(
        "--resize",
        action="store_true",
        help="resize volumes of another size to the model's volume_size (trilinear); NIfTI volumes always are",
    )
    parser.add_argument(
        "--model_name_or_path", required=True, help="a folder written by vivit-medmnist-train or a Hub id"
    )
    parser.add_argument("--top_k", type=int, default=3, help="how many labels to list per volume (default 3)")
    parser.add_argument("--key", default=None, help="in .npz files, label only this array")
    parser.add_argument(
        "--output_file", default=None, help="also write the predictions as JSON (a new file; never an input)"
    )
    parser.add_argument(
        "--overwrite_output_file", action="store_true", help="allow --output_file to replace an existing file"
    )
    parser.add_argument("--batch_size", type=int, default=32, help="volumes per forward pass (default 32)")
    parser.add_argument("--revision", default="main", help="the Hub revision of the model (default main)")
    parser.add_argument(
        "--explain",
        nargs="?",
        const=DEFAULT_METHOD,
        choices=METHODS,
        default=None,
        help=f"also write an evidence map and a PNG per volume (method; default {DEFAULT_METHOD})",
    )
    parser.add_argument("--explain_dir", default="explanations", help="where --explain writes (default explanations/)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto (default): bf16 autocast on a CPU where it is faster, as train.py evaluates there; else fp32",
    )
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top_k must be >= 1, got {args.top_k}")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    return args


def as_batch(array: np.ndarray, volume_size: list[int], where: str, resize: bool = False) -> np.ndarray:
    """(D, H, W) or (N, D, H, W) -> (N, D, H, W), with an error naming the expected shape (any size when
    `resize`)."""
    expected = tuple(volume_size)
    if array.ndim == 3 and (resize or array.shape == expected):
        return array[None]
    if array.ndim == 4 and (resize or array.shape[1:] == expected) and array.shape[0] > 0:
        return array
    raise InputError(
        f"{where}: expected one volume {expected} or a batch (N, {', '.join(map(str, expected))}), "
        f"got shape {array.shape}" + ("" if resize else " (--resize resizes volumes of another size)")
    )


def preprocess(
    processor, array: np.ndarray, volume_size: list[int], where: str, resize: bool = False, spacing=None
) -> torch.Tensor:
    """The model's pixel_values for a file's array; the processor's dtype and value checks, named by file. A
    processor saved with resizing (a model trained on the user's own volumes) resizes as it did in training."""
    resize = resize or processor.do_resize or getattr(processor, "keep_aspect_ratio", False)
    batch = as_batch(array, volume_size, where, resize)
    resizing = {"do_resize": True, "size": list(volume_size)} if resize else {}
    try:
        return processor(batch, return_tensors="pt", spacing=spacing, **resizing)["pixel_values"]
    except ValueError as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"{where}: {err}") from err


@torch.no_grad()
def predict(
    model, pixel_values: torch.Tensor, top_k: int, batch_size: int, bf16: bool = False
) -> list[list[tuple[int, float]]]:
    """[(label id, probability)] * top_k for every volume of the batch, most probable first; probabilities
    calibrated by the config's `calibration_temperature` where it has one."""
    temperature = getattr(model.config, "calibration_temperature", None) or 1.0
    results = []
    for start in range(0, len(pixel_values), batch_size):
        with autocast_for(model.device, bf16):
            logits = model(pixel_values=pixel_values[start : start + batch_size].to(model.device)).logits
        probabilities = (logits.float() / temperature).softmax(dim=-1)
        values, indices = probabilities.topk(min(top_k, probabilities.shape[-1]), dim=-1)
        results += [list(zip(i.tolist(), v.tolist())) for i, v in zip(indices, values)]
    return results


def main(argv=None) -> None:
    args = parse_args(argv)
    if message := check_model_path(args.model_name_or_path):
        sys.exit(f"error: {message}")
    if args.output_file:
        try:
            # never a file of the model folder either, flag or not
            check_new_output(args.output_file, args.overwrite_output_file, [*args.files, args.model_name_or_path])
        except FileExistsError as err:
            sys.exit(f"error: {err}")
    try:
        model = AutoModelForVideoClassification.from_pretrained(
            args.model_name_or_path, revision=args.revision
        )
        processor = AutoImageProcessor.from_pretrained(args.model_name_or_path, revision=args.revision)
    except Exception as err:  # noqa: BLE001 -- whichever library raised it: one error line
        sys.exit(f"error: cannot load a model and image processor from {args.model_name_or_path!r}: {err}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = prepare_for_inference(model, device, args.precision)
    id2label = model.config.id2label

    try:  # read and check every file (and where explanations go) before running the model: fail fast
        inputs = []
        for name in args.files:
            for key, array in load_arrays(Path(name), args.key):
                where = name if key is None else f"{name}[{key}]"
                resize = args.resize or is_nifti(Path(name))
                spacing = nifti_header(Path(name))[1] if is_nifti(Path(name)) else None
                pixel_values = preprocess(processor, array, model.config.volume_size, where, resize, spacing)
                inputs.append((name, key, array, pixel_values))
        if args.explain:
            for path in explanation_paths(args.explain_dir, args.explain, inputs):
                check_new_output(path, args.overwrite_output_file, [*args.files, args.model_name_or_path],
                                 option="--explain_dir file")  # fmt: skip
    except (InputError, FileExistsError) as err:
        sys.exit(f"error: {err}")

    calibrated = bool(getattr(model.config, "calibration_temperature", None))
    if calibrated:
        temperature = model.config.calibration_temperature
        print(f"probabilities: calibrated, softmax(logits / {temperature:.3g}) (temperature fitted on validation)")
    else:
        print("probabilities: raw softmax (the model has no calibration_temperature)")
    records = []
    for name, key, array, pixel_values in inputs:
        is_batch = array.ndim == 4
        for index, top in enumerate(predict(model, pixel_values, args.top_k, args.batch_size, bf16)):
            record = {
                "file": name,
                "key": key,
                "index": index if is_batch else None,
                "label": id2label[top[0][0]],
                "label_id": top[0][0],
                "calibrated": calibrated,
                "top_k": [{"label": id2label[i], "label_id": i, "probability": p} for i, p in top],
            }
            records.append(record)
            where = name + (f"[{key}]" if key is not None else "") + (f"[{index}]" if is_batch else "")
            ranking = ", ".join(f"{id2label[i]} {p:.4f}" for i, p in top)
            print(f"{where}: {record['label']}  (top-{len(top)}: {ranking})")
            if args.explain:
                volume = (name, key, array[index] if is_batch else array, pixel_values[index : index + 1])
                written = write_explanation(model, volume, index if is_batch else None, top[0], bf16,
                                            args.explain, args.explain_dir)  # fmt: skip
                print(f"  evidence ({args.explain}): {', '.join(map(str, written))}")
    if args.output_file:
        try:
            write_text_atomic(args.output_file, json.dumps(records, indent=2) + "\n")
        except OSError as err:
            sys.exit(f"error: cannot write --output_file {args.output_file}: {err}")


if __name__ == "__main__":
    main()
