"""Which files of a model folder go to the Hub, and the checks they pass before they go.

```python
from vivit_medmnist.hub_files import publishable_files, check_folder

publishable_files("outputs/run")  # ['README.md', 'config.json', ..., 'model.safetensors', ...]
check_folder("outputs/run").raise_for_problems()  # files, no pickles, loads without this package
```

Training checkpoints (`<folder>/checkpoints/`, holding pickled `optimizer.pt`, `rng_state.pth`,
`training_args.bin`) and anything else the model does not need (`publishable_files`) are never published.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# What gets uploaded is exactly what the model needs, derived from the folder itself (`publishable_files`): the
# weights and configs, the code files that config.json's and preprocessor_config.json's `auto_map` and the
# pipeline entry of `custom_pipelines` name (and the sibling modules those import), the model card and the images
# it shows, and the metrics train.py writes. Anything else at the top of the folder (a user's script, notes) is
# left out and listed by `left_out_files`; subfolders (checkpoints/) are never looked into.
MODEL_FILES = ("model.safetensors", "config.json", "preprocessor_config.json", "README.md")
RESULT_FILES = (
    "all_results.json",
    "train_results.json",
    "eval_results.json",
    "test_results.json",
    "train_eval_results.json",
)


# Without these a folder is not a usable model repository.
REQUIRED_FILES = ("model.safetensors", "config.json", "preprocessor_config.json", "README.md")


# Extensions of files that torch/pickle write (never published even if an allow pattern matched them).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")


# The card's "how to load" snippet names the model by this placeholder until `publish.py` knows the repo id.
REPO_ID_PLACEHOLDER = "<hub-user>/<model-name>"


def check_model_path(name: str) -> str | None:
    """An error message when `name` is neither an existing model folder nor shaped like a Hub id ORG/NAME."""
    path = Path(name).expanduser()
    if path.exists():
        return None if path.is_dir() else f"{name} is a file; expected a model folder or a Hub id ORG/NAME"
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        return f"{name}: no such model folder (and not a Hub id ORG/NAME)"
    return None


def publishable_files(folder: str | os.PathLike) -> list[str]:
    """The names of the files of `folder` that would be uploaded, sorted: `MODEL_FILES`, the code the configs
    name (`code_files`), the images the model card links to, and `RESULT_FILES`, where they exist at the top of
    the folder. Nothing with a pickle extension; subfolders (checkpoints/, runs/) are never looked into."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(
            f"{folder} is not a folder (expected a model folder written by vivit-medmnist-train)"
        )
    wanted = {*MODEL_FILES, *RESULT_FILES, *code_files(folder), *card_images(folder)}
    return sorted(
        name
        for name in wanted
        if (folder / name).is_file() and "/" not in name and not name.lower().endswith(PICKLE_SUFFIXES)
    )


def left_out_files(folder: str | os.PathLike) -> list[str]:
    """What else is at the top of `folder` and is not uploaded (subfolders end with '/')."""
    from .safe_io import LOCK_NAME

    folder = Path(folder)
    published = {*publishable_files(folder), LOCK_NAME}
    return sorted(
        path.name + ("/" if path.is_dir() else "") for path in folder.iterdir() if path.name not in published
    )


_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import\s", re.MULTILINE)


def code_files(folder: str | os.PathLike) -> list[str]:
    """The Python files the model needs where this package is not installed: the modules named by config.json's
    `auto_map` and `custom_pipelines` and by preprocessor_config.json's `auto_map` (entries such as
    "modeling_vivit_medmnist.VivitMedmnistModel"; "repo--module.Class" lives elsewhere), and the sibling modules
    they import relatively (`from .configuration_vivit_medmnist import ...`), transitively."""
    folder = Path(folder)
    references = []
    for name, keys in (("config.json", ("auto_map", "custom_pipelines")), ("preprocessor_config.json", ("auto_map",))):
        try:
            config = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for key in keys:
            references += _class_references(config.get(key))
    modules = {ref.rsplit(".", 1)[0] for ref in references if "--" not in ref and "." in ref}
    found, todo = set(), [f"{module}.py" for module in modules]
    while todo:
        name = todo.pop()
        path = folder / name
        if name in found or not path.is_file():
            continue
        found.add(name)
        todo += [f"{module}.py" for module in _RELATIVE_IMPORT.findall(path.read_text(encoding="utf-8"))]
    return sorted(found)


def _class_references(value) -> list[str]:
    """The "module.Class" strings of an `auto_map` or `custom_pipelines` value (nested dicts/lists)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        items = [v for k, v in value.items() if k != "pt" and k != "tf" and k != "type"]
        return [ref for item in items for ref in _class_references(item)]
    if isinstance(value, (list, tuple)):
        return [ref for item in value if item is not None for ref in _class_references(item)]
    return []


_MARKDOWN_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


def card_images(folder: str | os.PathLike) -> list[str]:
    """The files of `folder` that its README.md shows as images (`![...](name.png)`, relative links)."""
    try:
        text = (Path(folder) / "README.md").read_text(encoding="utf-8")
    except OSError:
        return []
    return sorted({link for link in _MARKDOWN_IMAGE.findall(text) if "://" not in link and not link.startswith("/")})


def _is_pickle_bytes(head: bytes) -> bool:
    # Protocol 2+ pickles start with PROTO (0x80) and the protocol number; torch.save writes a zip holding data.pkl.
    return (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or head.startswith(b"PK\x03\x04")


def find_pickled_files(folder: str | os.PathLike, names: Iterable[str]) -> list[str]:
    """Those of `names` (files in `folder`) that are or may be pickles: a pickle extension, pickle/zip magic bytes,
    or a `.safetensors` file whose header safetensors cannot read."""
    from safetensors import safe_open

    found = []
    for name in names:
        path = Path(folder) / name
        if name.lower().endswith(PICKLE_SUFFIXES):
            found.append(name)
        elif name.endswith(".safetensors"):
            try:
                with safe_open(path, framework="pt"):
                    pass
            except Exception:  # noqa: BLE001 -- any failure means "not a safetensors file"
                found.append(name)
        else:
            with open(path, "rb") as f:
                if _is_pickle_bytes(f.read(4)):
                    found.append(name)
    return found


# Run in a fresh interpreter where `vivit_medmnist` cannot be imported (what a Hub user without the package has):
# load model and processor through the Auto classes with trust_remote_code=True and run one volume.
_LOAD_SCRIPT = r"""
import json, sys
sys.modules["vivit_medmnist"] = None  # any `import vivit_medmnist` now raises ImportError
import numpy as np, torch
from transformers import AutoImageProcessor, AutoModelForVideoClassification
folder = sys.argv[1]
model = AutoModelForVideoClassification.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
shape = tuple(model.config.volume_size)
volume = (np.arange(int(np.prod(shape))) % 251).astype(np.uint8).reshape(shape)  # = probe_volume(shape)
with torch.no_grad():
    logits = model(**processor(volume, return_tensors="pt")).logits
top = None
if getattr(model.config, "custom_pipelines", None):  # the folder's own pipeline, as pipeline() finds it
    from transformers import pipeline
    top = pipeline(model=folder, trust_remote_code=True)(volume)
print(json.dumps({
    "pipeline": top,
    "model_class": type(model).__module__ + "." + type(model).__name__,
    "processor_class": type(processor).__module__ + "." + type(processor).__name__,
    "num_labels": model.config.num_labels,
    "id2label": {str(k): v for k, v in model.config.id2label.items()},
    "logits": logits[0].tolist(),
}))
"""


def probe_volume(volume_size) -> np.ndarray:
    """The volume `load_without_package` feeds the model (to compare its logits with another load)."""
    shape = tuple(volume_size)
    return (np.arange(int(np.prod(shape))) % 251).astype(np.uint8).reshape(shape)


def load_without_package(folder: str | os.PathLike, timeout: float = 600, name: str | None = None) -> dict:
    """Load `folder` with `AutoModelForVideoClassification`/`AutoImageProcessor` (`trust_remote_code=True`) in a
    subprocess where `vivit_medmnist` is not importable, run `probe_volume`, and return what it reported:
    `model_class`, `processor_class`, `num_labels`, `id2label`, `logits`. Raises RuntimeError (with the
    subprocess's error output) if the folder does not load or run; `name` is how messages call the folder. Where
    the folder names a pipeline (`custom_pipelines`), `pipeline` holds what `pipeline(model=folder,
    trust_remote_code=True)(probe_volume)` answered, else None."""
    folder = Path(folder).resolve()
    name = name or str(folder)
    with tempfile.TemporaryDirectory(prefix="vivit-load-check-") as tmp:
        env = dict(os.environ, HF_MODULES_CACHE=tmp, HF_HUB_OFFLINE="1", PYTHONNOUSERSITE="1")
        env.pop("PYTHONPATH", None)
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _LOAD_SCRIPT, str(folder)],
                check=False,
                cwd=tmp,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"loading {name} without vivit_medmnist took more than {timeout} s") from err
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(
            f"{name} does not load with trust_remote_code=True where vivit_medmnist is not installed:\n{tail}"
        )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if not report["model_class"].startswith("transformers_modules."):
        raise RuntimeError(
            f"the model was not loaded from the folder's own code but from {report['model_class']}"
        )
    return report


@dataclass
class FolderCheck:
    """The result of `check_folder`: the files that would be uploaded (name -> bytes) and what is wrong."""

    folder: Path
    files: dict[str, int]
    problems: list[str] = field(default_factory=list)
    load_report: dict | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_for_problems(self) -> None:
        if self.problems:
            raise ValueError(f"{self.folder} is not ready to publish:\n- " + "\n- ".join(self.problems))


def check_folder(folder: str | os.PathLike, *, load_check: bool = True) -> FolderCheck:
    """Check what would be uploaded from `folder`: the `REQUIRED_FILES` are there, nothing is (or looks) pickled,
    `README.md` has valid model-card metadata, and (`load_check`) the published files alone load and run with
    `trust_remote_code=True` without this package (on a staged copy of exactly those files)."""
    from huggingface_hub import ModelCard

    folder = Path(folder)
    names = publishable_files(folder)
    check = FolderCheck(folder, {name: (folder / name).stat().st_size for name in names})
    missing = [name for name in REQUIRED_FILES if name not in names]
    if missing:
        check.problems.append(
            f"missing {', '.join(missing)} (expected the output folder of vivit-medmnist-train)"
        )
    pickled = find_pickled_files(folder, names)
    if pickled:
        check.problems.append(
            f"pickled (or unreadable safetensors) files would be uploaded: {', '.join(pickled)}"
        )
    if "README.md" in names:
        try:
            card = ModelCard.load(folder / "README.md")
            if not card.data.to_dict().get("license"):
                check.problems.append("README.md has no model-card metadata (license, tags, model-index)")
        except Exception as err:  # noqa: BLE001 -- any parse error is reported, not raised
            check.problems.append(f"README.md metadata does not parse: {err}")
    if load_check and not missing and not pickled:
        with tempfile.TemporaryDirectory(prefix="vivit-publish-") as tmp:
            stage_for_upload(folder, tmp)
            try:
                check.load_report = load_without_package(tmp, name=f"the publishable files of {folder}")
            except RuntimeError as err:
                check.problems.append(str(err))
    return check


def stage_for_upload(
    folder: str | os.PathLike, staging_dir: str | os.PathLike, repo_id: str | None = None
) -> list[str]:
    """Copy exactly the `publishable_files` of `folder` into `staging_dir`, filling `repo_id` into the model
    card's loading example when given. Returns the names copied."""
    folder, staging_dir = Path(folder), Path(staging_dir)
    staging_dir.mkdir(parents=True, exist_ok=True)
    names = publishable_files(folder)
    for name in names:
        if name == "README.md" and repo_id:
            text = (folder / name).read_text(encoding="utf-8").replace(REPO_ID_PLACEHOLDER, repo_id)
            (staging_dir / name).write_text(text, encoding="utf-8")
        else:
            shutil.copyfile(folder / name, staging_dir / name)
    return names
