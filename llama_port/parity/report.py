"""The parity report drawn for people: rich tables on a console, and a per-layer divergence plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .compare import ParityReport, exceeds_threshold

MODE_LABELS = {
    "whole": "both whole models in memory",
    "stream": "streamed, one decoder layer at a time",
    "against": "checkpoint against checkpoint, both run by llama_port",
}


def print_report(report: ParityReport, console: Any, elapsed: float | None = None) -> None:
    """The report as rich tables: the headline figures, then one row per probe point (carried and
    local max |diff|), then the notes, the verdict and one line of seconds per phase."""
    from rich.table import Table

    against = report.mode == "against"
    title = "checkpoint A vs checkpoint B" if against else "llama_port vs transformers"
    summary = Table(title=title, show_header=False, title_justify="left")
    summary.add_column("measure", style="bold")
    summary.add_column("value", overflow="fold")
    summary.add_row("checkpoint" + (" A" if against else ""), report.checkpoint or "in-memory models")
    if against:
        summary.add_row("checkpoint B", report.against)
    streamed = " (streamed)" if against and report.streamed else ""
    summary.add_row("mode", MODE_LABELS.get(report.mode, report.mode) + streamed)
    summary.add_row("dtype / device / backend", f"{report.dtype} / {report.device} / {report.backend}")
    summary.add_row("positions compared", str(report.num_positions))
    summary.add_row("max |logit diff|", _fmt(report.max_abs_diff))
    summary.add_row("mean |logit diff|", _fmt(report.mean_abs_diff))
    if report.ours_error is not None:
        summary.add_row("ours vs fp32 reference", _fmt(report.ours_error))
        summary.add_row("reference vs fp32 reference", _fmt(report.reference_error))
    summary.add_row("top-1 agreement", f"{report.top1_agreement:.2%}")
    summary.add_row("top-5 agreement", f"{report.top5_agreement:.2%}")
    summary.add_row("max KL(reference || ours)", _fmt(report.kl_max))
    summary.add_row("first divergent layer", report.first_divergent_name or "none")
    if report.greedy_match is None:
        greedy = "skipped (streamed: --greedy-tokens N runs it)" if report.streamed else "not run"
    elif report.greedy_match:
        greedy = f"identical ({len(report.ours_tokens)} tokens)"
    else:
        greedy = f"differ from token {report.first_token_mismatch}"
    summary.add_row("greedy generation", greedy)
    if report.ratio is not None:
        summary.add_row("rule", f"ours vs fp32 <= {report.ratio:g} x reference vs fp32")
    if report.atol is not None:
        summary.add_row("rule", f"max |logit diff| <= {report.atol:.1e}")
    if report.kl_limit is not None:
        summary.add_row("rule", f"max KL <= {report.kl_limit:.1e}")
    if report.weights_sha256:
        summary.add_row("weights sha256", report.weights_sha256[:16] + "...")
    if elapsed is not None:
        summary.add_row("time", f"{elapsed:.1f}s")
    console.print(summary)

    layers = Table(
        title="per layer (hidden state after each; lm_head: logits; local: ours fed the reference's input)",
        title_justify="left",
    )
    layers.add_column("#", justify="right")
    layers.add_column("probe")
    layers.add_column("max |diff|", justify="right")
    layers.add_column("local max |diff|", justify="right")
    layers.add_column("mean |diff|", justify="right")
    layers.add_column("threshold", justify="right")
    for entry in report.per_layer:
        mark = " <- first divergent" if entry.name == report.first_divergent_name else ""
        local_over = entry.local_max_abs_diff is not None and not entry.local_max_abs_diff <= entry.threshold
        style = "red" if exceeds_threshold(entry) or local_over else None
        layers.add_row(
            "" if entry.layer is None else str(entry.layer),
            entry.name + mark,
            _fmt(entry.max_abs_diff),
            _fmt(entry.local_max_abs_diff),
            _fmt(entry.mean_abs_diff),
            _fmt(entry.threshold),
            style=style,
        )
    console.print(layers)
    for note in report.notes:
        console.print(f"note: {note}")
    if report.passed:
        agree = "the two checkpoints agree" if against else "llama_port reproduces transformers on this checkpoint"
        if report.quantize is not None:
            agree = f"llama_port {report.quantize} is within KL {report.kl_limit:g} of transformers' unquantized model"
        console.print(f"[bold green]PASS[/]: {agree}")
    else:
        for failure in report.failures:
            console.print(f"[bold red]FAIL[/]: {failure}")
    if report.timings:
        phases = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in report.timings.items())
        total = f" (total {elapsed:.1f}s)" if elapsed is not None else ""
        console.print(f"time per phase: {phases}{total}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3e}"


def write_plot(report: ParityReport, path: str | Path) -> None:
    """A PNG of per-layer max, local max and mean |diff| on a log scale, with the thresholds and
    the first divergent entry marked. Exact zeros are drawn at a floor below the smallest nonzero value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [e.name for e in report.per_layer]
    values = [e.max_abs_diff for e in report.per_layer] + [e.mean_abs_diff for e in report.per_layer]
    thresholds = [e.threshold for e in report.per_layer]
    positive = [v for v in values + thresholds if v > 0 and math.isfinite(v)]
    floor = min(positive) / 100 if positive else 1e-12  # below every drawn value and threshold
    x = list(range(len(names)))

    def clip(v: float) -> float:
        return v if v > 0 and math.isfinite(v) else floor

    fig, ax = plt.subplots(figsize=(max(8.0, 0.28 * len(names) + 3), 4.8), dpi=120)
    ax.plot(x, [clip(e.max_abs_diff) for e in report.per_layer], "o-", label="max |diff|")
    ax.plot(x, [clip(e.mean_abs_diff) for e in report.per_layer], "s--", ms=3, label="mean |diff|")
    if any(e.local_max_abs_diff is not None for e in report.per_layer):
        local = [clip(e.local_max_abs_diff if e.local_max_abs_diff is not None else math.nan) for e in report.per_layer]
        ax.plot(x, local, "^:", ms=4, label="local max |diff| (reference's input)")
    ax.plot(x, [clip(e.threshold) for e in report.per_layer], ":", color="gray", label="threshold")
    if report.first_divergent_name is not None:
        i = names.index(report.first_divergent_name)
        ax.axvline(i, color="red", alpha=0.5, label=f"first divergent: {report.first_divergent_name}")
    ax.set_yscale("log")
    ax.set_xticks(x, [n.replace("layers.", "") for n in names], rotation=90, fontsize=7)
    ax.set_xlabel("probe (embed_tokens, decoder layer index, final norm, lm_head logits)")
    ax.set_ylabel("|llama_port - transformers|")
    verdict = "PASS" if report.passed else "FAIL"
    ax.set_title(f"{verdict}  {report.dtype} / {report.backend} / {report.device}"
                 f"{'  (zeros drawn at %.0e)' % floor if any(v == 0 for v in values) else ''}", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
