"""A demo in the browser: a volume, the evidence the model used, and its calibrated class probabilities.

    vivit-medmnist-demo outputs/organmnist3d                       # then open http://127.0.0.1:7860
    vivit-medmnist-demo ORG/vivit-organmnist3d --examples a.npy b.nii.gz --port 7861
    vivit-medmnist-demo ORG/vivit-organmnist3d --write_space my-space/   # the same app as a Hugging Face Space

Upload a `.npy` / `.npz` / `.nii` / `.nii.gz` volume (read as `vivit-medmnist-predict` reads it, resized to the
model's size) or pick an example; the page shows the three orthogonal slices through the evidence's peak with
sliders to move through the volume, the evidence map overlaid with an opacity slider and a choice of method
(`vivit_medmnist.explain`), and the class probabilities, calibrated with the model's `calibration_temperature`
where it has one (the page says which). Gradio is the `demo` extra: `pip install 'vivit-medmnist[demo]'`.

As a Space: `--write_space DIR` writes `app.py` (this app for the model id), `requirements.txt` and the Space's
`README.md` into a new folder DIR; create a Gradio Space on the Hub and push that folder to it (`hf upload
ORG/SPACE DIR --repo-type space`). The model must be on the Hub (`vivit-medmnist-publish`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .calibration import calibrated_probabilities
from .cpu_speed import autocast_for, prepare_for_inference
from .explain import DEFAULT_METHOD, METHODS, explain, heatmap_peak
from .volume_files import InputError, is_nifti, load_arrays, nifti_header

VIEWS = ("axial (D)", "coronal (H)", "sagittal (W)")
DISPLAY = 256  # pixels per slice edge on the page


class VolumeModel:
    """The model and processor, and what the page asks of them: read a file, predict, explain."""

    def __init__(self, model_name_or_path: str, precision: str = "auto"):
        from transformers import AutoImageProcessor, AutoModelForVideoClassification

        import vivit_medmnist  # noqa: F401 -- registers the classes with the Auto classes

        self.name = model_name_or_path
        self.model = AutoModelForVideoClassification.from_pretrained(model_name_or_path)
        self.processor = AutoImageProcessor.from_pretrained(model_name_or_path)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.bf16 = prepare_for_inference(self.model, self.device, precision)
        self.size = list(self.model.config.volume_size)
        self.temperature = getattr(self.model.config, "calibration_temperature", None)
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]

    def read(self, path: str) -> torch.Tensor:
        """The first volume of a file as the model's pixel_values (1, D, 1, H, W); InputError when it is none."""
        arrays = load_arrays(Path(path), None)
        array = arrays[0][1]
        if array.ndim == 4:
            array = array[0]
        if array.ndim != 3:
            raise InputError(f"{Path(path).name}: expected a volume (D, H, W), got an array of shape {array.shape}")
        spacing = nifti_header(Path(path))[1] if is_nifti(Path(path)) else None  # for keep_aspect_ratio
        try:
            return self.processor(array, return_tensors="pt", do_resize=True, size=self.size, spacing=spacing)[
                "pixel_values"
            ]
        except ValueError as err:
            raise InputError(f"{Path(path).name}: {err}") from err

    def probabilities(self, pixel_values: torch.Tensor) -> np.ndarray:
        with torch.no_grad(), autocast_for(self.device, self.bf16):
            logits = self.model(pixel_values=pixel_values.to(self.device)).logits.float().cpu().numpy()
        return calibrated_probabilities(logits, self.temperature)[0]

    def evidence(self, pixel_values: torch.Tensor, method: str, target: int) -> np.ndarray:
        with autocast_for(self.device, self.bf16):
            return explain(self.model, pixel_values, method, target=target)[0]


def render(volume: np.ndarray, heatmap: np.ndarray | None, indices, opacity: float) -> list[np.ndarray]:
    """The three orthogonal slices at `indices` (D, H, W) as RGB uint8 images, the volume in grey and the heatmap
    (scaled to its maximum, 'inferno') blended in with `opacity` where it is above zero."""
    from matplotlib import colormaps

    colour = colormaps["inferno"]
    top = float(heatmap.max()) if heatmap is not None and heatmap.max() > 0 else 1.0
    images = []
    for axis, index in enumerate(indices):
        take = [slice(None)] * 3
        take[axis] = int(np.clip(index, 0, volume.shape[axis] - 1))
        grey = np.repeat(volume[tuple(take)][..., None], 3, -1)
        if heatmap is not None:
            level = heatmap[tuple(take)] / top
            weight = (opacity * (level > 0))[..., None]
            grey = (1 - weight) * grey + weight * colour(level)[..., :3]
        scale = max(1, DISPLAY // max(grey.shape[:2]))
        images.append((np.kron(grey, np.ones((scale, scale, 1))) * 255).round().astype(np.uint8))
    return images


def describe(heatmap: np.ndarray) -> str:
    if heatmap.max() <= 0:
        return "no evidence found (the method sees nothing that raises this class's score)"
    return f"peak at {heatmap_peak(heatmap)}"


def build_demo(model_name_or_path: str, examples: list[str] | None = None, precision: str = "auto"):
    """The Gradio app (a `gradio.Blocks`) for one model."""
    import gradio as gr

    runner = VolumeModel(model_name_or_path, precision)
    size = runner.size
    calibration = (
        f"calibrated probabilities: softmax(logits / {runner.temperature:.3g}), temperature fitted on validation"
        if runner.temperature
        else "raw softmax probabilities (this model has no calibration_temperature)"
    )

    def analyse(path, method, opacity, state):
        if not path:
            raise gr.Error("upload a .npy, .npz, .nii or .nii.gz volume, or pick an example")
        try:
            pixel_values = runner.read(path)
        except InputError as err:
            raise gr.Error(str(err)) from None
        start = time.perf_counter()
        probabilities = runner.probabilities(pixel_values)
        target = int(probabilities.argmax())
        heatmap = runner.evidence(pixel_values, method, target)
        seconds = time.perf_counter() - start
        state = {"pixel_values": pixel_values, "target": target, "maps": {method: heatmap}}
        peak = heatmap_peak(heatmap)
        volume = pixel_values[0, :, 0].numpy()
        status = (
            f"**{runner.labels[target]}** ({probabilities[target]:.3f}); {calibration}. Evidence for it: "
            f"{method}, {seconds:.1f} s; {describe(heatmap)}."
        )
        scores = {label: float(p) for label, p in zip(runner.labels, probabilities)}
        return (*render(volume, heatmap, peak, opacity), scores, status, *peak, state)

    def change_method(method, d, h, w, opacity, state):
        if not state:
            return (gr.skip(),) * 4 + (state,)
        if method not in state["maps"]:
            start = time.perf_counter()
            state["maps"][method] = runner.evidence(state["pixel_values"], method, state["target"])
            gr.Info(f"{method}: {time.perf_counter() - start:.1f} s")
        volume = state["pixel_values"][0, :, 0].numpy()
        status = f"Evidence for **{runner.labels[state['target']]}** by {method}: {describe(state['maps'][method])}."
        return (*render(volume, state["maps"][method], (d, h, w), opacity), status, state)

    def move(method, d, h, w, opacity, state):
        if not state:
            return (gr.skip(),) * 3
        volume = state["pixel_values"][0, :, 0].numpy()
        return tuple(render(volume, state["maps"].get(method), (d, h, w), opacity))

    with gr.Blocks(title="vivit-medmnist: see why") as demo:
        gr.Markdown(
            f"## {Path(str(model_name_or_path)).name}: a ViViT on {' × '.join(map(str, size))} volumes\n"
            f"Classes: {', '.join(runner.labels)}. Upload a volume (resized to the model's size) or pick an "
            f"example. {calibration.capitalize()}. Research use only: not a medical device."
        )
        state = gr.State(None)
        with gr.Row():
            upload = gr.File(label="volume (.npy, .npz, .nii, .nii.gz)", file_types=[".npy", ".npz", ".nii", ".gz"])
            with gr.Column():
                method = gr.Radio(list(METHODS), value=DEFAULT_METHOD, label="explanation method", elem_id="method")
                opacity = gr.Slider(0, 1, value=0.6, step=0.05, label="opacity of the evidence")
                example = gr.Dropdown(examples or [], label="example volumes", visible=bool(examples))
        with gr.Row():
            images = [
                gr.Image(label=view, type="numpy", interactive=False, format="png", elem_id=f"view-{view.split()[0]}")
                for view in VIEWS
            ]
        with gr.Row():
            sliders = [
                gr.Slider(0, n - 1, value=n // 2, step=1, label=f"slice {axis}", elem_id=f"slice-{axis}")
                for axis, n in zip("DHW", size)
            ]
        status = gr.Markdown()
        scores = gr.Label(label="class probabilities", num_top_classes=min(5, len(runner.labels)))

        outputs = [*images, scores, status, *sliders, state]
        upload.upload(analyse, [upload, method, opacity, state], outputs)
        example.change(analyse, [example, method, opacity, state], outputs)
        method.change(change_method, [method, *sliders, opacity, state], [*images, status, state])
        for control in (*sliders, opacity):
            control.change(move, [method, *sliders, opacity, state], images)
    return demo


SPACE_APP = '''"""A Hugging Face Space: the vivit-medmnist demo of {model}."""
from vivit_medmnist.demo import build_demo

build_demo("{model}").launch()
'''
SPACE_README = """---
title: {title}
emoji: 🧊
colorFrom: gray
colorTo: yellow
sdk: gradio
app_file: app.py
pinned: false
---

The vivit-medmnist demo of [{model}](https://huggingface.co/{model}): upload a volume, see the evidence the model
used and its calibrated class probabilities. Research use only: not a medical device.
"""


def write_space(model: str, folder: Path) -> list[Path]:
    """A new folder holding a Gradio Space of this demo for the Hub model `model`."""
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"--write_space {folder} exists and is not empty; choose a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "app.py": SPACE_APP.format(model=model),
        "requirements.txt": "vivit-medmnist[demo,explain,nifti]\n",
        "README.md": SPACE_README.format(model=model, title=model.split("/")[-1]),
    }
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return [folder / name for name in files]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_name_or_path", help="a folder written by vivit-medmnist-train, or a Hub id")
    parser.add_argument("--examples", nargs="*", default=[], help="volume files offered as examples")
    parser.add_argument("--host", default="127.0.0.1", help="the address to serve on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also a temporary public link (gradio share)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--write_space", type=Path, help="write a Hugging Face Space of this app here and stop")
    args = parser.parse_args(argv)
    if args.write_space:
        try:
            written = write_space(args.model_name_or_path, args.write_space)
        except FileExistsError as err:
            sys.exit(f"error: {err}")
        print("wrote " + ", ".join(map(str, written)))
        return
    missing = [path for path in args.examples if not Path(path).is_file()]
    if missing:
        parser.error(f"--examples: no such file {', '.join(missing)}")
    try:
        import gradio  # noqa: F401
    except ImportError:
        sys.exit("error: the demo needs gradio: pip install 'vivit-medmnist[demo]'")
    try:
        demo = build_demo(args.model_name_or_path, args.examples, args.precision)
    except Exception as err:  # noqa: BLE001 -- whichever library raised it: one error line
        sys.exit(f"error: cannot load a model and image processor from {args.model_name_or_path!r}: {err}")
    demo.launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
