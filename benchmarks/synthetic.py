#!/usr/bin/env python
"""A synthetic 3D diagnostic: can a model option learn fine local structure at all?

    python benchmarks/synthetic.py [--options reference stem3 ...] [--epochs 30] [--json FILE]

The task (issue 14), generated here, independent of any data set: 28³ binary masks (0/255, like the MedMNIST
shape sets) each holding one thin tube, a random smooth curve (a quadratic Bézier) of random radius and length
at a random pose. Class 1 has a small bulge on the tube's wall somewhere along it (an aneurysm-like blob),
class 0 has none; classes are balanced, so chance is accuracy 0.5 / AUC 0.5. Tube radius and length vary more
than the bulge adds, so the voxel count alone separates the classes only weakly: the script prints that
baseline (the AUC of the foreground voxel count on validation) as the floor a model must beat by seeing shape.

Each option (a set of `VivitMedmnistConfig` fields, see OPTIONS) is trained from scratch with the same plain loop,
with the CPU speed choices train.py makes (`vivit_medmnist.cpu_speed`: bf16 autocast where the CPU has native
bf16): AdamW (lr 5e-4, weight decay 0.05), cosine schedule with 5 % warm-up, batch 32, each batch in a random one of
the cube's 48 symmetries (label-safe here, and it keeps models from memorising the volumes), no label smoothing, for `--epochs` epochs on `--train` volumes, then scored on `--val` fresh volumes. It reports the last
epoch's training loss and accuracy (does the option fit?), the validation accuracy and AUC (does it
generalise?), parameters and seconds per epoch on this machine. A model that cannot see the bulge stays near
the count baseline on validation, whatever it does on its training set.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from vivit_medmnist import VivitMedmnistConfig, VivitMedmnistForVideoClassification
from vivit_medmnist.cpu_speed import autocast_for, speed_up_for_cpu, use_bf16

# name -> config fields on top of the default (the Keras reference): the options of issue 14.
OPTIONS: dict[str, dict] = {
    "reference": {},
    "factorised": {"encoder_type": "factorised_encoder"},
    "same_padding": {"padding": "same"},  # 8³ tubelets covering every voxel: 4³ = 64 tokens
    "tubelet4_factorised": {"tubelet_size": 4, "encoder_type": "factorised_encoder"},  # 7³ = 343 tokens
    "stem2": {"conv_stem_channels": [32, 64], "tubelet_size": 2, "padding": "same"},  # 7³ map -> 4³ tokens
    "stem3": {"conv_stem_channels": [32, 64, 128], "tubelet_size": 1},  # 4³ map, one token per position
    "stem3_4blocks": {"conv_stem_channels": [32, 64, 128], "tubelet_size": 1, "num_hidden_layers": 4},
    "stem3_factorised": {
        "conv_stem_channels": [32, 64, 128],
        "tubelet_size": 1,
        "encoder_type": "factorised_encoder",
    },
    # ViViT Models 3 and 4 (issue 21) on the stem of recipes/medmnist3d.yaml
    "stem3_model3": {
        "conv_stem_channels": [32, 64, 128],
        "tubelet_size": 1,
        "encoder_type": "factorised_self_attention",
    },
    "stem3_model4": {
        "conv_stem_channels": [32, 64, 128],
        "tubelet_size": 1,
        "encoder_type": "factorised_dot_product",
    },
}


def make_tubes(num: int, seed: int, size: int = 28, with_bulges: bool = False):
    """`num` volumes (uint8, 0/255, shape (num, size, size, size)) and balanced labels (1: the tube bulges); with
    `with_bulges`, also each volume's bulge (bool, the blob's voxels; empty for class 0): where the evidence is."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1).astype(np.float32)
    volumes = np.zeros((num, size, size, size), dtype=np.uint8)
    bulges = np.zeros((num, size, size, size), dtype=bool)
    labels = np.arange(num) % 2
    rng.shuffle(labels)
    t = np.linspace(0.0, 1.0, 200)[:, None]
    for i in range(num):
        while True:  # end points far enough apart that the tube crosses a good part of the volume
            p0, p2 = rng.uniform(3, size - 4, (2, 3))
            if np.linalg.norm(p2 - p0) > 0.5 * size:
                break
        p1 = rng.uniform(3, size - 4, 3)
        curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        # the tube: every voxel within `radius` of the curve (its voxels), by a Euclidean distance transform
        not_curve = np.ones((size,) * 3, dtype=bool)
        not_curve[tuple(np.round(curve).astype(int).T)] = False
        radius = rng.uniform(1.0, 2.2)
        mask = ndimage.distance_transform_edt(not_curve) <= radius
        if labels[i]:
            # a blob on the wall: centred about one radius off the curve, perpendicular to it
            k = rng.integers(50, 150)
            tangent = curve[k + 1] - curve[k - 1]
            side = np.cross(tangent, rng.normal(size=3))
            side /= np.linalg.norm(side) + 1e-6
            centre = curve[k] + side * radius
            blob = rng.uniform(1.6, 2.4) + 0.5 * radius
            bulges[i] = ((grid - centre) ** 2).sum(-1) <= blob**2
            mask |= bulges[i]
        volumes[i] = mask * 255
    return (volumes, labels, bulges) if with_bulges else (volumes, labels)


def symmetries(volumes: torch.Tensor) -> torch.Tensor:
    """A random one of the cube's 48 symmetries (axis permutation and flips) for a batch (batch, D, 1, H, W):
    the label does not depend on the pose, and fresh poses keep a model from memorising the training volumes."""
    x = volumes[:, :, 0].permute(0, *(1 + torch.randperm(3)).tolist())
    flips = [axis for axis in (1, 2, 3) if torch.rand(()) < 0.5]
    return (x.flip(flips) if flips else x).unsqueeze(2)


def count_baseline_auc(train: np.ndarray, train_y, val: np.ndarray, val_y) -> float:
    """Validation AUC of the foreground voxel count (oriented on the training split): what size alone gives."""
    sign = 1.0 if roc_auc_score(train_y, (train > 0).sum((1, 2, 3))) >= 0.5 else -1.0
    return float(roc_auc_score(val_y, sign * (val > 0).sum((1, 2, 3))))


def train_option(name: str, fields: dict, data, epochs: int, seed: int, return_model: bool = False):
    """Train and score one option (see the module docstring); with `return_model`, (result, trained model)."""
    (train_x, train_y), (val_x, val_y) = data
    torch.manual_seed(seed)
    config = VivitMedmnistConfig(num_labels=2, **fields)
    model = VivitMedmnistForVideoClassification(config)
    speed_up_for_cpu(model)  # what train.py does on CPU, with bf16 autocast where it is faster on this CPU
    bf16 = use_bf16("auto", "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05, fused=True)
    steps = epochs * math.ceil(len(train_x) / 32)
    warmup = max(1, int(0.05 * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(steps - warmup, 1)))
        ),
    )
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        losses, correct = [], 0
        for batch in torch.randperm(len(train_x)).split(32):
            volumes = symmetries(train_x[batch]).float().div_(255)
            with autocast_for("cpu", bf16):
                out = model(pixel_values=volumes, labels=train_y[batch])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(out.loss.item() * len(batch))
            correct += (out.logits.argmax(-1) == train_y[batch]).sum().item()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad(), autocast_for("cpu", bf16):
        logits = torch.cat([model(pixel_values=chunk.float().div_(255)).logits for chunk in val_x.split(64)])
    probs = logits.float().softmax(-1)[:, 1].numpy()
    result = {
        "option": name,
        "config": fields,
        "parameters": model.num_parameters(),
        "num_tokens": config.num_tokens,
        "s_per_epoch": seconds / epochs,
        "train_loss_last_epoch": sum(losses) / len(train_x),
        "train_acc_last_epoch": correct / len(train_x),
        "val_acc": float(((probs > 0.5) == val_y.numpy()).mean()),
        "val_auc": float(roc_auc_score(val_y.numpy(), probs)),
        "precision": "bf16" if bf16 else "fp32",
    }
    return (result, model) if return_model else result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--train", type=int, default=1500, help="training volumes")
    parser.add_argument("--val", type=int, default=500, help="validation volumes")
    parser.add_argument("--seed", type=int, default=0, help="model seed (the data are fixed)")
    parser.add_argument("--json", help="write the results as JSON")
    args = parser.parse_args(argv)

    train_x, train_y = make_tubes(args.train, seed=1)
    val_x, val_y = make_tubes(args.val, seed=2)
    baseline = count_baseline_auc(train_x, train_y, val_x, val_y)
    print(
        f"synthetic tubes: {args.train} train / {args.val} val, voxel-count baseline val AUC {baseline:.3f}"
    )
    data = (
        (torch.from_numpy(train_x).unsqueeze(2), torch.from_numpy(train_y)),
        (torch.from_numpy(val_x).unsqueeze(2), torch.from_numpy(val_y)),
    )
    report = {
        "task": "tube with or without a wall bulge, 28^3 binary masks, balanced",
        "train": args.train,
        "val": args.val,
        "epochs": args.epochs,
        "seed": args.seed,
        "count_baseline_val_auc": baseline,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "results": [],
    }
    for name in args.options:
        result = train_option(name, OPTIONS[name], data, args.epochs, args.seed)
        report["results"].append(result)
        print(
            f"{name:20s} params {result['parameters']:>9,d} tokens {result['num_tokens']:>3d} "
            f"{result['s_per_epoch']:6.1f} s/epoch | train loss {result['train_loss_last_epoch']:.3f} "
            f"acc {result['train_acc_last_epoch']:.3f} | val acc {result['val_acc']:.3f} "
            f"AUC {result['val_auc']:.3f}",
            flush=True,
        )
        if args.json:  # after every option, so that a long run's finished options are kept
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
