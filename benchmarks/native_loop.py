#!/usr/bin/env python
"""The yardstick of issue 13: a plain PyTorch loop over transformers' native ViViT, the Keras reference's schedule.

    python benchmarks/native_loop.py [--data_dir ../shared/data] [--epochs 60] [--json FILE]

`transformers.VivitForVideoClassification` of the size of this package's default model (`speed.py`'s `native`
variant), AdamW(lr 1e-4, eps 1e-7, no weight decay) as in `recipes/keras_reference.yaml`, batch 32, shuffled
AdrenalMNIST3D training volumes, a validation pass after every epoch: with the volumes in memory as one tensor
and no Trainer, it is about the least that such a run can cost around its model steps. It prints the seconds of
the training loop (validation included, like the Trainer's `train_runtime`) to compare with
`benchmarks/overhead.py`'s run of `scripts/train.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import native_config_kwargs  # the benchmark's own sibling

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--json", help="write the figures as JSON")
    args = parser.parse_args(argv)
    from transformers import VivitConfig, VivitForVideoClassification

    with np.load(Path(args.data_dir) / "adrenalmnist3d.npz") as npz:
        train_x = torch.from_numpy(npz["train_images"][: args.max_train_samples]).unsqueeze(2)
        train_y = torch.from_numpy(npz["train_labels"][: args.max_train_samples, 0].astype(np.int64))
        val_x, val_y = (
            torch.from_numpy(npz["val_images"]).unsqueeze(2),
            torch.from_numpy(npz["val_labels"][:, 0]),
        )
    torch.manual_seed(42)
    model = VivitForVideoClassification(VivitConfig(**{**native_config_kwargs(), "num_labels": 2}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-7, weight_decay=0.0)

    start = time.perf_counter()
    steps, accuracy = 0, float("nan")
    for _ in range(args.epochs):
        model.train()
        for batch in torch.randperm(len(train_x)).split(32):
            loss = model(pixel_values=train_x[batch].float().div_(255), labels=train_y[batch]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
        model.eval()
        with torch.no_grad():
            logits = torch.cat([model(pixel_values=x.float().div_(255)).logits for x in val_x.split(64)])
        accuracy = float((logits.argmax(-1) == val_y.long()).float().mean())
    seconds = time.perf_counter() - start
    report = {
        "command": "python benchmarks/native_loop.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "seconds": seconds,
        "steps": steps,
        "epochs": args.epochs,
        "last_validation_accuracy": accuracy,
        "torch_threads": torch.get_num_threads(),
    }
    print(f"native loop: {seconds:.1f} s for {steps} steps ({args.epochs} epochs with validation)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
