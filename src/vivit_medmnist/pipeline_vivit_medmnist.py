"""The "volume-classification" pipeline: `pipeline(model=folder, trust_remote_code=True)(volume)`.

transformers' "video-classification" pipeline decodes video files (PyAV) and samples frames; a 3D volume needs
neither. This pipeline takes volumes as they are stored and answers like image classification:
`[{"label": ..., "score": ...}, ...]`, most probable first.

This file is copied next to the weights (the folder's `config.json` names it in `custom_pipelines`), so it
imports only numpy, torch and transformers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import Pipeline

TASK = "volume-classification"


class VivitMedmnistVolumeClassificationPipeline(Pipeline):
    """Classify 3D volumes with a `VivitMedmnistForVideoClassification` model.

    Inputs: a volume `(D, H, W)` as a numpy array or torch tensor (uint8 0..255, or floats in [0, 1]), the path of
    a `.npy` file holding one (read without unpickling), a batch `(N, D, H, W)`, or a list of any of these.
    Options: `top_k` (default 5, at most the number of classes) and `function_to_apply` ("softmax", the default,
    "sigmoid" or "none").

    Scores are calibrated probabilities where the model's config holds a `calibration_temperature` (fitted on the
    validation split by `vivit-medmnist-train`): `softmax(logits / T)`; `calibrated=False` gives the raw softmax.
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False

    def _sanitize_parameters(self, top_k=None, function_to_apply=None, calibrated=None):
        postprocess = {}
        if top_k is not None:
            postprocess["top_k"] = top_k
        if function_to_apply is not None:
            postprocess["function_to_apply"] = function_to_apply
        if calibrated is not None:
            postprocess["calibrated"] = calibrated
        return {}, {}, postprocess

    def __call__(self, inputs, **kwargs: Any):
        if isinstance(inputs, (np.ndarray, torch.Tensor)) and inputs.ndim == 4:
            inputs = list(inputs)  # a batch: one answer per volume
        return super().__call__(inputs, **kwargs)

    def preprocess(self, volume):
        if isinstance(volume, str):
            if not volume.endswith(".npy"):
                raise ValueError(f"{volume}: expected a .npy file of one volume (D, H, W), or an array")
            volume = np.load(volume, allow_pickle=False)
        inputs = self.image_processor(volume, return_tensors="pt")
        return inputs.to(self.dtype) if self.dtype is not None else inputs

    def _forward(self, model_inputs):
        return self.model(**model_inputs)

    def postprocess(self, model_outputs, top_k: int = 5, function_to_apply: str = "softmax", calibrated: bool = True):
        logits = model_outputs["logits"][0].float()
        temperature = getattr(self.model.config, "calibration_temperature", None)
        if calibrated and temperature and function_to_apply == "softmax":
            logits = logits / temperature
        if function_to_apply == "softmax":
            scores = logits.softmax(-1)
        elif function_to_apply == "sigmoid":
            scores = logits.sigmoid()
        elif function_to_apply == "none":
            scores = logits
        else:
            raise ValueError(f"function_to_apply must be softmax, sigmoid or none, got {function_to_apply!r}")
        values, indices = scores.topk(min(top_k, scores.shape[-1]))
        id2label = self.model.config.id2label
        return [{"label": id2label[int(i)], "score": float(v)} for v, i in zip(values, indices)]


# What a saved folder's config.json holds so that `pipeline(model=folder, trust_remote_code=True)` finds this class.
CUSTOM_PIPELINES = {
    TASK: {
        "impl": f"{__name__.rsplit('.', 1)[-1]}.{VivitMedmnistVolumeClassificationPipeline.__name__}",
        "pt": ["AutoModelForVideoClassification"],
        "type": "image",
    }
}

__all__ = ["CUSTOM_PIPELINES", "TASK", "VivitMedmnistVolumeClassificationPipeline"]
