#!/usr/bin/env python
"""The stem model's CPU speed: a commit's code as train.py / evaluate.py ran it, against today's speed choices.

    python benchmarks/cpu_speed.py                                   # before = 57e35e2 (issue 22's start)
    python benchmarks/cpu_speed.py --threads 1 --rounds 30 --json out.json
    python benchmarks/cpu_speed.py --ablation                        # also each choice alone, and in turn
    python benchmarks/cpu_speed.py --keep_freed_memory               # the whole process with cpu_speed's malloc setting
    python benchmarks/cpu_speed.py --rounds 10 --profile 5           # and where a training step's time goes

The model is `recipes/medmnist3d.yaml`'s: the Keras reference with the convolutional stem ([32, 64, 128],
tubelet 1: 64 tokens), drop-path 0.1 (the recipe's at issue 22's start; none since issue 23), attention
dropout 0.1, 2 labels. One random batch (32, 28, 1, 28, 28).

- `before`: the configuration and model files of `--before_commit` (read with `git show` into a temporary
  package, so later changes to the model file cannot move the yardstick), trained as `train.py` trained it on a
  CPU there: eager attention, float32, `torch.optim.AdamW` (the Trainer's `adamw_torch`); inference as
  `evaluate.py` / `predict.py` ran it: the default SDPA, float32.
- `after`: today's files and what `train.py` / the inference commands do now on this CPU:
  `cpu_speed.speed_up_for_cpu` (the `vivit_cpu` attention, channels-last stem), bf16 autocast where the CPU has
  native bf16 and it is faster (`cpu_speed.bf16_is_faster()`), and `--optim`'s AdamW (the recipe's
  `adamw_torch_fused`).
- `--ablation` adds today's model with each choice alone (`attention`, `channels_last`, `bf16`, `fused_adamw`)
  and `torch_compile`: `torch.compile` (default mode; compiled during warm-up) of today's model with eager
  attention (one graph, no breaks: `vivit_cpu`'s mask breaks the graph), channels-last and `after`'s bf16.
  `freed_memory` is `before`'s model and path with `cpu_speed.keep_freed_memory()` alone.

Each variant runs in a process of its own (`--threads` torch threads), so that process-wide settings (the
allocator's, which `after` applies as `train.py` does) stay with it and variants do not share caches or heap;
the parent asks the processes for one step at a time, so they never run at once.

`--profile N` then runs N more training steps of `before` and of `after` under `torch.profiler` (after the
timed rounds, one variant at a time) and prints each one's operators by self CPU time per step, with the share
of the step held by each family (matrix products, convolutions, GELU, softmax, normalisation, copies,
element-wise products, dropout masks): where the time goes that a speed choice could still take.

A training step is forward with labels (cross-entropy) + backward + optimizer step, `model.train()`; an inference
step is a forward in `model.eval()` under `torch.inference_mode()`. Variants run in interleaved rounds (the order
reversed every other round), `--steps` timed steps each per round after `--warmup` untimed ones; a variant's
throughput is batch / median step. Ratios to `before`: the median of per-round ratios (robust on a shared, noisy
machine) and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
STEM = {"conv_stem_channels": [32, 64, 128], "tubelet_size": 1, "drop_path_rate": 0.1, "num_labels": 2}
MODEL_FILES = ("configuration_vivit_medmnist.py", "modeling_vivit_medmnist.py")
MODES = ("train", "inference")
# operator families for --profile's summary: aten op name -> family
FAMILIES = {
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm"),
    "convolutions": ("aten::convolution_backward", "aten::mkldnn_convolution", "aten::slow_conv3d_forward"),
    "GELU": ("aten::gelu", "aten::gelu_backward"),
    "softmax": ("aten::_softmax", "aten::_softmax_backward_data"),
    "normalisation": (
        "aten::native_batch_norm",
        "aten::native_batch_norm_backward",
        "aten::native_layer_norm",
        "aten::native_layer_norm_backward",
    ),
    "copies": ("aten::copy_", "aten::cat", "aten::clone"),
    "element-wise products": ("aten::mul", "aten::mul_"),
    "dropout masks": ("aten::bernoulli_",),
}


def write_commit_package(commit: str, folder: Path) -> None:
    """Write the config and model files of `commit` into `folder` as the package `vivit_medmnist_at_<commit>`."""
    name = f"vivit_medmnist_at_{commit}"
    package = folder / name
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    for filename in MODEL_FILES:
        text = subprocess.run(
            ["git", "show", f"{commit}:src/vivit_medmnist/{filename}"],
            cwd=REPO, capture_output=True, text=True, check=True,
        ).stdout
        (package / filename).write_text(text)


class Variant:
    """One way of running the stem model: its model, optimizer, batch and autocast."""

    def __init__(self, spec, modeling, *, attention, speed_up, bf16, fused, compile_model, batch_size):
        torch.manual_seed(0)
        config = modeling.VivitMedmnistConfig(**STEM)
        self.model = modeling.VivitMedmnistForVideoClassification(config)
        self.attention = attention  # mode -> implementation
        if speed_up:
            from vivit_medmnist.cpu_speed import speed_up_for_cpu

            speed_up_for_cpu(self.model, **speed_up)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=5e-4, weight_decay=0.05, fused=fused)
        self.forward = torch.compile(self.model) if compile_model else self.model
        self.bf16 = bf16
        generator = torch.Generator().manual_seed(0)
        self.pixel_values = torch.rand(batch_size, 28, 1, 28, 28, generator=generator)
        self.labels = torch.randint(0, 2, (batch_size,), generator=generator)

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def step(self, mode: str) -> float:
        if mode == "train":
            self.model.train()
            self._set_attention("train")
            start = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            with self.autocast():
                loss = self.forward(pixel_values=self.pixel_values, labels=self.labels).loss
            loss.backward()
            self.optimizer.step()
            return time.perf_counter() - start
        self.model.eval()
        self._set_attention("inference")
        start = time.perf_counter()
        with torch.inference_mode(), self.autocast():
            self.forward(pixel_values=self.pixel_values)
        return time.perf_counter() - start

    def profile(self, steps: int) -> dict:
        """`steps` training steps under torch.profiler: their wall time and each operator's self CPU time (ms
        per step) and calls. Work outside torch's operators (Python, numpy's dropout bits) is in the wall time
        only."""
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            wall = sum(self.step("train") for _ in range(steps))
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        ops = [
            {
                "op": e.key,
                "self_ms_per_step": e.self_cpu_time_total / 1000 / steps,
                "calls_per_step": e.count / steps,
            }
            for e in events
            if e.self_cpu_time_total > 0
        ]
        return {"wall_ms_per_step": 1000 * wall / steps, "ops": ops}

    def _set_attention(self, mode: str) -> None:
        if self.model.config._attn_implementation != self.attention[mode]:
            self.model.set_attn_implementation(self.attention[mode])


def variant_specs(args) -> dict[str, dict]:
    """name -> how that variant builds and runs its model (see the module docstring)."""
    from vivit_medmnist.cpu_speed import CPU_ATTENTION, bf16_is_faster

    bf16 = bf16_is_faster() if args.bf16 == "auto" else args.bf16 == "true"
    plain = {"train": "eager", "inference": "sdpa"}
    fast = {"train": CPU_ATTENTION, "inference": CPU_ATTENTION}
    now = {"modeling": "now", "attention": plain, "speed_up": None, "bf16": False, "fused": False,
           "compile": False, "keep_freed_memory": False}
    specs = {
        "before": {**now, "modeling": "before"},
        "after": {**now, "attention": fast, "speed_up": {"attention": True, "channels_last": True}, "bf16": bf16,
                  "fused": args.optim == "adamw_torch_fused", "keep_freed_memory": True},
    }
    if args.ablation:
        specs.update(
            {
                "attention": {**now, "attention": fast},
                "channels_last": {**now, "speed_up": {"attention": False, "channels_last": True}},
                "bf16": {**now, "bf16": True},
                "fused_adamw": {**now, "fused": True},
                "freed_memory": {**now, "keep_freed_memory": True},
                # eager attention: the model compiles to one graph (torch._dynamo.explain); vivit_cpu's mask breaks it
                "torch_compile": {**now, "speed_up": {"attention": False, "channels_last": True}, "bf16": bf16,
                                  "compile": True, "keep_freed_memory": True},
            }
        )
    return specs


def child(connection, spec: dict, args, before_folder: str) -> None:
    """One variant in its own process (its own threads, allocator setting and memory): build it, then time the
    steps the parent asks for, one at a time."""
    torch.set_num_threads(args.threads)
    from vivit_medmnist import cpu_speed, modeling_vivit_medmnist

    if spec["keep_freed_memory"]:
        cpu_speed.keep_freed_memory()
    if spec["modeling"] == "before":
        sys.path.insert(0, before_folder)
        modeling = importlib.import_module(f"vivit_medmnist_at_{args.before_commit}.modeling_vivit_medmnist")
    else:
        modeling = modeling_vivit_medmnist
    variant = Variant(
        spec, modeling, attention=spec["attention"], speed_up=spec["speed_up"], bf16=spec["bf16"],
        fused=spec["fused"], compile_model=spec["compile"], batch_size=args.batch_size,
    )
    while (request := connection.recv()) is not None:
        if isinstance(request, tuple):  # ("profile", steps)
            connection.send(variant.profile(request[1]))
        else:
            connection.send(variant.step(request))


def measure(specs: dict[str, dict], args, before_folder: str) -> dict:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    names, workers = list(specs), {}
    for name in names:
        parent, child_end = context.Pipe()
        process = context.Process(target=child, args=(child_end, specs[name], args, before_folder), daemon=True)
        process.start()
        workers[name] = (process, parent)
    try:
        def step(name: str, mode: str) -> float:
            workers[name][1].send(mode)
            return workers[name][1].recv()

        for name in names:
            start = time.perf_counter()
            for mode in MODES:
                for _ in range(args.warmup):
                    step(name, mode)
            print(f"warm-up {name}: {time.perf_counter() - start:.1f} s", flush=True)
        times = {name: {mode: [] for mode in MODES} for name in names}
        for index in range(args.rounds):
            order = names if index % 2 == 0 else names[::-1]
            for mode in MODES:
                for name in order:
                    times[name][mode].append(statistics.median(step(name, mode) for _ in range(args.steps)))
            line = "  ".join(
                f"{n} {1000 * times[n]['train'][-1]:.0f}/{1000 * times[n]['inference'][-1]:.0f}" for n in names
            )
            print(f"round {index + 1}/{args.rounds} (train/inference ms): {line}", flush=True)
        profiles = {}
        for name in ("before", "after") if args.profile else ():
            workers[name][1].send(("profile", args.profile))
            profiles[name] = workers[name][1].recv()
    finally:
        for process, connection in workers.values():
            if process.is_alive():
                connection.send(None)
            process.join(timeout=30)
    results = {}
    for name in names:
        results[name] = {}
        for mode in MODES:
            rounds, base = times[name][mode], times["before"][mode]
            results[name][mode] = {
                "median_step_ms": 1000 * statistics.median(rounds),
                "volumes_per_s": args.batch_size / statistics.median(rounds),
                "speedup_median_of_rounds": statistics.median(b / t for b, t in zip(base, rounds)),
                "speedup_of_medians": statistics.median(base) / statistics.median(rounds),
                "round_step_ms": [1000 * t for t in rounds],
            }
        if name in profiles:
            results[name]["train"]["profile"] = summarise_profile(profiles[name])
    return results


def summarise_profile(profiled: dict) -> dict:
    """The profiled step's wall time, its operators' total self time, each family's part, the operators."""
    ops = profiled["ops"]
    total = sum(op["self_ms_per_step"] for op in ops)
    families = {
        family: sum(op["self_ms_per_step"] for op in ops if op["op"] in names)
        for family, names in FAMILIES.items()
    }
    families["other"] = total - sum(families.values())
    return {
        "wall_ms_per_step": profiled["wall_ms_per_step"], "self_ms_per_step": total,
        "families_ms_per_step": families, "ops": ops,
    }


def print_profile(name: str, summary: dict, top: int = 12) -> None:
    total = summary["self_ms_per_step"]
    print(f"\n{name}: training step under the profiler, {summary['wall_ms_per_step']:.1f} ms wall, "
          f"{total:.1f} ms of it in torch's operators (self time)")
    families = summary["families_ms_per_step"].items()
    print("  " + ", ".join(f"{family} {ms:.1f} ms ({100 * ms / total:.0f} %)" for family, ms in families))
    for op in summary["ops"][:top]:
        ms = op["self_ms_per_step"]
        print(f"  {op['op']:<40}{ms:>8.1f} ms{100 * ms / total:>6.1f} %{op['calls_per_step']:>7.0f} calls")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before_commit", default="57e35e2", help="the commit whose model files are 'before'")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per variant, mode and round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--bf16", choices=["auto", "true", "false"], default="auto",
                        help="for 'after' (default: where faster, as the commands decide)")
    parser.add_argument("--optim", default="adamw_torch_fused", help="'after''s optimizer, as the recipe's (adamw_torch_fused) or adamw_torch")
    parser.add_argument("--ablation", action="store_true", help="also each choice alone, and torch.compile")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="then profile N training steps of before and after (0: none)")
    parser.add_argument("--tiny", action="store_true", help="smoke test: batch 2, 1 round, no warm-up")
    parser.add_argument("--json", help="write the settings, the machine and every number here")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch_size, args.rounds, args.steps, args.warmup = 2, 1, 1, 0
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from vivit_medmnist import cpu_speed

    specs = variant_specs(args)
    with tempfile.TemporaryDirectory(prefix="cpu-speed-") as tmp:
        write_commit_package(args.before_commit, Path(tmp))
        results = measure(specs, args, tmp)
    import transformers

    report = {
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "machine": {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "processor": _cpu_name(),
            "native_bf16": cpu_speed.native_bf16(),
            "bf16_matmul_speedup": cpu_speed.bf16_matmul_speedup(),
            "variants": specs,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        },
        "results": results,
    }
    print(f"\n{report['machine']['processor']}, {args.threads} thread(s), batch {args.batch_size}, "
          f"{args.rounds} rounds, native bf16: {report['machine']['native_bf16']}, bf16 product "
          f"{report['machine']['bf16_matmul_speedup']:.2f}x float32's, after in bf16: {specs['after']['bf16']}")
    print(f"{'variant':<16}{'train ms':>10}{'x before':>10}{'(medians)':>11}{'infer ms':>10}{'x before':>10}{'(medians)':>11}")
    for name, modes in results.items():
        train, infer = modes["train"], modes["inference"]
        print(
            f"{name:<16}{train['median_step_ms']:>10.1f}{train['speedup_median_of_rounds']:>10.2f}"
            f"{train['speedup_of_medians']:>11.2f}{infer['median_step_ms']:>10.1f}"
            f"{infer['speedup_median_of_rounds']:>10.2f}{infer['speedup_of_medians']:>11.2f}"
        )
    for name, modes in results.items():
        if "profile" in modes["train"]:
            print_profile(name, modes["train"]["profile"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
