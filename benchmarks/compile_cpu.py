#!/usr/bin/env python
"""``device_info.compile_model``: our Trainer's step time with and without ``torch.compile``.

Two Trainers, built as ``run_experiment`` builds them from the CPU LoRA config, one with
``device_info.compile_model=false`` and one with ``true`` (the Trainer wraps the model in
``torch.compile``, inductor), train SmolLM2-135M on the same fixed-shape GSM8K
micro-batches in the same process. The compiled one's first steps (tracing and code
generation) are timed apart as the compile cost; then timed blocks of ``--steps``
optimizer steps alternate between the two (eager/compiled, then compiled/eager ...), so
background load hits both alike. The ratio is the median compiled step time over the
median eager step time (< 1: compile wins), with a bootstrap 95% interval over blocks.
Writes ``benchmarks/results/compile_cpu.json``::

    STRATO_DATA_DIR=../shared/data python benchmarks/compile_cpu.py            # ~10 min, idle 2-core CPU
    python benchmarks/compile_cpu.py --data-path DIR --blocks 3 --steps 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import strato_peft  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from train_throughput import DEFAULT_CONFIG, OurLoop, fixed_batches, time_block  # noqa: E402

from strato_peft.config import load_config  # noqa: E402
from strato_peft.encoding import encode_examples  # noqa: E402

DEFAULT_OUTPUT = ROOT / "benchmarks/results/compile_cpu.json"


def bootstrap_ratio_ci(a: list[float], b: list[float], seed: int = 0) -> list[float]:
    """95% percentile-bootstrap interval of median(a) / median(b), blocks resampled in pairs."""
    rng = random.Random(seed)
    pairs = list(zip(a, b, strict=True))
    ratios = []
    for _ in range(2000):
        sample = [rng.choice(pairs) for _ in pairs]
        ratios.append(
            statistics.median(x for x, _ in sample) / statistics.median(y for _, y in sample)
        )
    ratios.sort()
    return [ratios[int(0.025 * len(ratios))], ratios[int(0.975 * len(ratios)) - 1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument(
        "--data-path", default=os.path.join(os.environ.get("STRATO_DATA_DIR", ""), "gsm8k")
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per loop")
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    args = parser.parse_args()
    if not (Path(args.data_path) / "train.jsonl").is_file():
        parser.error(
            f"no train.jsonl under {args.data_path!r}: pass --data-path or STRATO_DATA_DIR"
        )

    from accelerate import Accelerator, DataLoaderConfiguration

    from strato_peft.models import load_tokenizer
    from strato_peft.tasks import load_task

    accelerator = Accelerator(
        cpu=True,
        mixed_precision="no",
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    overrides = [
        f"task.data_path={args.data_path}",
        f"task.max_length={args.seq_len}",
        f"task.limit={args.batches * args.batch_size}",
        "task.eval_limit=4",
        f"training.batch_size={args.batch_size}",
        "training.gradient_accumulation_steps=1",
        f"training.max_steps={args.warmup + args.blocks * args.steps + 1}",
        "logging.wandb=false",
        "logging.tensorboard=false",
    ]
    eager_cfg = load_config(args.config, [*overrides, "device_info.compile_model=false"])
    compiled_cfg = load_config(args.config, [*overrides, "device_info.compile_model=true"])
    tokenizer = load_tokenizer(eager_cfg.model)
    task = load_task(eager_cfg.task)
    encoded = encode_examples(task, task.train_examples(), tokenizer, args.seq_len)
    batches = fixed_batches(encoded, args.batch_size, args.seq_len, tokenizer.pad_token_id)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compile_cpu.") as tmp:
        eager = OurLoop(eager_cfg, accelerator, task, tokenizer, Path(tmp) / "eager")
        compiled = OurLoop(compiled_cfg, accelerator, task, tokenizer, Path(tmp) / "compiled")
        first: dict[str, float] = {}
        compile_s = []
        for name, loop in (("eager", eager), ("compiled", compiled)):
            torch.manual_seed(args.seed)
            t0 = time.perf_counter()
            first[name] = loop.step(batches[0])
            if name == "compiled":
                compile_s.append(time.perf_counter() - t0)
            for i in range(1, args.warmup):
                t0 = time.perf_counter()
                loop.step(batches[i % len(batches)])
                if name == "compiled":
                    compile_s.append(time.perf_counter() - t0)
        seconds: dict[str, list[float]] = {"eager": [], "compiled": []}
        for block in range(args.blocks):
            chunk = [
                batches[(args.warmup + block * args.steps + i) % len(batches)]
                for i in range(args.steps)
            ]
            order = (("eager", eager), ("compiled", compiled))
            for name, loop in order if block % 2 == 0 else order[::-1]:
                seconds[name].append(time_block(loop.step, chunk) / args.steps)
            print(
                f"block {block + 1}/{args.blocks}: eager {seconds['eager'][-1]:.2f} s/step, "
                f"compiled {seconds['compiled'][-1]:.2f} s/step",
                flush=True,
            )
        eager.close()
        compiled.close()
    ratio = statistics.median(seconds["compiled"]) / statistics.median(seconds["eager"])
    report: dict[str, Any] = {
        "compile_ratio": ratio,
        "compile_ratio_ci95": bootstrap_ratio_ci(seconds["compiled"], seconds["eager"]),
        "eager_step_s_median": statistics.median(seconds["eager"]),
        "compiled_step_s_median": statistics.median(seconds["compiled"]),
        "eager_block_step_s": seconds["eager"],
        "compiled_block_step_s": seconds["compiled"],
        "compile_warmup_step_s": compile_s,
        "first_step_loss": first,
        "settings": {
            "model": "smollm2_135m (packaged, fp32)",
            "method": "lora r16 q,v (configs/experiments/cpu_smollm2_gsm8k_lora.yaml)",
            "batch": [args.batch_size, args.seq_len],
            "blocks": args.blocks,
            "steps_per_block": args.steps,
            "warmup_steps": args.warmup,
            "statistic": "median step time over blocks; ratio = compiled / eager",
        },
        "environment": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "wall_s": round(time.perf_counter() - started, 1),
        },
    }
    print(
        f"compiled / eager step time: {ratio:.3f} (95% CI {report['compile_ratio_ci95'][0]:.3f}"
        f"-{report['compile_ratio_ci95'][1]:.3f}); compile warm-up {sum(compile_s):.0f} s"
    )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
