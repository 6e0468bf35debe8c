"""ViViT for 3D medical volumes, as Hugging Face classes.

Importing the package registers the classes with the transformers Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForVideoClassification`, `AutoModelForPreTraining`, `AutoImageProcessor`) and for `save_pretrained`'s code export, so that a saved
folder also loads with `trust_remote_code=True` where this package is not installed.
"""

import logging
from importlib.metadata import PackageNotFoundError, version

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForPreTraining,
    AutoModelForVideoClassification,
)
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_vivit_medmnist import VivitMedmnistConfig
from .image_processing_vivit_medmnist import VivitMedmnistImageProcessor
from .modeling_vivit_medmnist import (
    VivitMedmnistForPreTraining,
    VivitMedmnistForVideoClassification,
    VivitMedmnistModel,
    VivitMedmnistPreTrainedModel,
)
from .pipeline_vivit_medmnist import TASK, VivitMedmnistVolumeClassificationPipeline

try:
    __version__ = version("vivit-medmnist")
except PackageNotFoundError:  # imported from a source tree that was not installed
    __version__ = "0+unknown"

# exist_ok: re-importing (e.g. importlib.reload in a notebook) must not fail
AutoConfig.register(VivitMedmnistConfig.model_type, VivitMedmnistConfig, exist_ok=True)
AutoModel.register(VivitMedmnistConfig, VivitMedmnistModel, exist_ok=True)
AutoModelForVideoClassification.register(
    VivitMedmnistConfig, VivitMedmnistForVideoClassification, exist_ok=True
)
AutoModelForPreTraining.register(VivitMedmnistConfig, VivitMedmnistForPreTraining, exist_ok=True)
# The processor works for both backends: registering only one makes every AutoImageProcessor load warn
AutoImageProcessor.register(
    VivitMedmnistConfig,
    image_processor_classes={"pil": VivitMedmnistImageProcessor, "torchvision": VivitMedmnistImageProcessor},
    exist_ok=True,
)

# pipeline("volume-classification", model=...) with the package; saved folders name it in custom_pipelines
PIPELINE_REGISTRY.register_pipeline(
    TASK,
    pipeline_class=VivitMedmnistVolumeClassificationPipeline,
    pt_model=AutoModelForVideoClassification,
    type="image",
)

# save_pretrained then writes `auto_map` and copies the three module files next to the weights
VivitMedmnistConfig.register_for_auto_class()
VivitMedmnistModel.register_for_auto_class("AutoModel")
VivitMedmnistForVideoClassification.register_for_auto_class("AutoModelForVideoClassification")
VivitMedmnistImageProcessor.register_for_auto_class("AutoImageProcessor")



def set_verbosity(level: int) -> None:
    """The level of every message of the package (each module logs through a child of the `vivit_medmnist`
    logger), as `transformers.logging.set_verbosity` sets transformers'. The commands set INFO."""
    logging.getLogger(__name__).setLevel(level)


__all__ = [
    "VivitMedmnistConfig",
    "VivitMedmnistForPreTraining",
    "VivitMedmnistForVideoClassification",
    "VivitMedmnistImageProcessor",
    "VivitMedmnistModel",
    "VivitMedmnistPreTrainedModel",
    "VivitMedmnistVolumeClassificationPipeline",
    "set_verbosity",
]
