"""The two model-facing evaluation primitives: log-likelihood and greedy generation.

Both follow lm-evaluation-harness' ``HFLM`` conventions (``lm_eval/models/huggingface.py``):
continuations are tokenized as ``encode(context + continuation)[len(encode(context)):]``
with trailing context spaces moved into the continuation and no special tokens
added; requests are sorted by length and batched; generation pads on the left and
uses the KV cache. Works with any ``transformers`` causal LM or ``peft`` model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def model_device(model: Any, device: Any = None) -> Any:
    """``device`` if given, else the device of the model's first parameter."""
    import torch

    if device is not None:
        return torch.device(device)
    return next(model.parameters()).device


def context_window(model: Any, tokenizer: Any, default: int = 2048) -> int:
    """The model's maximum sequence length (config), capped by the tokenizer's when it is sane."""
    config = getattr(model, "config", None)
    length = getattr(config, "max_position_embeddings", None) or default
    tokenizer_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_max, int) and 0 < tokenizer_max < length:
        length = tokenizer_max
    return int(length)


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and of ``continuation`` as it is tokenized after the context."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    if not context_ids:
        prefix = (
            tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        )
        return [prefix], list(whole)
    return list(context_ids), list(whole[len(context_ids) :])


def loglikelihood(
    model: Any,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    *,
    batch_size: int = 8,
    device: Any = None,
    max_length: int | None = None,
) -> list[tuple[float, bool]]:
    """``(sum of log p(continuation | context), continuation is the greedy one)`` per request.

    Requests whose model input is identical (same context, one-token continuations,
    as MMLU's four letters) share one forward pass. Inputs longer than the context
    window are truncated on the left, as lm-eval does.
    """
    import torch

    device = model_device(model, device)
    window = max_length or context_window(model, tokenizer)
    encoded = [encode_pair(tokenizer, c, x) for c, x in requests]
    inputs: dict[tuple[int, ...], list[int]] = {}
    for index, (context_ids, continuation_ids) in enumerate(encoded):
        if not continuation_ids:
            raise ValueError(f"request {index}: the continuation is empty after tokenization")
        full = (context_ids + continuation_ids)[-(window + 1) :]
        inputs.setdefault(tuple(full[:-1]), []).append(index)
    order = sorted(inputs, key=len, reverse=True)
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                width = len(chunk[0])
                keep = max(len(encoded[i][1]) for key in chunk for i in inputs[key])
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, key in enumerate(chunk):
                    ids[row, width - len(key) :] = torch.tensor(key, dtype=torch.long)
                    mask[row, width - len(key) :] = 1
                logits = _last_logits(model, ids.to(device), mask.to(device), keep)
                logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
                for row, key in enumerate(chunk):
                    for index in inputs[key]:
                        continuation = encoded[index][1]
                        span = logprobs[row, keep - len(continuation) :]
                        target = torch.tensor(continuation, dtype=torch.long)
                        total = float(span.gather(1, target[:, None]).sum())
                        greedy = bool((span.argmax(-1) == target).all())
                        results[index] = (total, greedy)
    finally:
        model.train(was_training)
    return results


def _last_logits(model: Any, ids: Any, mask: Any, keep: int) -> Any:
    """Logits of the last ``keep`` positions of a left-padded batch.

    Position ids are counted from each row's first real token, so padding does not
    shift them; ``logits_to_keep`` spares the ``batch x length x vocabulary`` logits
    (gigabytes for 5-shot MMLU) where the model supports it.
    """
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    try:
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep)
    except TypeError:
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions)
    return out.logits[:, -keep:]


def _stop_criteria(tokenizer: Any, stop: Sequence[str], prompt_width: int) -> Any:
    import torch
    from transformers import StoppingCriteria

    class StopOnStrings(StoppingCriteria):
        """Per row: done once its generated text contains a stop string."""

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            tails = tokenizer.batch_decode(
                input_ids[:, prompt_width:][:, -16:], skip_special_tokens=False
            )
            return torch.tensor(
                [any(s in tail for s in stop) for tail in tails],
                dtype=torch.bool,
                device=input_ids.device,
            )

    return StopOnStrings()


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        position = text.find(s)
        if position != -1:
            cut = min(cut, position)
    return text[:cut]


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 256,
    stop: Sequence[str] = (),
    batch_size: int = 8,
    device: Any = None,
    num_samples: int = 1,
    temperature: float = 0.0,
    seed: int = 1234,
) -> list[list[str]]:
    """``num_samples`` completions per prompt (greedy when ``temperature`` is 0).

    Prompts are sorted by length, left-padded into batches and decoded with the KV
    cache; each completion is cut at the first stop string and the end-of-sequence
    token. Returns one list of completions per prompt, in the input order.
    """
    import torch

    device = model_device(model, device)
    window = context_window(model, tokenizer)
    eos_ids = {tokenizer.eos_token_id} - {None}
    generation_config = getattr(model, "generation_config", None)
    config_eos = getattr(generation_config, "eos_token_id", None)
    if isinstance(config_eos, int):
        eos_ids.add(config_eos)
    elif isinstance(config_eos, list):
        eos_ids.update(config_eos)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [
        tokenizer(p, add_special_tokens=False)["input_ids"][-(window - max_new_tokens) :]
        for p in prompts
    ]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    outputs: list[list[str]] = [[] for _ in prompts]
    sampling = temperature > 0
    if sampling:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                width = max(len(encoded[i]) for i in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, index in enumerate(chunk):
                    tokens = encoded[index]
                    ids[row, width - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
                    mask[row, width - len(tokens) :] = 1
                kwargs: dict[str, Any] = {
                    "max_new_tokens": max_new_tokens,
                    "use_cache": True,
                    "pad_token_id": pad,
                    "eos_token_id": sorted(eos_ids) or None,
                    "num_return_sequences": num_samples,
                    "do_sample": sampling,
                }
                if sampling:
                    kwargs.update(temperature=temperature, top_p=1.0, top_k=0)
                else:
                    kwargs.update(temperature=None, top_p=None, top_k=None)
                if stop:
                    from transformers import StoppingCriteriaList

                    kwargs["stopping_criteria"] = StoppingCriteriaList(
                        [_stop_criteria(tokenizer, stop, width)]
                    )
                generated = model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs
                )
                new_tokens = generated[:, width:].cpu()
                for row in range(new_tokens.shape[0]):
                    tokens = new_tokens[row].tolist()
                    for position, token in enumerate(tokens):
                        if token in eos_ids:
                            tokens = tokens[:position]
                            break
                    text = tokenizer.decode(tokens, skip_special_tokens=True)
                    outputs[chunk[row // num_samples]].append(truncate_at_stop(text, stop))
    finally:
        model.train(was_training)
    return outputs
