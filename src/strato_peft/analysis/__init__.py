"""Experiment management and analysis: run folders in, tables, verdicts, plots and reports out.

One concern per module:

* :mod:`.runs` -- read run folders (complete ones become :class:`~.runs.Run`, others a reason);
* :mod:`.stats` -- means, paired t-test, the interval of a difference;
* :mod:`.compare` -- groups, LoRA baselines and the spec's PASS / FAIL / INCONCLUSIVE / NOT ENOUGH DATA;
* :mod:`.plots` -- matplotlib figures (score vs params/FLOPs, curves, rank heatmaps);
* :mod:`.report` -- one self-contained HTML report and a Markdown twin;
* :mod:`.logs` -- ``torch.profiler`` traces and ``training.log`` summaries;
* :mod:`.batch` -- run every experiment config x seeds, resumably.

The command-line front ends are in ``strato_peft.commands.analysis``.
"""
