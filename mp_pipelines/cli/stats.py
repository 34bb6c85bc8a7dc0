"""`mp-pipelines stats`: calls, tokens, cost, cache hits, failures, latency and 429s over time, per workflow, task,
model or day, from the instance's database (`usage_stats.py`); `--html` draws them with plotly in one file."""

from __future__ import annotations

import html
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from mp_pipelines.cli.usage_stats import GROUPINGS, SinceError, group_calls, parse_since, stored_calls

COLUMNS = ("calls", "prompt_tokens", "completion_tokens", "cost_usd", "cache_hits", "failures", "p50_latency_s",
           "p95_latency_s", "rate_limited")


@click.command("stats")
@click.option("--since", default="7d", show_default=True,
              help="From when: a number of days or hours back (7d, 24h) or a UTC date (YYYY-MM-DD).")
@click.option("--by", "by", type=click.Choice(GROUPINGS), default="workflow", show_default=True,
              help="One row per workflow, task, model or UTC day.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per group.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write a self-contained HTML report with charts to this file.")
def stats_command(since: str, by: str, as_json: bool, html_path: Path | None) -> None:
    """Model calls, tokens, cost, cache hits, failures, p50/p95 call latency and 429s per group, from the
    Dagster instance (DAGSTER_HOME, else ./.mp_pipelines/dagster_home)."""
    from mp_pipelines.cli.running import local_instance

    try:
        start = parse_since(since)
    except SinceError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    instance = local_instance()
    try:
        calls = list(stored_calls(instance, start))
    finally:
        instance.dispose()
    rows = [group.as_dict() for group in group_calls(calls, by)]
    if html_path is not None:
        try:
            html_path.write_text(html_report(calls, rows, by, start), encoding="utf-8")
        except OSError as exc:
            raise click.ClickException(f"cannot write the report to {html_path}: {exc}") from None
        click.echo(f"wrote {html_path}", err=True)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
    else:
        click.echo(text_table(rows, by, start))


def text_table(rows: list[dict[str, Any]], by: str, since: datetime) -> str:
    """The groups as an aligned table."""
    keys = ["workflow", "task"] if by == "task" else [by]
    header = [*keys, "calls", "tokens in+out", "cost_usd", "cache_hit%", "failures", "p50_s", "p95_s", "429s"]
    lines = [[*(str(row[k]) for k in keys), str(row["calls"]), f"{row['prompt_tokens']}+{row['completion_tokens']}",
              f"{row['cost_usd']:.6f}", f"{100 * row['cache_hit_rate']:.1f}", str(row["failures"]),
              _seconds(row["p50_latency_s"]), _seconds(row["p95_latency_s"]), str(row["rate_limited"])]
             for row in rows]
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines)]
    out = [f"since {since:%Y-%m-%d %H:%M} UTC"]
    out += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *lines]]
    if not rows:
        out.append("(no model calls recorded in this period)")
    return "\n".join(out)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def html_report(calls: list[Any], rows: list[dict[str, Any]], by: str, since: datetime) -> str:
    """One self-contained HTML file (plotly.js inlined): cost per day per workflow, tokens by model, the latency
    distribution, cache hit rate per workflow, and the table of `rows`."""
    import plotly.graph_objects as go

    figures = []
    cost: dict[str, dict[str, float]] = {}
    for call in calls:
        cost.setdefault(call.workflow, {}).setdefault(call.day, 0.0)
        cost[call.workflow][call.day] += call.cost_usd
    days = sorted({call.day for call in calls})
    figure = go.Figure([go.Bar(name=workflow, x=days, y=[per_day.get(day, 0.0) for day in days])
                        for workflow, per_day in sorted(cost.items())])
    figures.append(figure.update_layout(barmode="stack", title="Cost per day (USD), by workflow",
                                        xaxis_title="day (UTC)", xaxis_type="category", yaxis_title="USD"))
    by_model = {group.key["model"]: group for group in group_calls(calls, "model")}
    models = sorted(by_model)
    figure = go.Figure([go.Bar(name="prompt", x=models, y=[by_model[m].prompt_tokens for m in models]),
                        go.Bar(name="completion", x=models, y=[by_model[m].completion_tokens for m in models])])
    figures.append(figure.update_layout(barmode="stack", title="Tokens by model", yaxis_title="tokens"))
    latencies = [latency for call in calls for latency in call.latencies]
    figure = go.Figure([go.Histogram(x=latencies, nbinsx=40)])
    figures.append(figure.update_layout(title="Call latency distribution", xaxis_title="seconds",
                                        yaxis_title="calls"))
    by_workflow = group_calls(calls, "workflow")
    figure = go.Figure([go.Bar(x=[g.key["workflow"] for g in by_workflow],
                               y=[100 * g.as_dict()["cache_hit_rate"] for g in by_workflow])])
    figures.append(figure.update_layout(title="Cache hit rate by workflow (%)", yaxis_title="%",
                                        yaxis_range=[0, 100]))
    charts = [f.to_html(full_html=False, include_plotlyjs=(i == 0), default_height=380)
              for i, f in enumerate(figures)]
    keys = ["workflow", "task"] if by == "task" else [by]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in [*keys, *COLUMNS])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(row[c]))}</td>" for c in [*keys, *COLUMNS]) + "</tr>"
                   for row in rows)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>mp-pipelines usage since {since:%Y-%m-%d}</title>
<style>body{{font-family:sans-serif;margin:24px}} .grid{{display:grid;grid-template-columns:1fr 1fr;gap:12px}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}</style></head>
<body><h1>mp-pipelines usage since {since:%Y-%m-%d %H:%M} UTC</h1>
<div class="grid">{''.join(f'<div>{chart}</div>' for chart in charts)}</div>
<h2>By {html.escape(by)}</h2><table><tr>{head}</tr>{body}</table></body></html>
"""


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
