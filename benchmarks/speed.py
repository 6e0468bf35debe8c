#!/usr/bin/env python
"""Speed of `VivitMedmnistForVideoClassification` vs transformers' native `VivitForVideoClassification`.

    python benchmarks/speed.py                      # batch 32, 7 interleaved rounds
    python benchmarks/speed.py --compile            # adds torch.compile'd variants of ours
    python benchmarks/speed.py --json bench.json    # also writes every number
    python benchmarks/speed.py --eager              # adds ours with eager attention (what train.py uses on CPU)
    python benchmarks/speed.py --device cuda --batch_size 1024 --bf16   # on a GPU, under bf16 autocast
    python benchmarks/speed.py --volume_size 64     # 64^3 volumes (8^3 tubelets: 512 tokens)
    python benchmarks/speed.py --models model3 model4  # adds ViViT Models 3 and 4 (and model2)
    python benchmarks/speed.py --stem --eager --models model2 model3 model4  # the four models with the recipe's stem

What is measured, in ONE process, on the same random input (batch, 28, 1, 28, 28) float32 and labels:

- training throughput: volumes/s of one step = forward with labels (cross-entropy) + backward + AdamW step
  (lr 1e-4), model.train() (so attention dropout is active);
- inference throughput: volumes/s of one forward, model.eval() under torch.inference_mode().

The variants run in interleaved rounds (round r: A, B; round r+1: B, A; ...), each round `--steps` timed steps
per variant and mode after `--warmup` untimed steps per variant at the start; every step is timed on its own
(time.perf_counter) and the throughput of a variant is batch_size / median step time over all its steps. The
ratios ours/native are reported both as the ratio of those medians and as the median of the per-round ratios
(the more robust one on a shared, noisy machine: both variants of a round see similar load).

Variants:
- ours: `VivitMedmnistForVideoClassification(VivitMedmnistConfig(num_labels=11))` as constructed (the Keras
  reference: 27 tokens of 8^3 tubelets, width 128, 8 blocks of 8 heads, MLP 512 with tanh-GELU after both dense
  layers, attention dropout 0.1, mean pooling), its default attention implementation ("sdpa"), eager mode (no
  torch.compile).
- ours_eager (with `--eager`): ours with `attn_implementation="eager"`, what scripts/train.py trains with on
  CPU (`vivit_medmnist.trainer_setup.attention_for`).
- native: transformers' `VivitForVideoClassification(VivitConfig(image_size=28, num_frames=28,
  tubelet_size=[8, 8, 8], num_channels=1, hidden_size=128, num_hidden_layers=8, num_attention_heads=8,
  intermediate_size=512, hidden_act="gelu_pytorch_tanh", attention_probs_dropout_prob=0.1,
  hidden_dropout_prob=0.0, layer_norm_eps=1e-6, num_labels=11))`, default attention implementation: the same
  size, activation and dropout. Its architecture differs where transformers' ViViT differs from the reference:
  a CLS token (28 tokens, classifier on the CLS state) and one GELU per MLP (none after the second dense
  layer), so it does slightly less activation work and slightly more attention work than ours.
- native_defaults (with `--native_defaults`): the same but with VivitConfig's own defaults for the activation
  and dropout (hidden_act="gelu_fast", attention_probs_dropout_prob=0.0).
- ours_compiled (with `--compile`): ours wrapped in `torch.compile` (default mode); its warm-up includes the
  compilation.

Peak memory (Linux only): each variant and mode runs again in a fresh child process (same batch and threads,
`--memory_steps` steps); after the model, optimizer and batch are built it resets the process's peak resident
set size (VmHWM, via /proc/self/clear_refs), reads the current RSS, runs the steps and reads the peak RSS; the
difference is the peak memory the steps added over the built model (activations, gradients, AdamW state,
allocator slack). The absolute RSS includes torch and transformers themselves (~0.5 GiB). `--memory_steps 0`
skips this.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch

NUM_LABELS = 11
VOLUME = 28


def native_config_kwargs(defaults: bool = False, volume: int = VOLUME) -> dict:
    """The VivitConfig of the native variant (see the module docstring)."""
    kwargs = {
        "image_size": volume,
        "num_frames": volume,
        "tubelet_size": [8, 8, 8],
        "num_channels": 1,
        "hidden_size": 128,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "intermediate_size": 512,
        "hidden_dropout_prob": 0.0,
        "layer_norm_eps": 1e-6,
        "num_labels": NUM_LABELS,
    }
    if not defaults:
        kwargs.update(hidden_act="gelu_pytorch_tanh", attention_probs_dropout_prob=0.1)
    return kwargs


# --models: ours with another ViViT model of the paper (same size, tubelets and settings), eager attention as train.py
MODELS = {
    "model2": "factorised_encoder",
    "model3": "factorised_self_attention",
    "model4": "factorised_dot_product",
}


# --stem: every "ours" variant with recipes/medmnist3d.yaml's convolutional stem (64 tokens) and drop-path
STEM = {"conv_stem_channels": [32, 64, 128], "tubelet_size": 1, "drop_path_rate": 0.1}
OURS_OVERRIDES: dict = {}


def build_model(variant: str, volume: int = VOLUME) -> torch.nn.Module:
    torch.manual_seed(0)
    if variant.startswith("ours"):
        from vivit_medmnist import VivitMedmnistConfig, VivitMedmnistForVideoClassification

        encoder_type = MODELS.get(variant.removeprefix("ours_"), "joint")
        config = VivitMedmnistConfig(
            num_labels=NUM_LABELS, volume_size=volume, encoder_type=encoder_type, **OURS_OVERRIDES
        )
        model = VivitMedmnistForVideoClassification(config)
        if variant == "ours_eager" or encoder_type != "joint":
            model.set_attn_implementation("eager")
        if variant == "ours_compiled":
            model = torch.compile(model)
        return model
    from transformers import VivitConfig, VivitForVideoClassification

    return VivitForVideoClassification(
        VivitConfig(**native_config_kwargs(defaults=variant == "native_defaults", volume=volume))
    )


def make_batch(
    batch_size: int, volume: int = VOLUME, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    # (batch, D = frames, C, H, W): the layout both models take
    pixel_values = torch.rand(batch_size, volume, 1, volume, volume, generator=generator)
    labels = torch.randint(0, NUM_LABELS, (batch_size,), generator=generator)
    return pixel_values.to(device), labels.to(device)


class Runner:
    """One variant: its model, optimizer and batch, and one timed step of either mode (on a GPU, timed up to the
    end of its kernels; with `bf16`, under bf16 autocast)."""

    def __init__(
        self, variant: str, batch_size: int, volume: int = VOLUME, device: str = "cpu", bf16: bool = False
    ):
        self.variant = variant
        self.device = torch.device(device)
        self.model = build_model(variant, volume).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.pixel_values, self.labels = make_batch(batch_size, volume, device)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_step(self) -> float:
        self.model.train()
        self._sync()
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            loss = self.model(pixel_values=self.pixel_values, labels=self.labels).loss
        loss.backward()
        self.optimizer.step()
        self._sync()
        return time.perf_counter() - start

    def inference_step(self) -> float:
        self.model.eval()
        self._sync()
        start = time.perf_counter()
        with torch.inference_mode(), self.autocast:
            logits = self.model(pixel_values=self.pixel_values).logits
        self._sync()
        elapsed = time.perf_counter() - start
        if logits.shape != (len(self.labels), NUM_LABELS):
            raise RuntimeError(f"{self.variant}: unexpected logits shape {tuple(logits.shape)}")
        return elapsed

    def step(self, mode: str) -> float:
        return self.train_step() if mode == "train" else self.inference_step()


MODES = ("train", "inference")


def measure_speed(variants: list[str], args: argparse.Namespace) -> dict:
    runners = {}
    for variant in variants:
        print(f"building {variant} and warming up ({args.warmup} steps per mode) ...", flush=True)
        runners[variant] = Runner(variant, args.batch_size, args.volume_size, args.device, args.bf16)
        for mode in MODES:
            for _ in range(args.warmup):
                runners[variant].step(mode)
    times = {v: {m: [] for m in MODES} for v in variants}
    round_medians = {v: {m: [] for m in MODES} for v in variants}
    for round_index in range(args.rounds):
        # alternate the order so that neither variant always runs first (thermal/cache/load drift)
        order = variants if round_index % 2 == 0 else variants[::-1]
        for mode in MODES:
            for variant in order:
                steps = [runners[variant].step(mode) for _ in range(args.steps)]
                times[variant][mode].extend(steps)
                round_medians[variant][mode].append(statistics.median(steps))
        summary = "  ".join(
            f"{v} {m} {args.batch_size / round_medians[v][m][-1]:.1f}" for v in variants for m in MODES
        )
        print(f"round {round_index + 1}/{args.rounds} (volumes/s): {summary}", flush=True)

    results = {}
    for variant in variants:
        results[variant] = {}
        for mode in MODES:
            steps = times[variant][mode]
            median = statistics.median(steps)
            results[variant][mode] = {
                "volumes_per_s": args.batch_size / median,
                "median_step_s": median,
                "min_step_s": min(steps),
                "max_step_s": max(steps),
                "steps": len(steps),
                "round_median_step_s": round_medians[variant][mode],
            }
    return results


def ratio(results: dict, numerator: str, denominator: str, mode: str) -> dict:
    a, b = results[numerator][mode], results[denominator][mode]
    per_round = [d / n for n, d in zip(a["round_median_step_s"], b["round_median_step_s"])]
    return {
        "of_medians": a["volumes_per_s"] / b["volumes_per_s"],
        "median_of_rounds": statistics.median(per_round),
    }


def _rss_mib() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MiB, from /proc/self/status (Linux)."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
    return tuple(int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM"))


def measure_gpu_memory(variants: list[str], args: argparse.Namespace) -> dict:
    """Peak GPU memory (torch.cuda.max_memory_allocated) of `--memory_steps` steps per variant and mode, over what
    the built model, optimizer and batch hold."""
    memory = {}
    for variant in variants:
        memory[variant] = {}
        for mode in MODES:
            runner = Runner(variant, args.batch_size, args.volume_size, args.device, args.bf16)
            runner.step(mode)  # optimizer state and workspaces exist from the first step on
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
            for _ in range(args.memory_steps):
                runner.step(mode)
            peak = torch.cuda.max_memory_allocated() / 2**20
            memory[variant][mode] = {
                "rss_before_mib": before,
                "peak_rss_mib": peak,
                "added_mib": peak - before,
            }
            del runner
            torch.cuda.empty_cache()
    return memory


def memory_child(
    variant: str, mode: str, batch_size: int, steps: int, threads: int, volume: int = VOLUME
) -> None:
    """Run in a fresh process: the resident memory after building, and the peak while stepping, as JSON.

    The peak of the import and build phase is cleared first (writing 5 to /proc/self/clear_refs resets VmHWM),
    so that `peak_rss_mib` is the peak of the steps alone and `added_mib` what they added over the built state.
    """
    torch.set_num_threads(threads)
    runner = Runner(variant, batch_size, volume)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before, _ = _rss_mib()
    for _ in range(steps):
        runner.step(mode)
    _, peak = _rss_mib()
    print(json.dumps({"rss_before_mib": before, "peak_rss_mib": peak, "added_mib": peak - before}))


def measure_memory(variants: list[str], args: argparse.Namespace) -> dict:
    memory = {}
    for variant in variants:
        memory[variant] = {}
        for mode in MODES:
            command = [
                sys.executable,
                os.path.abspath(__file__),
                "--_memory_child",
                variant,
                mode,
                "--batch_size",
                str(args.batch_size),
                "--memory_steps",
                str(args.memory_steps),
                "--threads",
                str(args.threads),
                "--volume_size",
                str(args.volume_size),
                *(["--stem"] if args.stem else []),
            ]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"memory child for {variant}/{mode} failed:\n{done.stderr[-3000:]}")
            memory[variant][mode] = json.loads(done.stdout.strip().splitlines()[-1])
    return memory


def environment(args: argparse.Namespace) -> dict:
    import transformers

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "torch_threads": args.threads,
        "device": torch.cuda.get_device_name(args.device)
        if torch.device(args.device).type == "cuda"
        else "cpu",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }


def print_table(report: dict) -> None:
    results, memory, settings = report["results"], report.get("memory") or {}, report["settings"]
    print()
    print(
        f"batch {settings['batch_size']}, {settings['rounds']} rounds x {settings['steps']} steps, "
        f"{settings['threads']} threads; volumes/s = batch / median step time"
    )
    header = f"{'variant':<16}{'train vol/s':>12}{'infer vol/s':>12}{'train ms':>10}{'infer ms':>10}"
    if memory:
        header += f"{'train +MiB':>12}{'infer +MiB':>12}{'train peak MiB':>16}"
    print(header)
    for variant, modes in results.items():
        line = (
            f"{variant:<16}{modes['train']['volumes_per_s']:>12.1f}{modes['inference']['volumes_per_s']:>12.1f}"
            f"{1000 * modes['train']['median_step_s']:>10.1f}{1000 * modes['inference']['median_step_s']:>10.1f}"
        )
        if variant in memory:
            mem = memory[variant]
            line += (
                f"{mem['train']['added_mib']:>12.0f}{mem['inference']['added_mib']:>12.0f}"
                f"{mem['train']['peak_rss_mib']:>16.0f}"
            )
        print(line)
    print()
    for name, by_mode in report["ratios"].items():
        for mode, value in by_mode.items():
            print(
                f"ratio {name} {mode}: {value['median_of_rounds']:.3f}x (median of per-round ratios), "
                f"{value['of_medians']:.3f}x (ratio of medians)"
            )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument(
        "--volume_size", type=int, default=VOLUME, help="volume edge (default 28; 8^3 tubelets)"
    )
    parser.add_argument("--bf16", action="store_true", help="run every variant under bf16 autocast")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant, mode and round")
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps per variant and mode at the start"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument(
        "--stem", action="store_true", help="ours with recipes/medmnist3d.yaml's conv stem and drop-path 0.1"
    )
    parser.add_argument("--compile", action="store_true", help="add ours_compiled (torch.compile of ours)")
    parser.add_argument("--eager", action="store_true", help="add ours_eager (ours with eager attention)")
    parser.add_argument(
        "--models",
        nargs="*",
        choices=list(MODELS),
        default=[],
        help="add ours as ViViT Model 2, 3 or 4 (eager attention), e.g. --models model3 model4",
    )
    parser.add_argument(
        "--native_defaults",
        action="store_true",
        help="add native with VivitConfig's gelu_fast, no attn dropout",
    )
    parser.add_argument(
        "--memory_steps", type=int, default=3, help="steps per child process for peak memory; 0 skips it"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="smoke test: batch 2, 1 round of 1 step, no warmup, memory of the first variant only"
    )
    parser.add_argument("--json", metavar="OUT", help="write settings, environment and results as JSON")
    parser.add_argument("--_memory_child", nargs=2, metavar=("VARIANT", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch_size, args.rounds, args.steps, args.warmup = 2, 1, 1, 0
        args.memory_steps = min(args.memory_steps, 1)  # an explicit --memory_steps 0 skips the children
    for name in ("batch_size", "rounds", "steps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.memory_steps < 0:
        parser.error("--warmup and --memory_steps must be >= 0")
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.stem:
        OURS_OVERRIDES.update(STEM)
    if args._memory_child:
        memory_child(
            *args._memory_child, args.batch_size, max(args.memory_steps, 1), args.threads, args.volume_size
        )
        return None
    torch.set_num_threads(args.threads)
    variants = ["ours", "native"]
    if args.native_defaults:
        variants.append("native_defaults")
    if args.compile:
        variants.append("ours_compiled")
    if args.eager:
        variants.append("ours_eager")
    variants += [f"ours_{name}" for name in args.models]

    results = measure_speed(variants, args)
    ratios = {"ours/native": {mode: ratio(results, "ours", "native", mode) for mode in MODES}}
    if args.native_defaults:
        ratios["ours/native_defaults"] = {
            mode: ratio(results, "ours", "native_defaults", mode) for mode in MODES
        }
    if args.eager:
        ratios["ours_eager/native"] = {mode: ratio(results, "ours_eager", "native", mode) for mode in MODES}
        ratios["ours_eager/ours"] = {mode: ratio(results, "ours_eager", "ours", mode) for mode in MODES}
    for name in args.models:
        ratios[f"ours_{name}/native"] = {mode: ratio(results, f"ours_{name}", "native", mode) for mode in MODES}
        if args.eager:  # against Model 1 with the same (eager) attention
            ratios[f"ours_{name}/ours_eager"] = {
                mode: ratio(results, f"ours_{name}", "ours_eager", mode) for mode in MODES
            }
    if args.compile:
        ratios["ours_compiled/ours"] = {mode: ratio(results, "ours_compiled", "ours", mode) for mode in MODES}
        ratios["ours_compiled/native"] = {
            mode: ratio(results, "ours_compiled", "native", mode) for mode in MODES
        }
    memory = None
    if args.memory_steps > 0:
        on_gpu = torch.device(args.device).type == "cuda"
        # --tiny (a smoke test): the memory children of the first variant only, the others' are the same code
        measured = variants[:1] if args.tiny else variants
        memory = (measure_gpu_memory if on_gpu else measure_memory)(measured, args)
    settings = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "json"}
    report = {
        "settings": settings,
        "environment": environment(args),
        "native_config": native_config_kwargs(),
        "results": results,
        "ratios": ratios,
        "memory": memory,
    }
    print_table(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
