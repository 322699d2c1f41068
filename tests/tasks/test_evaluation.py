"""The shared runners: batching must not change results; statistics match their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from strato_peft.evaluation import (
    bootstrap_ci,
    generate,
    loglikelihood,
    mean_stderr,
    pass_at_k,
    summarize,
    truncate_at_stop,
)
from strato_peft.evaluation.runners import encode_pair

REQUESTS = [
    ("The capital of France is", " Paris"),
    ("The capital of France is", " Rome"),
    ("Question: 2 + 2 =\nAnswer:", " 4"),
    ("A much longer context, with several words in it, ends here:", " and a two word continuation"),
    ("Short", " x"),
]


def test_encode_pair_moves_trailing_spaces_into_the_continuation(tokenizer) -> None:
    context, continuation = encode_pair(tokenizer, "Answer: ", "A")
    assert context == tokenizer("Answer:", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(continuation) == " A"


def test_loglikelihood_matches_a_manual_forward_pass(tokenizer, tiny_model) -> None:
    context, continuation = REQUESTS[3]
    ctx, cont = encode_pair(tokenizer, context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(tiny_model(ids).logits[0, :-1].float(), -1)
    expected = sum(float(logprobs[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
    ((got, _),) = loglikelihood(tiny_model, tokenizer, [REQUESTS[3]], batch_size=1)
    assert got == pytest.approx(expected, abs=1e-4)


def test_loglikelihood_does_not_depend_on_batch_size(tokenizer, tiny_model) -> None:
    one = loglikelihood(tiny_model, tokenizer, REQUESTS, batch_size=1)
    many = loglikelihood(tiny_model, tokenizer, REQUESTS, batch_size=4)
    for (a, ga), (b, gb) in zip(one, many, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
        assert ga == gb
    assert all(score < 0 for score, _ in one)


def test_greedy_generation_does_not_depend_on_batching_or_padding(tokenizer, tiny_model) -> None:
    prompts = ["Hello", "Once upon a time, in a land far away,", "def f(x):"]
    alone = [
        generate(tiny_model, tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts
    ]
    batched = generate(tiny_model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    assert batched == alone
    assert all(len(c) == 1 for c in batched)


def test_generation_is_cut_at_stop_strings(tokenizer, tiny_model) -> None:
    (free,) = generate(tiny_model, tokenizer, ["Hello"], max_new_tokens=8)
    text = free[0]
    assert text, "the random model generates something"
    stop = text[len(text) // 2 :][:2] or text[:1]
    (cut,) = generate(tiny_model, tokenizer, ["Hello"], max_new_tokens=8, stop=[stop])
    assert cut[0] == text[: text.find(stop)]


def test_sampling_returns_n_samples_per_prompt(tokenizer, tiny_model) -> None:
    out = generate(
        tiny_model, tokenizer, ["a", "bb"], max_new_tokens=3, num_samples=3, temperature=1.0
    )
    assert [len(x) for x in out] == [3, 3]


def test_truncate_at_stop() -> None:
    assert truncate_at_stop("x = 1\ndef g():\n", ["\ndef", "\nclass"]) == "x = 1"
    assert truncate_at_stop("no stop", ["\n"]) == "no stop"


def test_mean_stderr_uses_the_sample_standard_deviation() -> None:
    mean, se = mean_stderr([1.0, 0.0, 1.0, 0.0])
    assert mean == 0.5
    assert se == pytest.approx(math.sqrt((4 * 0.25) / 3 / 4))
    assert mean_stderr([1.0]) == (1.0, 0.0)


def test_summarize_reports_mean_stderr_and_a_wilson_interval_for_proportions() -> None:
    out = summarize("acc", [1.0] * 30 + [0.0] * 70)
    assert out["acc"] == pytest.approx(0.3)
    low, high = out["acc_ci95"]
    assert (low, high) == pytest.approx((0.2189, 0.3958), abs=1e-4)  # Wilson, 30 of 100
    none = summarize("acc", [0.0] * 32)["acc_ci95"]
    assert none[0] == 0.0 and none[1] == pytest.approx(0.1072, abs=1e-4)  # not [0, 0]
    scores = summarize("x", [0.2, 0.4, 0.6])  # not a proportion: the normal interval
    assert scores["x_ci95"][1] - scores["x_ci95"][0] == pytest.approx(2 * 1.96 * scores["x_stderr"])


def test_bootstrap_interval_is_seeded_and_brackets_the_mean() -> None:
    values = [1.0] * 30 + [0.0] * 70
    assert bootstrap_ci(values) == bootstrap_ci(values)
    low, high = bootstrap_ci(values)
    assert low < 0.3 < high


@pytest.mark.parametrize(
    ("n", "c", "k"), [(1, 0, 1), (1, 1, 1), (10, 3, 1), (10, 3, 5), (20, 1, 10), (5, 5, 5)]
)
def test_pass_at_k_is_the_unbiased_estimator(n: int, c: int, k: int) -> None:
    expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_needs_enough_samples() -> None:
    with pytest.raises(ValueError, match="at least 10"):
        pass_at_k(5, 1, 10)
