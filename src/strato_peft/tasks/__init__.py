"""Tasks: data, prompt format, evaluation and scoring of one benchmark each.

Public interface (used by the training loop and the ``score``/``eval`` commands)::

    from strato_peft.tasks import Example, Task, load_task
    task = load_task(cfg.task)            # registry: mmlu, gsm8k, humaneval, alpaca
    task.data_source                      # e.g. "STRATO_DATA_DIR:/data/gsm8k" (set on first load)
    task.train_examples(); task.eval_examples(); task.test_examples()
    prompt, target = task.format_for_training(example, tokenizer)
    metrics = task.evaluate(model, tokenizer, batch_size=8, limit=None, device=None)
    metrics = task.score_predictions(rows)  # no model needed

See docs/tasks.md for data sources, subsets and metric conventions.
"""

from strato_peft.tasks.base import DATA_DIR_ENV, DataError, Example, Task, load_task

__all__ = ["DATA_DIR_ENV", "DataError", "Example", "Task", "load_task"]
