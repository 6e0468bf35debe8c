"""save_pretrained -> Auto*.from_pretrained: in this process, as remote code where `vivit_medmnist` cannot be
imported, and by repo id from a Hugging Face cache laid out like a downloaded model repository."""

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForVideoClassification

import vivit_medmnist
from vivit_medmnist import (
    VivitMedmnistConfig,
    VivitMedmnistForVideoClassification,
    VivitMedmnistImageProcessor,
    VivitMedmnistModel,
)

CODE_FILES = [
    "configuration_vivit_medmnist.py",
    "modeling_vivit_medmnist.py",
    "image_processing_vivit_medmnist.py",
]
COMMIT = "0123456789abcdef0123456789abcdef01234567"

# Runs in a fresh Python where importing vivit_medmnist fails: what a Hub user without the package gets.
REMOTE_SCRIPT = r"""
import importlib.abc, json, sys

class BlockPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "vivit_medmnist":
            raise ImportError(f"{name} is blocked in this test")

sys.meta_path.insert(0, BlockPackage())
try:
    import vivit_medmnist  # noqa: F401
    raise SystemExit("vivit_medmnist is importable: the test would prove nothing")
except ImportError:
    pass

import numpy as np
import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForVideoClassification

volumes = np.load(sys.argv[1])
results = {}
for source in sys.argv[2:]:
    processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=True)
    config = AutoConfig.from_pretrained(source, trust_remote_code=True)
    classifier = AutoModelForVideoClassification.from_pretrained(source, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
    pixel_values = processor(volumes, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        results[source] = {
            "logits": classifier(pixel_values).logits.tolist(),
            "pooled": base(pixel_values).pooler_output.tolist(),
            "modules": [type(obj).__module__ for obj in (processor, config, classifier, base)],
            "classes": [type(obj).__name__ for obj in (processor, config, classifier, base)],
        }
print("RESULTS=" + json.dumps(results))
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small trained-looking model saved with its processor, plus inputs and the logits they must give."""
    root = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    config = VivitMedmnistConfig(
        volume_size=12,
        tubelet_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
        id2label={0: "a", 1: "b", 2: "c"},
        label2id={"a": 0, "b": 1, "c": 2},
    )
    model = VivitMedmnistForVideoClassification(config).eval()
    with torch.no_grad():  # move away from the initialisation, so that a re-initialised load would show
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    processor = VivitMedmnistImageProcessor()
    folder = root / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    volumes = np.random.RandomState(0).randint(0, 256, size=(2, 12, 12, 12), dtype=np.uint8)
    pixel_values = processor(volumes, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(pixel_values).logits
        pooled = model.vivit(pixel_values).pooler_output
    np.save(root / "volumes.npy", volumes)
    return {
        "root": root,
        "folder": folder,
        "model": model,
        "pixel_values": pixel_values,
        "logits": logits,
        "pooled": pooled,
    }


def test_saved_files_and_auto_map(saved):
    files = sorted(os.listdir(saved["folder"]))
    assert files == sorted(["config.json", "model.safetensors", "preprocessor_config.json", *CODE_FILES])
    config = json.loads((saved["folder"] / "config.json").read_text())
    assert config["model_type"] == "vivit_medmnist"
    assert config["architectures"] == ["VivitMedmnistForVideoClassification"]
    assert config["auto_map"] == {
        "AutoConfig": "configuration_vivit_medmnist.VivitMedmnistConfig",
        "AutoModel": "modeling_vivit_medmnist.VivitMedmnistModel",
        "AutoModelForVideoClassification": "modeling_vivit_medmnist.VivitMedmnistForVideoClassification",
    }
    preprocessor = json.loads((saved["folder"] / "preprocessor_config.json").read_text())
    assert preprocessor["auto_map"] == {
        "AutoImageProcessor": "image_processing_vivit_medmnist.VivitMedmnistImageProcessor"
    }
    assert preprocessor["image_processor_type"] == "VivitMedmnistImageProcessor"


def test_base_model_folder_also_names_both_model_classes(tmp_path):
    VivitMedmnistModel(
        VivitMedmnistConfig(volume_size=8, tubelet_size=4, num_hidden_layers=1)
    ).save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(["config.json", "model.safetensors", *CODE_FILES[:2]])
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert {"AutoConfig", "AutoModel", "AutoModelForVideoClassification"} == set(auto_map)


def test_copied_code_imports_only_siblings_torch_transformers_numpy():
    # the standard library's modules used, and what transformers itself requires (huggingface_hub, safetensors)
    allowed = {
        "torch",
        "transformers",
        "numpy",
        "huggingface_hub",
        "safetensors",
        "math",
        "os",
        "typing",
        "collections",
    }
    shipped = [*CODE_FILES, "pipeline_vivit_medmnist.py"]  # the pipeline ships with the publishable folder
    siblings = {name[:-3] for name in shipped}
    package = Path(vivit_medmnist.__file__).parent
    for name in shipped:
        for node in ast.walk(ast.parse((package / name).read_text())):
            if isinstance(node, ast.Import):
                assert {alias.name.split(".")[0] for alias in node.names} <= allowed, (name, ast.dump(node))
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: only a sibling module, with the form the code copier follows
                    assert node.level == 1 and node.module in siblings, (name, node.module)
                else:
                    assert node.module.split(".")[0] in allowed | {"__future__"}, (name, node.module)


def test_auto_classes_reproduce_the_logits(saved):
    folder = saved["folder"]
    config = AutoConfig.from_pretrained(folder)
    assert isinstance(config, VivitMedmnistConfig) and config.id2label == {0: "a", 1: "b", 2: "c"}
    processor = AutoImageProcessor.from_pretrained(folder)
    assert type(processor) is VivitMedmnistImageProcessor
    pixel_values = processor(np.load(saved["root"] / "volumes.npy"), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixel_values, saved["pixel_values"])

    classifier = AutoModelForVideoClassification.from_pretrained(folder).eval()
    assert type(classifier) is VivitMedmnistForVideoClassification
    base = AutoModel.from_pretrained(folder).eval()
    assert type(base) is VivitMedmnistModel
    direct = VivitMedmnistForVideoClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(classifier(pixel_values).logits, saved["logits"], rtol=0, atol=1e-6)
        torch.testing.assert_close(direct(pixel_values).logits, saved["logits"], rtol=0, atol=1e-6)
        torch.testing.assert_close(base(pixel_values).pooler_output, saved["pooled"], rtol=0, atol=1e-6)


def test_saving_writes_no_pickled_weights(saved, tmp_path):
    saved["model"].save_pretrained(tmp_path)
    weights = [
        p.name
        for p in tmp_path.iterdir()
        if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt", ".safetensors"}
    ]
    assert weights == ["model.safetensors"]


def _run_blocked(saved, sources, env_extra, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(env_extra)
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(saved["root"] / "volumes.npy"), *sources],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = [line for line in result.stdout.splitlines() if line.startswith("RESULTS=")][-1]
    return json.loads(line[len("RESULTS=") :])


@pytest.fixture(scope="module")
def remote_results(saved, tmp_path_factory):
    """One subprocess (imports are slow) loads the folder by path and, from a Hub-style cache, by repo id."""
    work = tmp_path_factory.mktemp("remote")
    cache = work / "hub"
    repo = cache / "models--vivit-test--organmnist3d-tiny"
    shutil.copytree(saved["folder"], repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "HF_HOME": str(work / "hf_home"),
        "HF_MODULES_CACHE": str(work / "modules"),
    }
    return _run_blocked(saved, [str(saved["folder"]), "vivit-test/organmnist3d-tiny"], env, cwd=work)


@pytest.mark.parametrize("source", ["folder", "repo_id"])
def test_remote_code_without_the_package_reproduces_the_logits(saved, remote_results, source):
    key = str(saved["folder"]) if source == "folder" else "vivit-test/organmnist3d-tiny"
    result = remote_results[key]
    assert result["classes"] == [
        "VivitMedmnistImageProcessor",
        "VivitMedmnistConfig",
        "VivitMedmnistForVideoClassification",
        "VivitMedmnistModel",
    ]
    # the classes came from the code copied next to the weights, not from an installed package
    assert all(module.startswith("transformers_modules.") for module in result["modules"]), result["modules"]
    torch.testing.assert_close(torch.tensor(result["logits"]), saved["logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(result["pooled"]), saved["pooled"], rtol=0, atol=1e-5)
