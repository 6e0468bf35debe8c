"""An exponential moving average of the weights, as a `Trainer` callback: the model a run saves is the average.

```python
from vivit_medmnist.weight_average import WeightAverage

trainer = Trainer(..., callbacks=[WeightAverage(decay=0.999)])
```

After every optimizer step, `average = d * average + (1 - d) * weights` for every parameter and floating-point
buffer (BatchNorm statistics included), with `d = min(decay, (1 + step) / (10 + step))` so that the first steps
are not dominated by the initial weights (the warm-up of timm's `ModelEmaV3`, whose practice this follows). When
training ends the averaged weights replace the model's: what `train.py` evaluates, tests and saves. The
validation curves during training are those of the raw weights.

Resuming: the average is written into each checkpoint as `weight_average.safetensors` (after the Trainer's own
files) and read back when the run resumes from that checkpoint, so a resumed run averages exactly as an
uninterrupted one; a checkpoint without it does not count as complete (`vivit_medmnist.checkpoints`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

__all__ = ["AVERAGE_FILE", "WeightAverage"]

AVERAGE_FILE = "weight_average.safetensors"


class WeightAverage(TrainerCallback):
    """See the module docstring. `checkpoint`: the folder the run resumes from, if any."""

    def __init__(self, decay: float, checkpoint: str | None = None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the weight average's decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.checkpoint = checkpoint
        self.average: dict[str, torch.Tensor] = {}

    @staticmethod
    def _tracked(model) -> dict[str, torch.Tensor]:
        return {name: tensor for name, tensor in model.state_dict().items() if tensor.is_floating_point()}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.checkpoint and (Path(self.checkpoint) / AVERAGE_FILE).is_file():
            self.average = load_file(Path(self.checkpoint) / AVERAGE_FILE)
        else:
            self.average = {name: tensor.detach().clone() for name, tensor in self._tracked(model).items()}

    @torch.no_grad()
    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, tensor in self._tracked(model).items():
            self.average[name].lerp_(tensor.detach(), 1.0 - decay)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            save_file({k: v.contiguous() for k, v in self.average.items()}, folder / AVERAGE_FILE)

    @torch.no_grad()
    def on_train_end(self, args, state, control, model=None, **kwargs):
        weights = self._tracked(model)
        for name, tensor in weights.items():
            tensor.copy_(self.average[name])
