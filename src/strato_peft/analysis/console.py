"""Terminal output of the analysis commands (rich tables; plain text when piped)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from strato_peft.analysis.compare import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    TABLE_COLUMNS,
    Comparison,
    table_rows,
)
from strato_peft.analysis.goal import MET, NOT_MET, GoalCheck
from strato_peft.analysis.runs import Skipped

VERDICT_STYLE = {PASS: "bold green", FAIL: "bold red", INCONCLUSIVE: "bold yellow",
                 MET: "bold green", NOT_MET: "bold red"}  # fmt: skip


def make_console() -> Console:
    """Terminal width on a terminal; wide enough for the table when piped to a file."""
    console = Console()
    return console if console.is_terminal else Console(width=200)


def comparison_table(comparisons: list[Comparison], title: str = "STRATO-PEFT vs LoRA") -> Table:
    table = Table(title=title, show_lines=False)
    for column in TABLE_COLUMNS:
        table.add_column(
            column, justify="left" if column in ("task", "method", "budget") else "right"
        )
    for row in table_rows(comparisons):
        style = VERDICT_STYLE.get(row[-1], "yellow" if row[-1] != "BASELINE" else "")
        table.add_row(*row[:-1], f"[{style}]{row[-1]}[/]" if style else row[-1])
    return table


def print_comparisons(
    console: Console, comparisons: list[Comparison], reasons: bool = True
) -> None:
    console.print(comparison_table(comparisons))
    if not reasons:
        return
    for c in comparisons:
        if c.verdict == "BASELINE":
            continue
        console.print(f"[bold]{c.group.task} {c.group.label}[/]: {c.verdict}", highlight=False)
        for reason in c.reasons:
            console.print(f"  - {reason}", highlight=False)
        if c.sentence:
            console.print(f"  {c.sentence}", highlight=False)


def print_skipped(console: Console, skipped: list[Skipped]) -> None:
    if not skipped:
        return
    console.print(f"[yellow]skipped {len(skipped)} folder(s):[/]")
    for s in skipped:
        console.print(f"  {s.folder}: {s.reason}", highlight=False, soft_wrap=True)


def print_goal(console: Console, checks: list[GoalCheck], method: str) -> None:
    """The stricter goal's checks (:mod:`strato_peft.analysis.goal`), one line each."""
    if not checks:
        console.print(f"goal: no complete {method} runs", highlight=False)
        return
    group = None
    for c in checks:
        if c.group != group:
            group = c.group
            console.print(f"[bold]goal of {group}[/]", highlight=False)
        style = VERDICT_STYLE.get(c.verdict, "yellow")
        console.print(f"  - {c.check}: [{style}]{c.verdict}[/] ({c.detail})", highlight=False)
