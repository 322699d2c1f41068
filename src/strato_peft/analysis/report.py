"""The report: one self-contained HTML file (figures inlined as base64 PNG) and a Markdown twin.

The HTML needs nothing but a browser: no scripts, no external files. It holds the
comparison table with verdicts and reasons, the statistical sentences, every figure,
the skipped folders with their reasons, and each run's resolved config and environment
(package versions, git commit, hardware) so a reader can repeat any run.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from strato_peft.analysis.compare import (
    TABLE_COLUMNS,
    Comparison,
    human,
    markdown_table,
    table_rows,
)
from strato_peft.analysis.runs import Run, Skipped

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 4px 8px; text-align: right; }
th { background: #eee; }
td.PASS { background: #c8f7c5; font-weight: bold; }
td.FAIL { background: #f7c5c5; font-weight: bold; }
td.NOT { background: #f7ecc5; }
td.INCONCLUSIVE { background: #f7ecc5; font-weight: bold; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.8em; }
"""

CRITERIA_TEXT = (
    "PASS needs all three of the product spec's criteria against LoRA of the same task: "
    "params <= 0.7 x LoRA or train FLOPs <= 0.8 x LoRA; the 95% interval of the paired score "
    "difference above -0.5 points and no wider than 0.5; std over seeds <= 0.4 points. "
    "INCONCLUSIVE: the interval straddles -0.5, is wider than 0.5, or every run scores 0. NOT ENOUGH DATA: fewer than 2 seeds or no LoRA "
    "baseline."
)


@dataclass(frozen=True)
class Report:
    html: str
    markdown: str


def _html_table(comparisons: list[Comparison]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in TABLE_COLUMNS)
    rows = []
    for row in table_rows(comparisons):
        cells = [f"<td>{html.escape(v)}</td>" for v in row[:-1]]
        cells.append(f'<td class="{row[-1].split()[0]}">{html.escape(row[-1])}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _run_details(run: Run) -> str:
    summary = f"{run.model}/{run.task}/{run.folder.name}: {run.metric} {run.score:.2f}"
    config = yaml.safe_dump(run.config, sort_keys=False)
    env = json.dumps(run.env, indent=2, sort_keys=True)
    return (
        f"<details><summary>{html.escape(summary)}</summary>"
        f"<p>folder: <code>{html.escape(str(run.folder))}</code>; FLOPs source: "
        f"{html.escape(run.flops_source)}</p>"
        f"<h4>config.yaml</h4><pre>{html.escape(config)}</pre>"
        f"<h4>env.json</h4><pre>{html.escape(env)}</pre></details>"
    )


def build_report(
    runs: list[Run],
    skipped: list[Skipped],
    comparisons: list[Comparison],
    figures: dict[str, bytes],
    title: str = "STRATO-PEFT results",
    figure_dir: str = "figures",
) -> Report:
    """HTML (figures inlined) and Markdown (figures linked as ``<figure_dir>/<stem>.png``)."""
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p>{len(runs)} complete runs, {len(skipped)} skipped; "
        f"generated {when}.</p>",
        "<h2>Comparison with LoRA</h2>",
        f"<p>{html.escape(CRITERIA_TEXT)}</p>",
        _html_table(comparisons),
        "<ul>",
    ]
    md = [
        f"# {title}",
        "",
        f"{len(runs)} complete runs, {len(skipped)} skipped; generated {when}.",
        "",
        "## Comparison with LoRA",
        "",
        CRITERIA_TEXT,
        "",
        markdown_table(comparisons),
        "",
    ]
    for c in comparisons:
        if c.verdict == "BASELINE":
            continue
        text = f"{c.group.task} {c.group.label}: {c.verdict}. " + "; ".join(c.reasons)
        if c.sentence:
            text += f". {c.sentence}"
        parts.append(f"<li>{html.escape(text)}</li>")
        md.append(f"- {text}")
    parts.append("</ul><h2>Figures</h2>")
    md += ["", "## Figures", ""]
    for stem, png in figures.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(
            f"<h3>{html.escape(stem)}</h3><img alt='{html.escape(stem)}' "
            f"src='data:image/png;base64,{data}'>"
        )
        md.append(f"![{stem}]({figure_dir}/{stem}.png)")
    if skipped:
        parts.append("<h2>Skipped folders</h2><ul>")
        md += ["", "## Skipped folders", ""]
        for s in skipped:
            parts.append(
                f"<li><code>{html.escape(str(s.folder))}</code>: {html.escape(s.reason)}</li>"
            )
            md.append(f"- `{s.folder}`: {s.reason}")
        parts.append("</ul>")
    parts.append("<h2>Runs (config and environment)</h2>")
    md += [
        "",
        "## Runs",
        "",
        "| run | score | params | FLOPs/step | git | torch |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        parts.append(_run_details(run))
        packages = run.env.get("packages") or {}
        commit = str(run.env.get("git_commit") or "")[:10]
        md.append(
            f"| {run.model}/{run.task}/{run.folder.name} | {run.score:.2f} | {run.trainable_params} "
            f"| {human(run.flops_per_step)} | {commit} | {packages.get('torch', '')} |"
        )
    parts.append("</body></html>")
    return Report(html="\n".join(parts), markdown="\n".join(md) + "\n")


def write_report(report: Report, figures: dict[str, bytes], out: Path) -> tuple[Path, Path]:
    """``<out>.html`` and ``<out>.md`` (figures beside it in ``figures/``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    html_path, md_path = out.with_suffix(".html"), out.with_suffix(".md")
    html_path.write_text(report.html, encoding="utf-8")
    md_path.write_text(report.markdown, encoding="utf-8")
    figure_dir = out.parent / "figures"
    figure_dir.mkdir(exist_ok=True)
    for stem, png in figures.items():
        (figure_dir / f"{stem}.png").write_bytes(png)
    return html_path, md_path
