#!/usr/bin/env python
"""Training throughput: our :class:`Trainer` against a textbook transformers + peft loop.

Both loops train SmolLM2-135M with LoRA (then DoRA) in the same process, on the same
pre-tokenised GSM8K micro-batches of one fixed shape (``batch x seq_len``, right-padded),
with the same base weights, adapter initialisation, seed, AdamW, LR schedule and
gradient clipping, and gradient accumulation 1. "Ours" is one call of
``Trainer._step([batch])`` per optimizer step (the Trainer built as ``run_experiment``
builds it, on ``accelerate``); "theirs" is::

    out = model(input_ids=..., attention_mask=..., labels=...)
    out.loss.backward(); clip_grad_norm_(...); optimizer.step(); scheduler.step()
    optimizer.zero_grad(set_to_none=True)

After a warm-up, timed blocks of ``--steps`` optimizer steps alternate between the
loops (ours/theirs, then theirs/ours, ...) so that background load hits both alike.
Throughput is non-pad tokens per second; each loop's figure is the median over its
blocks and the ratio is ours / theirs. Writes ``benchmarks/results/train_throughput.json``::

    STRATO_DATA_DIR=../shared/data python benchmarks/train_throughput.py   # 5 x 2 steps: ~7 min, idle 2-core CPU
    python benchmarks/train_throughput.py --data-path DIR --methods lora --blocks 2 --steps 2
    python benchmarks/train_throughput.py --data-path DIR --profile             # + per-op table
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
try:
    import strato_peft  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from strato_peft.config import load_config  # noqa: E402
from strato_peft.config.schema import ExperimentConfig  # noqa: E402
from strato_peft.encoding import IGNORE_INDEX, Encoded, encode_examples  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs/experiments/cpu_smollm2_gsm8k_lora.yaml"
DEFAULT_OUTPUT = ROOT / "benchmarks/results/train_throughput.json"
Batch = dict[str, torch.Tensor]


def fixed_batches(items: list[Encoded], batch_size: int, seq_len: int, pad_id: int) -> list[Batch]:
    """Micro-batches of exactly ``batch_size x seq_len`` (right-padded, labels -100 on pads)."""
    batches = []
    for start in range(0, len(items) - batch_size + 1, batch_size):
        ids = torch.full((batch_size, seq_len), pad_id, dtype=torch.long)
        labels = torch.full((batch_size, seq_len), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((batch_size, seq_len), dtype=torch.long)
        for row, item in enumerate(items[start : start + batch_size]):
            n = min(len(item.input_ids), seq_len)
            ids[row, :n] = torch.tensor(item.input_ids[:n])
            labels[row, :n] = torch.tensor(item.labels[:n])
            mask[row, :n] = 1
        batches.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return batches


class OurLoop:
    """A :class:`Trainer` set up as ``run_experiment`` does; one ``_step`` per batch."""

    name = "ours"

    def __init__(
        self, config: ExperimentConfig, accelerator: Any, task: Any, tokenizer: Any, folder: Path
    ) -> None:
        from accelerate.utils import set_seed

        from strato_peft.methods import get_method
        from strato_peft.models import load_model
        from strato_peft.training.loop import Trainer

        base = load_model(config.model, seed=config.seed)
        method = get_method(config.peft, total_steps=config.training.max_steps)
        set_seed(config.seed)
        model = method.build(base)
        self.trainer = Trainer(
            config, accelerator=accelerator, model=model, method=method, task=task,
            tokenizer=tokenizer, folder=folder,
        )  # fmt: skip
        self.trainer.model.train()

    def model(self) -> Any:
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

    def step(self, batch: Batch) -> float:
        loss, _ = self.trainer._step([batch])
        return loss

    def close(self) -> None:
        self.trainer.close()


class TextbookLoop:
    """The minimal hand-written loop: plain ``peft.get_peft_model`` and HF's own loss."""

    name = "theirs"

    def __init__(self, config: ExperimentConfig) -> None:
        from accelerate.utils import set_seed
        from peft import LoraConfig, get_peft_model
        from transformers import get_scheduler

        from strato_peft.methods import method_class
        from strato_peft.models import load_model

        p, t = config.peft, config.training
        base = load_model(config.model, seed=config.seed)
        set_seed(config.seed)
        self.peft_model = get_peft_model(
            base,
            LoraConfig(
                r=p.rank, lora_alpha=p.alpha, lora_dropout=p.dropout,
                target_modules=list(p.target_modules), use_dora=method_class(p.method).use_dora,
                task_type="CAUSAL_LM",
            ),
        )  # fmt: skip
        self.params = [q for q in self.peft_model.parameters() if q.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=t.learning_rate, weight_decay=t.weight_decay
        )
        self.scheduler = get_scheduler(
            t.lr_scheduler if t.lr_scheduler != "constant" else "constant_with_warmup",
            optimizer=self.optimizer,
            num_warmup_steps=int(t.warmup_ratio * (t.max_steps or 1)),
            num_training_steps=t.max_steps or 1,
        )
        self.max_grad_norm = t.max_grad_norm
        self.peft_model.train()

    def model(self) -> Any:
        return self.peft_model

    def step(self, batch: Batch) -> float:
        out = self.peft_model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        )
        out.loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(out.loss.item())

    def close(self) -> None:
        pass


def check_same_adapter(ours: Any, theirs: Any) -> None:
    """Both loops must start from identical trainable weights (names and values)."""
    a = {n: q for n, q in ours.named_parameters() if q.requires_grad}
    b = {n: q for n, q in theirs.named_parameters() if q.requires_grad}
    if a.keys() != b.keys():
        raise SystemExit(f"trainable parameters differ: {sorted(a.keys() ^ b.keys())[:5]}")
    different = [n for n in a if not torch.equal(a[n], b[n])]
    if different:
        raise SystemExit(f"adapters start from different values: {different[:5]}")


def time_block(step: Callable[[Batch], float], batches: list[Batch]) -> float:
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    return time.perf_counter() - start


def profile_steps(loop: Any, batches: list[Batch], row_limit: int) -> dict[str, float]:
    """Self CPU time (ms) per op over ``batches``; prints the top of the table."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches:
            loop.step(batch)
    averages = prof.key_averages()
    print(f"\n--- profile: {loop.name}, {len(batches)} steps ---")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=row_limit))
    return {e.key: e.self_cpu_time_total / 1e3 for e in averages}


def print_profile_diff(ours: dict[str, float], theirs: dict[str, float], n: int) -> None:
    diff = {k: ours.get(k, 0.0) - theirs.get(k, 0.0) for k in ours.keys() | theirs.keys()}
    total = sum(ours.values()) - sum(theirs.values())
    print(f"\n--- self CPU ms, ours - theirs (total {total:+.0f} ms) ---")
    for key in sorted(diff, key=lambda k: -abs(diff[k]))[:n]:
        print(f"{diff[key]:+10.1f}  {ours.get(key, 0):9.1f}  {theirs.get(key, 0):9.1f}  {key}")


def benchmark_method(
    method: str, args: argparse.Namespace, accelerator: Any, tokenizer: Any, workdir: Path
) -> dict[str, Any]:
    from strato_peft.tasks import load_task

    n_steps = args.warmup + args.blocks * args.steps
    overrides = [
        f"peft.method={method}",
        f"task.data_path={args.data_path}",
        f"task.max_length={args.seq_len}",
        f"task.limit={args.batches * args.batch_size}",
        "task.eval_limit=4",
        f"training.batch_size={args.batch_size}",
        "training.gradient_accumulation_steps=1",
        f"training.max_steps={max(n_steps, 1)}",
        "logging.wandb=false",
        "logging.tensorboard=false",
        f"output.dir={workdir}",
    ]
    config = load_config(args.config, overrides, seed=args.seed)
    task = load_task(config.task)
    encoded = encode_examples(task, task.train_examples(), tokenizer, args.seq_len)
    batches = fixed_batches(encoded, args.batch_size, args.seq_len, tokenizer.pad_token_id)
    if not batches:
        raise SystemExit(f"not enough examples for one batch of {args.batch_size}")
    tokens = [int(b["attention_mask"].sum()) for b in batches]

    def schedule(start: int, count: int) -> list[Batch]:
        return [batches[(start + i) % len(batches)] for i in range(count)]

    ours = OurLoop(config, accelerator, task, tokenizer, workdir / f"ours_{method}")
    theirs = TextbookLoop(config)
    check_same_adapter(ours.model(), theirs.model())
    trainable = sum(q.numel() for q in theirs.params)

    # First step from the same state and RNG: the two loops compute the same loss.
    first = {}
    for loop in (ours, theirs):
        torch.manual_seed(args.seed)
        first[loop.name] = loop.step(batches[0])
    for loop in (ours, theirs):
        for batch in schedule(1, args.warmup - 1):
            loop.step(batch)

    seconds: dict[str, list[float]] = {"ours": [], "theirs": []}
    block_tokens = []
    block_load = []
    for block in range(args.blocks):
        chunk = schedule(args.warmup + block * args.steps, args.steps)
        block_tokens.append(sum(int(b["attention_mask"].sum()) for b in chunk))
        order = (ours, theirs) if block % 2 == 0 else (theirs, ours)
        for loop in order:
            seconds[loop.name].append(time_block(loop.step, chunk))
        block_load.append(round(os.getloadavg()[0], 2))
        print(
            f"{method} block {block + 1}/{args.blocks}: "
            + "  ".join(f"{n} {block_tokens[-1] / s[-1]:7.1f} tok/s" for n, s in seconds.items())
            + f"  load {block_load[-1]:.2f}",
            flush=True,
        )
    tps = {
        n: [tok / s for tok, s in zip(block_tokens, secs, strict=True)]
        for n, secs in seconds.items()
    }
    median = {n: statistics.median(v) for n, v in tps.items()}

    if args.profile:
        chunk = schedule(0, args.profile_steps)
        prof_ours = profile_steps(ours, chunk, args.profile_rows)
        prof_theirs = profile_steps(theirs, chunk, args.profile_rows)
        print_profile_diff(prof_ours, prof_theirs, args.profile_rows)

    ours.close()
    theirs.close()
    return {
        "ratio": median["ours"] / median["theirs"],
        "ours_tokens_per_s": median["ours"],
        "theirs_tokens_per_s": median["theirs"],
        "ours_block_tokens_per_s": tps["ours"],
        "theirs_block_tokens_per_s": tps["theirs"],
        "ours_step_s_median": statistics.median(seconds["ours"]) / args.steps,
        "theirs_step_s_median": statistics.median(seconds["theirs"]) / args.steps,
        "first_step_loss": first,
        "trainable_params": trainable,
        "block_tokens": block_tokens,
        "block_loadavg_1min": block_load,
        "mean_nonpad_tokens_per_batch": statistics.mean(tokens),
        "peft": config.peft.model_dump(include={"rank", "alpha", "dropout", "target_modules"}),
        "learning_rate": config.training.learning_rate,
        "lr_scheduler": config.training.lr_scheduler,
        "max_grad_norm": config.training.max_grad_norm,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument(
        "--data-path",
        default=os.path.join(os.environ.get("STRATO_DATA_DIR", ""), "gsm8k"),
        help="GSM8K folder with train.jsonl (default: $STRATO_DATA_DIR/gsm8k)",
    )
    parser.add_argument("--methods", nargs="+", default=["lora", "dora"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batches", type=int, default=16, help="distinct batches, cycled")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per loop (>= 1)")
    parser.add_argument("--blocks", type=int, default=5, help="timed blocks per loop")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per block")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--profile", action="store_true", help="print a per-op comparison")
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--profile-rows", type=int, default=15)
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    args = parser.parse_args()
    if not (Path(args.data_path) / "train.jsonl").is_file():
        parser.error(
            f"no train.jsonl under {args.data_path!r}: pass --data-path or STRATO_DATA_DIR"
        )
    args.warmup = max(args.warmup, 1)

    import accelerate
    import peft
    import transformers
    from accelerate import Accelerator, DataLoaderConfiguration

    from strato_peft.models import load_tokenizer

    threads_before = torch.get_num_threads()
    accelerator = Accelerator(
        cpu=True,
        mixed_precision="no",
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    tokenizer = load_tokenizer(load_config(args.config).model)
    load_start = os.getloadavg()
    wall_start = time.perf_counter()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="train_throughput.") as tmp:
        for method in args.methods:
            results[method] = benchmark_method(method, args, accelerator, tokenizer, Path(tmp))
            gc.collect()
    report: dict[str, Any] = {
        **{f"{m}_ratio": r["ratio"] for m, r in results.items()},
        **{
            f"{m}_{k}": r[k]
            for m, r in results.items()
            for k in ("ours_tokens_per_s", "theirs_tokens_per_s")
        },
        "methods": results,
        "settings": {
            "model": "smollm2_135m (packaged, fp32)",
            "config": str(Path(args.config).resolve().relative_to(ROOT)),
            "data": "GSM8K train (first examples), prompt tokens masked in the labels",
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "distinct_batches": args.batches,
            "gradient_accumulation_steps": 1,
            "warmup_steps": args.warmup,
            "blocks": args.blocks,
            "steps_per_block": args.steps,
            "seed": args.seed,
            "tokens": "non-pad tokens (attention_mask sum); every batch is batch x seq_len",
            "statistic": "median over blocks of tokens/s; ratio = ours / theirs",
        },
        "environment": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "accelerate": accelerate.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch_threads_before_accelerator": threads_before,
            "torch_interop_threads": torch.get_num_interop_threads(),
            "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
            "loadavg_start": list(load_start),
            "loadavg_end": list(os.getloadavg()),
            "wall_s": round(time.perf_counter() - wall_start, 1),
        },
    }
    print()
    for method, r in results.items():
        print(
            f"{method:5s} ours {r['ours_tokens_per_s']:7.1f} tok/s  theirs "
            f"{r['theirs_tokens_per_s']:7.1f} tok/s  ratio {r['ratio']:.3f}"
        )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
