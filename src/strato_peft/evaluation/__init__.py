"""Evaluation runners shared by tasks.

- :func:`loglikelihood` -- batched ``log p(continuation | context)`` (multiple choice),
- :func:`generate` -- batched greedy/sampled generation, left padding, KV cache,
- :mod:`strato_peft.evaluation.statistics` -- standard errors, bootstrap intervals, pass@k.

torch and transformers are imported inside the functions, so scoring a file of
predictions never imports them.
"""

from strato_peft.evaluation.runners import generate, loglikelihood, truncate_at_stop
from strato_peft.evaluation.statistics import bootstrap_ci, mean_stderr, pass_at_k, summarize

__all__ = [
    "bootstrap_ci",
    "generate",
    "loglikelihood",
    "mean_stderr",
    "pass_at_k",
    "summarize",
    "truncate_at_stop",
]
