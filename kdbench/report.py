"""The Markdown report: every table of a results folder with its figures, failed and n/a runs and transfer probes,
from the run JSON alone. ``report`` also re-exports the table model and the renderers it builds on."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from kdbench.errors import KdbenchError
from kdbench.render import render, render_csv, render_latex, render_md, render_rank_md, slugify
from kdbench.results import ResultStore
from kdbench.tables import (
    PAPER_NAMES,
    STUDENT,
    TEACHER,
    Cell,
    Collected,
    Paired,
    Table,
    available_metrics,
    bootstrap_ci,
    build_tables,
    check_metric,
    collect,
    direction,
    load_corr_diff,
    load_reference,
    load_transfer_reference,
)
from kdbench.transfer import build_transfer, collect_probes, render_transfer_md

__all__ = [
    "PAPER_NAMES",
    "STUDENT",
    "TEACHER",
    "Cell",
    "Collected",
    "Paired",
    "Table",
    "available_metrics",
    "bootstrap_ci",
    "build_tables",
    "check_metric",
    "collect",
    "direction",
    "load_corr_diff",
    "load_reference",
    "load_transfer_reference",
    "render",
    "render_csv",
    "render_latex",
    "render_md",
    "render_rank_md",
    "write_report",
]


def _probe_rows(root: Path) -> list[dict[str, Any]]:
    from kdbench.errors import KdbenchError
    from kdbench.guard import probe_record_ok, read_json

    out = []
    for path in sorted(ResultStore(root).probes_dir.glob("*.json")):
        try:
            obj = read_json(path, root)  # regular files inside the folder only, with a size cap
        except KdbenchError:
            continue
        if probe_record_ok(obj):
            out.append(obj)
    return out


def write_report(
    results: str | Path,
    out: str | Path,
    *,
    metric: str = "top1_last",
    reference: str | list[str] | None = None,
    vs: str | None = None,
) -> Path:
    """report.md and its PNG figures in `out`, from the run JSONs of `results` alone."""
    from kdbench import __version__, plots

    store = ResultStore(results)
    if not store.runs_dir.is_dir():
        raise KdbenchError(f"no runs in {store.root} (expected {store.runs_dir}); run `kdbench run` first")
    col = collect(store)
    if col.runs.empty:
        raise KdbenchError(f"no readable runs in {store.runs_dir}")
    present = set(col.runs["method"])
    if vs is None and "kd" in present and len(present - {"ce", "kd"}) > 0:
        vs = "kd"
    tables = build_tables(col, metric, reference=reference, vs=vs)
    acc_metric = metric if metric.startswith("top") else "top1_last"
    acc_tables = tables if acc_metric == metric else build_tables(col, acc_metric)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)

    runs = col.runs
    counts = Counter(runs["status"])
    lines = [
        "# kdbench report",
        "",
        (
            f"Results folder `{store.root}`: {len(runs)} runs ({counts.get('done', 0)} done, "
            f"{counts.get('failed', 0)} failed, {counts.get('n/a', 0)} n/a), read from the run JSON alone by "
            f"kdbench {__version__}."
        ),
        "",
        f"Tables show `{metric}`"
        + (f" beside the published numbers ({reference})" if reference else "")
        + (f", with paired differences against `{vs}`" if vs else "")
        + f"; figures show `{acc_metric}`. "
        "The correlation-difference maps compare a student's test-set logit correlations with its teacher's "
        "(CRD, Figure 3); a vanilla student is trained without a teacher and has none.",
    ]
    if col.problems:
        lines += ["", "Files skipped or worth a look:", ""] + [f"- {p}" for p in col.problems]
    if not tables:
        lines += [
            "",
            "No student run yet: the folder holds only the teachers' own training runs (their numbers become the "
            "Teacher row of the students' tables).",
        ]
    figures: list[Path] = []
    styles = plots.styles_for(list(runs["method"].unique()))
    for group, table in tables.items():
        acc = acc_tables[group]
        slug = slugify(group)
        lines += ["", f"## {group}", "", render_md(table, level=3)]
        if table.ranks:
            lines += ["", f"### {group} — rank per pair ({table.metric})", "", render_rank_md(table)]
        gain = plots.gain_heatmap(acc, out_dir / f"gain-{slug}.png")
        scatter = plots.accuracy_vs_alignment(col, group, acc_metric, out_dir / f"alignment-{slug}.png", styles)
        for title, path in (("Gain over the vanilla student", gain), ("Accuracy vs alignment", scatter)):
            if path is not None:
                figures.append(path)
                lines += ["", f"### {title}", "", f"![{title}]({path.name})"]
        for pair in table.pairs:
            pslug = f"{slug}-{slugify(pair)}"
            tc = acc.cell(TEACHER, pair)
            made = [
                ("Top-1 per method", plots.bar_chart(acc, pair, out_dir / f"top1-{pslug}.png", styles)),
                (
                    "Training curves",
                    plots.training_curves(
                        col,
                        group,
                        pair,
                        out_dir / f"curves-{pslug}.png",
                        tc.mean if tc is not None and tc.n else None,
                        styles,
                    ),
                ),
                ("Loss terms", plots.loss_terms(col, group, pair, out_dir / f"losses-{pslug}.png", styles)),
                (
                    "Correlation difference",
                    plots.corr_diff_heatmaps(col, group, pair, out_dir / f"corrdiff-{pslug}.png"),
                ),
                (
                    "Sensitivity to the settings of the methods with a grid",
                    plots.sensitivity(col, group, pair, out_dir / f"sensitivity-{pslug}.png", acc_metric),
                ),
            ]
            made = [(t, p) for t, p in made if p is not None]
            if made:
                lines += ["", f"### {pair}"]
                for title, path in made:
                    figures.append(path)
                    lines += ["", f"![{title}: {pair}]({path.name})"]
    bad = runs[runs["status"] != "done"]
    if not bad.empty:
        lines += [
            "",
            "## Failed and n/a runs",
            "",
            "| group | pair | method | seed | status | reason |",
            "|---|---|---|---:|---|---|",
        ]
        for _, r in bad.iterrows():
            reason = str(r["reason"] or "").replace("|", "\\|")
            lines.append(
                f"| {r['group']} | {r['teacher'] or '-'}:{r['student']} | {r['method']} | {r['seed']} | "
                f"{r['status']} | {reason} |"
            )
    probes, skipped = collect_probes(store)
    transfer = build_transfer(col, probes)
    if transfer:
        lines += ["", "## Transfer (linear probe on frozen students)", "", render_transfer_md(transfer)]
        lines += [f"- skipped: {s}" for s in skipped + [s for t in transfer for s in t.skipped]]
        for k, t in enumerate(transfer):
            path = plots.transfer_plot(t, out_dir / f"transfer-{k}.png", styles)
            if path is not None:
                figures.append(path)
                lines += ["", f"![Transfer: {t.title}]({path.name})"]
    probes = _probe_rows(store.root)
    if probes:
        lines += [
            "",
            "### Every probe",
            "",
            "| pair | method | seed | dataset | protocol | top-1 last | top-1 best | paper |",
            "|---|---|---:|---|---|---:|---:|---:|",
        ]
        for p in probes:
            paper = p.get("published")
            lines.append(
                f"| {p.get('pair', '')} | {p.get('method', '')} | {p.get('seed', '')} | "
                f"{p.get('dataset', {}).get('name', '')} | {p.get('protocol', {}).get('name', '')} | "
                f"{p['top1_last']:.2f} | {p.get('top1_best', float('nan')):.2f} | "
                f"{'' if paper is None else f'{paper:.1f}'} |"
            )
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
