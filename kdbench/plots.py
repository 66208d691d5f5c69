"""Figures of a results folder, from the run JSON alone (matplotlib, Agg backend, no pyplot state).

Every figure has a title and labelled axes, and uses seaborn's colour-blind-safe palette; a method keeps
the same colour (and, past nine methods, the same hatch or marker) in every figure of a report. Each
``*_figure`` function builds a Figure (or returns None when there is nothing to draw) and each plain-named
function saves it as a PNG whose ``Title`` text chunk holds the figure's title.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator

from kdbench.catalog import method_order
from kdbench.tables import STUDENT, TEACHER, Collected, Table, load_corr_diff

PALETTE = sns.color_palette("colorblind", 10)
GREY = PALETTE[7]  # the vanilla student
METHOD_COLOURS = [PALETTE[i] for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)]
# Past nine methods the same hues come back darker, then lighter, so no two of 27 methods share a colour; the
# hatch, marker and line style change with each round too, so the look stays distinct in greyscale as well.
SHADES = [
    METHOD_COLOURS,
    [sns.color_palette("dark", 10)[i] for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)],
    [sns.color_palette("pastel", 10)[i] for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)],
]
HATCHES = ["", "//", "..", "xx"]
LINESTYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
CORR_DIFF_PREFERRED = ["kd", "crd", "rrd", "crd+kd", "rrd+kd"]
CORR_DIFF_MAX = 4
DPI = 120
STYLE = {
    **sns.axes_style("whitegrid"),
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "figure.titlesize": 12,
    "legend.fontsize": 9,
}


Style = tuple[Any, str, str, str]  # (colour, hatch, marker, line style)


def styles_for(methods: list[str]) -> dict[str, Style]:
    """(colour, hatch, marker, line style) per method, in the built-in order: pass the methods of the whole report
    so a method keeps its look in every figure. Nine colours; past nine methods the hatch, marker and line style
    change too."""
    out: dict[str, Style] = {"ce": (GREY, "", "o", "-"), STUDENT: (GREY, "", "o", "-")}
    k = len(METHOD_COLOURS)
    for i, m in enumerate(m for m in method_order(list(dict.fromkeys(methods))) if m not in out):
        cycle = i // k
        out[m] = (
            SHADES[cycle % len(SHADES)][i % k],
            HATCHES[cycle % len(HATCHES)],
            MARKERS[cycle % len(MARKERS)],
            LINESTYLES[cycle % len(LINESTYLES)],
        )
    return out


def _suptitle(fig: Figure, text: str) -> None:
    """The figure's title, wrapped to lines of about the figure's width so that a narrow figure does not clip it."""
    import textwrap

    size = matplotlib.rcParams["figure.titlesize"]
    size = size if isinstance(size, (int, float)) else 12  # a named size ("large") counts as 12 points
    chars = max(20, int(fig.get_figwidth() * 72 / (0.56 * size)))
    fig.suptitle("\n".join(textwrap.wrap(text, chars)) if len(text) > chars else text)


def _legend_cols(n: int, rows: int) -> int:
    """Columns so that a legend of n entries has at most `rows` rows."""
    return max(1, math.ceil(n / max(rows, 1)))


def _style(styles: dict[str, Style] | None, method: str, fallback: list[str]) -> Style:
    styles = styles or styles_for(fallback)
    return styles.get(method) or styles_for([*fallback, method])[method]


def _label(row: str) -> str:
    return "vanilla student (ce)" if row in (STUDENT, "ce") else row


def _metric_label(metric: str) -> str:
    names = {
        "top1_last": "top-1, last epoch (%)",
        "top1_best": "top-1, best epoch (%)",
        "top5_last": "top-5, last epoch (%)",
        "top5_best": "top-5, best epoch (%)",
    }
    return names.get(metric, metric)


def _figure(width: float, height: float) -> Figure:
    with matplotlib.rc_context(STYLE):
        return Figure(figsize=(width, height), layout="constrained")


def save(fig: Figure | None, path: Path) -> Path | None:
    """Write a figure as PNG with its title as metadata; None when there was nothing to draw."""
    if fig is None:
        return None
    title = fig.get_suptitle() if hasattr(fig, "get_suptitle") else (fig._suptitle.get_text() if fig._suptitle else "")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context(STYLE):
        # bbox_inches="tight" grows the canvas around anything that would still stick out (a last guard: the
        # figures are laid out to fit, and tests check that nothing is clipped)
        fig.savefig(
            path,
            dpi=DPI,
            metadata={"Title": title.replace("\n", " "), "Software": "kdbench"},
            bbox_inches="tight",
            pad_inches=0.08,
        )
    return path


# ---------------------------------------------------------------------------------------------- per pair


def bar_figure(table: Table, pair: str, styles: dict[str, Style] | None = None) -> Figure | None:
    """Every method's mean (std over seeds as error bars), with the teacher and the vanilla student as lines."""
    rows = [r for r in table.rows if r != TEACHER and table.cell(r, pair) is not None]
    if not any(table.cell(r, pair).n for r in rows):
        return None
    with matplotlib.rc_context(STYLE):
        fig = _figure(max(5.5, 0.7 * len(rows) + 2.5), 4.6)
        ax = fig.add_subplot()
        x = np.arange(len(rows))
        tops, lows = [], []
        for i, row in enumerate(rows):
            c = table.cell(row, pair)
            colour, hatch, _, _ = _style(styles, row, table.rows)
            if not c.n:
                continue
            std = c.std if c.n > 1 and math.isfinite(c.std) else 0.0
            ax.bar(
                i,
                c.mean,
                width=0.7,
                color=colour,
                hatch=hatch,
                edgecolor="white" if not hatch else "black",
                linewidth=0.6,
                yerr=std if c.n > 1 else None,
                capsize=4,
                error_kw={"elinewidth": 1.2},
                label=f"_{row}",
            )
            tops.append(c.mean + std)
            lows.append(c.mean - std)
        teacher = table.cell(TEACHER, pair)
        student = table.cell(STUDENT, pair)
        if teacher is not None and teacher.n:
            ax.axhline(
                teacher.mean, color="black", ls="--", lw=1.3, label=f"teacher {pair.split(':')[0]} ({teacher.mean:.2f})"
            )
            tops.append(teacher.mean)
        if student is not None and student.n:
            ax.axhline(student.mean, color=GREY, ls=":", lw=1.6, label=f"vanilla student ({student.mean:.2f})")
        # Bars start at 0 in every chart (a bar's length is its value; the gain heatmap shows the differences),
        # so the charts of all pairs read the same way; a negative metric extends the axis below 0.
        lo, hi = min(lows + [0.0]), max(tops)
        pad = 0.04 * (hi - lo) or 1.0
        bottom = 0.0 if lo >= 0 else lo - pad
        ax.set_ylim(bottom, hi + 4 * pad)
        for i, row in enumerate(rows):
            c = table.cell(row, pair)
            if c.n:
                top = c.mean + (c.std if c.n > 1 and math.isfinite(c.std) else 0.0)
                ax.annotate(
                    f"{c.mean:.{table.digits}f}",
                    (i, top),
                    xytext=(0, 3),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    rotation=90 if len(rows) > 10 else 0,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
                )
            else:
                ax.text(
                    i,
                    bottom + 0.02 * (hi + 2 * pad - bottom),
                    c.status if c.status != "missing" else "-",
                    ha="center",
                    va="bottom",
                    fontsize=9,
                    rotation=90,
                    color="dimgray",
                )
        common = table.common_n()
        names = []
        for r in rows:
            c = table.cell(r, pair)
            extra = [f"n={c.n}"] if c.n and c.n != common else []
            extra += [f"{c.failed} failed"] if c.failed and c.n else []
            names.append(("student (ce)" if r == STUDENT else r) + (f"\n({', '.join(extra)})" if extra else ""))
        ax.set_xticks(x, names, rotation=40, ha="right")
        ax.set_xlabel("method")
        ax.set_ylabel(_metric_label(table.metric))
        ax.set_title(_error_bar_note(common, [table.cell(r, pair).n for r in rows]), fontsize=9)
        handles, _ = ax.get_legend_handles_labels()
        hatched = [r for r in rows if _style(styles, r, table.rows)[1]]
        if hatched:  # past nine methods colours come back with a hatch: every hatched bar gets a legend entry
            from matplotlib.patches import Patch

            handles += [
                Patch(
                    facecolor=_style(styles, r, table.rows)[0],
                    hatch=_style(styles, r, table.rows)[1],
                    edgecolor="black",
                    linewidth=0.6,
                    label=r,
                )
                for r in hatched
            ]
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), frameon=False)
        _suptitle(fig, f"{pair} — {table.metric} per method ({table.group})")
    return fig


def _error_bar_note(common: int | None, ns: list[int]) -> str:
    """What the error bars of a bar chart are, where the bars may rest on different numbers of seeds."""
    mixed = len({k for k in ns if k}) > 1
    if not mixed:
        return f"error bars: std over {common} seeds" if common and common > 1 else "one seed per method"
    if common and common > 1:
        return f"error bars: std over {common} seeds, or over n where a label says n=k"
    return "one seed per method unless a label says n=k (error bars: std over those seeds)"


def bar_chart(table: Table, pair: str, path: Path, styles: dict[str, Style] | None = None) -> Path | None:
    return save(bar_figure(table, pair, styles), path)


def _runs(col: Collected, group: str, pair: str) -> pd.DataFrame:
    """Finished runs of a pair, the vanilla student's (method ce, keyed by the student only) included."""
    t, s = pair.split(":")
    r = col.runs
    sel = (
        (r["group"] == group)
        & (r["student"] == s)
        & (((r["teacher"] == t) & (r["method"] != "ce")) | (r["method"] == "ce"))
    )
    return r[sel & (r["status"] == "done")]


def _series(curves: list[dict[str, Any]], x_key: str, y_get) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Mean and std over seeds of one curve, aligned on its x values."""
    frames = []
    for i, c in enumerate(curves):
        xs, ys = c.get(x_key) or [], y_get(c) or []
        k = min(len(xs), len(ys))
        if k:
            frames.append(pd.Series([np.nan if v is None else float(v) for v in ys[:k]], index=xs[:k], name=i))
    if not frames:
        return None
    df = pd.concat(frames, axis=1).sort_index()
    return df.index.to_numpy(dtype=float), df.mean(axis=1).to_numpy(), df.std(axis=1, ddof=1).to_numpy()


def _method_curves(col: Collected, runs: pd.DataFrame) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for m in method_order(list(runs["method"].unique())):
        curves = [col.curves[rid] for rid in runs[runs["method"] == m]["run_id"] if rid in col.curves]
        if curves:
            out[m] = curves
    return out


def _epoch_axis(ax: Any) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")


def _mantissa(v: float) -> int:
    return round(v / 10 ** math.floor(math.log10(v))) if v > 0 else 0


def _log_axis(ax: Any) -> None:
    """Log scale with plain numbers (0.5, 2, 100) rather than 5 x 10^-1."""
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if _mantissa(v) in (2, 5) else ""))


def curves_figure(
    col: Collected, group: str, pair: str, teacher_top1: float | None = None, styles: dict[str, Style] | None = None
) -> Figure | None:
    """Test top-1 and total training loss per epoch, one line per method (mean over seeds; with five methods or
    fewer a band shows ±1 std over seeds). Past 20 epochs a middle panel zooms on the last quarter of training,
    where the methods separate."""
    by_method = _method_curves(col, _runs(col, group, pair))
    if not by_method:
        return None
    bands = len(by_method) <= 5 and any(len(c) > 1 for c in by_method.values())
    counts = [len(c) for c in by_method.values()]
    common = max(set(counts), key=counts.count)  # the usual number of seeds: said once, in the title
    series = {
        m: (
            _series(curves, "eval_epoch", lambda c: c.get("test_top1")),
            _series(curves, "epoch", lambda c: (c.get("loss") or {}).get("total")),
        )
        for m, curves in by_method.items()
    }
    last = max((float(a[0][-1]) for a, _ in series.values() if a is not None and len(a[0])), default=0.0)
    zoom_from = math.floor(0.75 * last) if last > 20 else None
    with matplotlib.rc_context(STYLE):
        fig = _figure(15.0 if zoom_from is not None else 11.0, 4.8)
        axes = list(fig.subplots(1, 3 if zoom_from is not None else 2))
        ax_acc, ax_loss = axes[0], axes[-1]
        ax_zoom = axes[1] if zoom_from is not None else None
        handles = []
        positive = True
        span: list[float] = []
        zoom_values: list[float] = []
        for m, curves in by_method.items():
            colour, _, marker, ls = _style(styles, m, list(by_method))
            acc, loss = series[m]
            few = acc is not None and len(acc[0]) <= 12
            panels = [(ax_acc, acc), (ax_loss, loss)] + ([(ax_zoom, acc)] if ax_zoom is not None else [])
            for ax, s in panels:
                if s is None:
                    continue
                x, mean, std = s
                if ax is ax_zoom:
                    keep = x >= zoom_from
                    x, mean, std = x[keep], mean[keep], std[keep]
                    zoom_values += [v for v in mean if np.isfinite(v)]
                ax.plot(x, mean, color=colour, ls=ls, lw=1.5, marker=marker if few else None, ms=4)
                if bands and len(curves) > 1 and np.isfinite(std).any():
                    ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.12, lw=0)
            if loss is not None:
                positive &= bool(np.nanmin(loss[1]) > 0)
                span += [float(np.nanmin(loss[1])), float(np.nanmax(loss[1]))]
            handles.append(
                Line2D(
                    [],
                    [],
                    color=colour,
                    ls=ls,
                    marker=marker if few else None,
                    lw=1.5,
                    label=_label(m) + (f" (n={len(curves)})" if len(curves) != common else ""),
                )
            )
        if teacher_top1 is not None:
            for ax in (ax_acc, ax_zoom):
                if ax is not None:
                    ax.axhline(teacher_top1, color="black", ls="--", lw=1.2)
            handles.append(Line2D([], [], color="black", ls="--", label=f"teacher ({teacher_top1:.2f})"))
        ax_acc.set_title("test top-1 per evaluated epoch")
        _epoch_axis(ax_acc)
        ax_acc.set_ylabel("test top-1 (%)")
        if ax_zoom is not None:
            ax_zoom.set_title(f"the same, from epoch {zoom_from}")
            _epoch_axis(ax_zoom)
            ax_zoom.set_ylabel("test top-1 (%)")
            if zoom_values:
                lo, hi = min(zoom_values), max(zoom_values + ([teacher_top1] if teacher_top1 is not None else []))
                pad = max(0.05 * (hi - lo), 0.2)
                ax_zoom.set_ylim(lo - pad, hi + pad)
        positive &= bool(span) and max(span) > 3 * min(span)  # a log scale only when the losses span a lot
        if positive:
            _log_axis(ax_loss)
        ax_loss.set_title("total training loss (mean over the epoch)")
        _epoch_axis(ax_loss)
        ax_loss.set_ylabel("loss" + (" (log scale)" if positive else ""))
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), frameon=False)
        band = "; band: ±1 std over seeds" if bands else ""
        seeds = f"mean over {common} seeds" if common > 1 else "one seed"
        _suptitle(
            fig,
            f"{pair} — training curves ({group}; {seeds} per method unless marked n=…{band})"
            if len(set(counts)) > 1
            else f"{pair} — training curves ({group}; {seeds}{band})",
        )
    return fig


def training_curves(
    col: Collected,
    group: str,
    pair: str,
    path: Path,
    teacher_top1: float | None = None,
    styles: dict[str, Style] | None = None,
) -> Path | None:
    return save(curves_figure(col, group, pair, teacher_top1, styles), path)


def losses_figure(col: Collected, group: str, pair: str, styles: dict[str, Style] | None = None) -> Figure | None:
    """Small multiples: every loss term of every method per epoch (mean over seeds). A term named after a method
    (kd, crd, ...) takes that method's colour; ce is grey and the total a dashed black line."""
    by_method = _method_curves(col, _runs(col, group, pair))
    by_method = {m: c for m, c in by_method.items() if any((x.get("loss") or {}) for x in c)}
    if not by_method:
        return None
    terms = sorted({t for cs in by_method.values() for c in cs for t in (c.get("loss") or {}) if t != "total"})
    known = styles or styles_for(list(by_method) + terms)
    spare = iter(PALETTE[i] for i in (9, 8, 6, 5, 4) * 4)
    term_colour = {t: known[t][0] if t in known else next(spare) for t in terms}
    ncols = min(4, len(by_method))
    nrows = math.ceil(len(by_method) / ncols)
    with matplotlib.rc_context(STYLE):
        fig = _figure(3.4 * ncols + 1.6, 2.8 * nrows + 0.6)
        axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
        for ax, (m, curves) in zip(axes, by_method.items()):
            names = sorted({t for c in curves for t in (c.get("loss") or {})}, key=lambda t: (t == "total", t))
            positive = True
            span: list[float] = []
            for t in names:
                s = _series(curves, "epoch", lambda c, t=t: (c.get("loss") or {}).get(t))
                if s is None:
                    continue
                x, mean, _ = s
                positive &= bool(np.nanmin(mean) > 0)
                span += [float(np.nanmin(mean)), float(np.nanmax(mean))]
                style = (
                    {"color": "black", "ls": "--", "lw": 1.2} if t == "total" else {"color": term_colour[t], "lw": 1.6}
                )
                ax.plot(x, mean, label=t, marker="o" if len(x) <= 12 else None, ms=3, **style)
            positive &= bool(span) and max(span) > 3 * min(span)
            if positive:
                _log_axis(ax)
            ax.set_title(_label(m))
            _epoch_axis(ax)
            ax.set_ylabel("loss term" + (" (log)" if positive else ""))
            ax.legend(fontsize=7, loc="best")
        for ax in axes[len(by_method) :]:
            ax.set_visible(False)
        _suptitle(fig, f"{pair} — loss terms per epoch ({group}; weighted as optimised, mean over seeds)")
    return fig


def loss_terms(
    col: Collected, group: str, pair: str, path: Path, styles: dict[str, Style] | None = None
) -> Path | None:
    return save(losses_figure(col, group, pair, styles), path)


def corr_diff_figure(col: Collected, group: str, pair: str, methods: list[str] | None = None) -> Figure | None:
    """|corr(teacher logits) - corr(student logits)| per method (CRD, Figure 3), averaged over seeds."""
    runs = _runs(col, group, pair)
    runs = runs[runs["method"] != "ce"]
    present = method_order(list(runs["method"].unique()))
    if methods is None:
        methods = [m for m in CORR_DIFF_PREFERRED if m in present]
        methods += [m for m in present if m not in methods]
    mats: dict[str, np.ndarray] = {}
    for m in methods:
        got = [a for rid in runs[runs["method"] == m]["run_id"] if (a := load_corr_diff(col, rid)) is not None]
        shapes = {a.shape for a in got}
        if got and len(shapes) == 1:
            mats[m] = np.mean(got, axis=0)
        if len(mats) == CORR_DIFF_MAX:
            break
    if not mats:
        return None
    vmax = max(float(np.percentile(a, 99.5)) for a in mats.values()) or 1.0
    k = len(mats)
    with matplotlib.rc_context(STYLE):
        fig = _figure(3.3 * k + 1.2, 3.6)
        axes = np.atleast_1d(fig.subplots(1, k, squeeze=False)).ravel()
        for i, (ax, (m, a)) in enumerate(zip(axes, mats.items())):
            sns.heatmap(
                a,
                ax=ax,
                vmin=0.0,
                vmax=vmax,
                cmap="mako_r",
                square=True,
                cbar=i == k - 1,
                xticklabels=False,
                yticklabels=False,
                cbar_kws={"label": "|corr_T - corr_S|", "shrink": 0.85} if i == k - 1 else None,
            )
            n = int((runs["method"] == m).sum())
            ax.set_title(f"{m}: mean {a.mean():.3f}" + (f" (n={n})" if n > 1 else ""))
            ax.set_xlabel("class")
            ax.set_ylabel("class")
        _suptitle(fig, f"{pair} — teacher/student logit-correlation difference ({group}; darker = larger)")
    return fig


def corr_diff_heatmaps(
    col: Collected, group: str, pair: str, path: Path, methods: list[str] | None = None
) -> Path | None:
    return save(corr_diff_figure(col, group, pair, methods), path)


# ---------------------------------------------------------------------------------------------- per group


def gain_figure(table: Table) -> Figure | None:
    """Methods x pairs heatmap of the gain of each method over the vanilla student (difference of the means)."""
    methods = [r for r in table.rows if r not in (TEACHER, STUDENT)]
    pairs = [p for p in table.pairs if (c := table.cell(STUDENT, p)) is not None and c.n]
    if not methods or not pairs:
        return None
    gain = np.full((len(methods), len(pairs)), np.nan)
    status = {}
    for i, m in enumerate(methods):
        for j, p in enumerate(pairs):
            c = table.cell(m, p)
            if c is not None and c.n:
                gain[i, j] = c.mean - table.cell(STUDENT, p).mean
            elif c is not None:
                status[(i, j)] = c.status if c.status != "missing" else "-"
    if np.isnan(gain).all():
        return None
    lim = float(np.nanmax(np.abs(gain))) or 1.0
    with matplotlib.rc_context(STYLE):
        fig = _figure(max(5.5, 0.95 * len(pairs) + 3.0), max(3.0, 0.42 * len(methods) + 1.8))
        ax = fig.add_subplot()
        sns.heatmap(
            pd.DataFrame(gain, index=methods, columns=pairs),
            ax=ax,
            cmap="vlag",
            center=0.0,
            vmin=-lim,
            vmax=lim,
            annot=True,
            fmt="+.2f",
            linewidths=0.5,
            linecolor="white",
            cbar_kws={"label": f"{table.metric}: method - student"},
            annot_kws={"fontsize": 8},
        )
        ax.grid(False)
        for (i, j), text in status.items():
            ax.text(j + 0.5, i + 0.5, text, ha="center", va="center", fontsize=8, color="dimgray")
        ax.set_xlabel("pair (teacher:student)")
        ax.set_ylabel("method")
        ax.tick_params(axis="x", rotation=30)
        for lab in ax.get_xticklabels():
            lab.set_ha("right")
        ax.tick_params(axis="y", rotation=0)
        _suptitle(fig, f"Gain over the vanilla student — {table.metric} ({table.group})")
    return fig


def gain_heatmap(table: Table, path: Path) -> Path | None:
    return save(gain_figure(table), path)


ALIGNMENT = (
    ("cka", "linear CKA with the teacher (pooled features)"),
    ("agreement", "top-1 agreement with the teacher (%)"),
)


def alignment_figure(
    col: Collected, group: str, metric: str = "top1_last", styles: dict[str, Style] | None = None
) -> Figure | None:
    """Accuracy against teacher-student alignment, one small point per finished run and a large one per method
    (its mean). With several pairs the accuracy is taken relative to the pair's vanilla student (the mean of its
    ce runs), so that pairs of different difficulty share one axis. Colour and marker tell the method, as in every
    figure of the report."""
    runs = col.runs[(col.runs["group"] == group) & (col.runs["status"] == "done")]
    r = runs[runs["method"] != "ce"].copy()
    if metric not in r:
        return None
    panels = [(k, lab) for k, lab in ALIGNMENT if k in r and r[[k, metric]].notna().all(axis=1).any()]
    if not panels:
        return None
    r["pair"] = r["teacher"] + ":" + r["student"]
    pairs = list(dict.fromkeys(r["pair"]))
    ylabel = _metric_label(metric)
    r["y"] = r[metric]
    if len(pairs) > 1:
        ce = runs[runs["method"] == "ce"].groupby("student")[metric].mean()
        if all(p.split(":")[1] in ce.index for p in pairs):
            r["y"] = r[metric] - r["student"].map(ce)
            ylabel = f"{metric} - vanilla student of the pair (points)"
    methods = method_order(list(r["method"].unique()))
    # A marker always means the method (as in every other figure); pairs are not told apart here (their
    # accuracy is relative to their own vanilla student when there are several).
    rows = 14
    with matplotlib.rc_context(STYLE):
        ncols = _legend_cols(len(methods) + 1, rows)
        fig = _figure(5.0 * len(panels) + 1.3 + 1.1 * ncols, 4.6)
        axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)).ravel()
        for ax, (key, xlabel) in zip(axes, panels):
            for m in methods:
                sub = r[r["method"] == m].dropna(subset=[key, "y"])
                if sub.empty:
                    continue
                colour, _, marker, _ = _style(styles, m, methods)
                ax.scatter(
                    sub[key],
                    sub["y"],
                    color=colour,
                    marker=marker,
                    s=30,
                    edgecolor="black",
                    linewidth=0.3,
                    alpha=0.55,
                    zorder=2,
                )
                ax.scatter(
                    [sub[key].mean()],
                    [sub["y"].mean()],
                    color=colour,
                    s=150,
                    edgecolor="black",
                    marker=marker,
                    linewidth=1.6,
                    zorder=3,
                )
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{metric} vs {key}" + (f" ({len(pairs)} pairs)" if len(pairs) > 1 else ""))
        handles = [
            Line2D(
                [],
                [],
                ls="",
                marker=_style(styles, m, methods)[2],
                color=_style(styles, m, methods)[0],
                markeredgecolor="black",
                label=m,
            )
            for m in methods
        ]
        handles.append(
            Line2D(
                [],
                [],
                ls="",
                marker="o",
                color="white",
                markeredgecolor="black",
                markersize=11,
                markeredgewidth=1.6,
                label="mean of a method",
            )
        )
        # Beside the last panel, below the title (a figure legend at the upper right shares the title's height).
        axes[-1].legend(
            handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, title="method", ncols=ncols
        )
        _suptitle(fig, f"Accuracy vs alignment with the teacher — small: one run, large: a method's mean ({group})")
    return fig


def accuracy_vs_alignment(
    col: Collected, group: str, metric: str, path: Path, styles: dict[str, Style] | None = None
) -> Path | None:
    return save(alignment_figure(col, group, metric, styles), path)


# ---------------------------------------------------------------------------------------------- grids and transfer


def _grid_panels(
    col: Collected, runs: pd.DataFrame, metric: str, pair: str
) -> list[tuple[str, str, pd.DataFrame, Any]]:
    """(method, key, points, default value) for every method of `runs` with runs at more than one numeric value of
    a setting: a point is a run whose setting differs from the default in that key alone (the default's runs
    included, at the default value)."""
    from kdbench.variants import method_defaults

    r = runs[runs[metric].notna()] if metric in runs else runs.iloc[0:0]
    out = []
    for base in method_order(list(r["base_method"].unique())):
        if base == "ce":
            continue
        mine = r[r["base_method"] == base]
        diffs = {rid: col.settings.get(rid, {}) for rid in mine["run_id"]}
        keys = sorted({k for d in diffs.values() for k in d})
        default = method_defaults([base], pair)[base] or {}
        for key in keys:
            dv = default.get(key)
            pts = []
            for rid, d in diffs.items():
                if set(d) - {key}:
                    continue
                value = d.get(key, dv)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    pts.append((float(value), rid))
            frame = pd.DataFrame(pts, columns=["value", "run_id"]).merge(mine, on="run_id")
            if frame["value"].nunique() > 1:
                out.append((base, key, frame, dv))
    return out


def _seed_counts(frame: pd.DataFrame) -> str:
    """How many seeds each point of a sensitivity panel rests on: '2 seeds', or '2 seeds; 5 at 4' where a value
    (typically the default, with the benchmark's own runs) has more or fewer."""
    per_value = frame.groupby("value")["seed"].nunique()
    usual = int(per_value.mode().max())  # the most common count; of tied counts, the largest
    text = f"{usual} seed{'s' if usual != 1 else ''}"
    others = [f"{int(k)} at {v:g}" for v, k in per_value.items() if k != usual]
    return "; ".join([text, *others])


def sensitivity_figure(col: Collected, group: str, pair: str, metric: str = "top1_last") -> Figure | None:
    """Top-1 against the value of a method's setting, one panel per (method, setting) with a grid: every seed a
    small point, the mean over seeds a line, the method's default setting marked; a log axis where the values span
    a factor of 4 or more. The vanilla student's mean is the grey band's centre (± its std over seeds)."""
    runs = _runs(col, group, pair)
    panels = _grid_panels(col, runs, metric, pair)
    if not panels:
        return None
    ce = runs[runs["method"] == "ce"][metric].dropna() if metric in runs else pd.Series(dtype=float)
    with matplotlib.rc_context(STYLE):
        n = len(panels)
        cols = min(n, 3)
        rows = math.ceil(n / cols)
        fig = _figure(4.3 * cols, 3.6 * rows)
        axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
        for ax, (base, key, frame, dv) in zip(axes, panels):
            colour = _style(None, base, [base])[0]
            ax.scatter(frame["value"], frame[metric], color=colour, s=22, alpha=0.6, edgecolor="black", lw=0.3)
            means = frame.groupby("value")[metric].mean().sort_index()
            ax.plot(means.index, means.to_numpy(), color=colour, marker="o", lw=1.6, label="mean over seeds")
            if isinstance(dv, (int, float)) and not isinstance(dv, bool) and float(dv) in means.index:
                ax.scatter(
                    [float(dv)],
                    [means[float(dv)]],
                    s=140,
                    facecolor="none",
                    edgecolor="black",
                    lw=1.4,
                    zorder=3,
                    label=f"default ({dv:g})",
                )
            if len(ce):
                m, s = float(ce.mean()), float(ce.std(ddof=1)) if len(ce) > 1 else 0.0
                ax.axhspan(m - s, m + s, color=GREY, alpha=0.25, lw=0)
                ax.axhline(m, color=GREY, lw=1.0, ls="--", label="vanilla student (± std)")
            lo, hi = float(means.index.min()), float(means.index.max())
            if lo > 0 and hi / lo >= 4:
                ax.set_xscale("log")
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
                ax.set_xticks(list(means.index))
            ax.set_title(f"{base}: {key} ({_seed_counts(frame)})")
            ax.set_xlabel(key + (" (log scale)" if ax.get_xscale() == "log" else ""))
            ax.set_ylabel(_metric_label(metric))
            ax.legend(loc="best", frameon=False, fontsize=8)
        for ax in axes[n:]:
            ax.set_visible(False)
        _suptitle(fig, f"Sensitivity to a method's setting: {pair} ({group}) — small points: one run each")
    return fig


def sensitivity(col: Collected, group: str, pair: str, path: Path, metric: str = "top1_last") -> Path | None:
    return save(sensitivity_figure(col, group, pair, metric), path)


def transfer_figure(table: Any, styles: dict[str, Style] | None = None) -> Figure | None:
    """Probe top-1 on the other data against top-1 on the run's own data, one point per row of a transfer table
    (kdbench.transfer.TransferTable), error bars the std over seeds where there are several."""
    rows = [r for r in table.rows if r.source.n and r.target.n]
    if len(rows) < 2:
        return None
    names = [r.row for r in rows]
    with matplotlib.rc_context(STYLE):
        ncols = _legend_cols(len(rows), 16)
        fig = _figure(6.0 + 1.2 * ncols, 5.0)
        ax = fig.subplots()
        for r in rows:
            key = "ce" if r.row == STUDENT else r.row
            colour, _, marker, _ = (
                ("black", "", "*", "-") if r.row == TEACHER else _style(styles, key, [n for n in names if n != TEACHER])
            )
            ax.errorbar(
                r.source.mean,
                r.target.mean,
                xerr=r.source.std if r.source.n > 1 else None,
                yerr=r.target.std if r.target.n > 1 else None,
                fmt=marker,
                color=colour,
                markeredgecolor="black",
                markersize=12 if r.row == TEACHER else 8,
                capsize=2,
                label=f"{_label(r.row) if r.row != TEACHER else 'teacher'} ({r.pair})"
                if len({x.pair for x in rows}) > 1
                else (_label(r.row) if r.row != TEACHER else "teacher"),
            )
        ax.set_xlabel("top-1 on the run's own data, last epoch (%)")
        ax.set_ylabel("linear-probe top-1 on the probe data (%)")
        # The legend beside the axes, below the title (a figure legend at the upper right would share the title's
        # height, and the long title runs into it).
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, ncols=ncols, title="method")
        _suptitle(fig, f"Transfer: {table.title}")
    return fig


def transfer_plot(table: Any, path: Path, styles: dict[str, Style] | None = None) -> Path | None:
    return save(transfer_figure(table, styles), path)
