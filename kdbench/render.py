"""Tables as text: Markdown, LaTeX and CSV (``render``), with ranks, published numbers and paired differences."""

from __future__ import annotations

import csv
import io
import math
import re

from kdbench.tables import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    PAPER_NAMES,
    SETTING_MARKS,
    STUDENT,
    TEACHER,
    Paired,
    Table,
)


def _latex_escape(text: str) -> str:
    out = []
    for ch in text:
        out.append(
            {
                "\\": r"\textbackslash{}",
                "_": r"\_",
                "%": r"\%",
                "&": r"\&",
                "#": r"\#",
                "$": r"\$",
                "{": r"\{",
                "}": r"\}",
                "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}",
                "±": r"$\pm$",
                "Δ": r"$\Delta$",
                "→": r"$\rightarrow$",
            }.get(ch, ch)
        )
    return "".join(out)


def _published(table: Table, row: str, pair: str) -> str:
    ref = table.reference or {}
    if (row, pair) not in ref:
        return ""
    value = ref[(row, pair)]
    return "n/a" if value is None else _num(value, table.digits)


def _num(x: float, digits: int) -> str:
    return f"{x:.{digits}f}"


def _signed(x: float, digits: int) -> str:
    return f"{x:+.{digits}f}"


def _marks(table: Table, pair: str) -> tuple[float | None, float | None]:
    """The best and second-best distinct means of a pair (Teacher excluded)."""
    if table.direction == 0:
        return None, None
    means = sorted(
        {round(c.mean, 9) for r in table.rows if r != TEACHER and (c := table.cell(r, pair)) is not None and c.n},
        reverse=table.direction > 0,
    )
    return (means[0] if means else None), (means[1] if len(means) > 1 else None)


def _cell_text(table: Table, row: str, pair: str, fmt: str, marks: tuple[float | None, float | None]) -> str:
    c = table.cell(row, pair)
    if c is None:
        return ""
    if not c.n:
        return {"missing": "-"}.get(c.status, c.status)
    d = table.digits
    text = _num(c.mean, d) + (f" ± {_num(c.std, d)}" if c.n > 1 else "")
    if c.n != table.common_n() and row != TEACHER:
        text += f" (n={c.n})"
    if c.failed:
        text += f" ({c.failed} failed)"
    if fmt == "latex":
        text = _latex_escape(text)
    if row != TEACHER:
        key = round(c.mean, 9)
        if key == marks[0]:
            text = f"**{text}**" if fmt == "md" else f"\\textbf{{{text}}}"
        elif key == marks[1]:
            text = f"*{text}*" if fmt == "md" else f"\\underline{{{text}}}"
    setting = "".join(_setting_mark(k, fmt) for k in table.setting_marks.get((row, pair), []))
    return f"{text} {setting}" if setting else text


_LATEX_MARKS = {"†": "\\dag", "‡": "\\ddag", "≠": "$\\neq$", "?": "?"}


def _setting_mark(kind: str, fmt: str) -> str:
    sym = SETTING_MARKS[kind][0]
    return _LATEX_MARKS[sym] if fmt == "latex" else sym


def _setting_caption(table: Table, fmt: str) -> str:
    """What the marks present in the table mean ("" when there is none)."""
    used = [k for k in SETTING_MARKS if any(k in v for v in table.setting_marks.values())]
    words = (lambda t: _latex_escape(t)) if fmt == "latex" else (lambda t: t)
    return "; ".join(f"{_setting_mark(k, fmt)}: {words(SETTING_MARKS[k][1])}" for k in used)


def _paired_text(table: Table, pr: Paired | None, fmt: str) -> str:
    if pr is None:
        return ""
    if pr.status != "done":
        return pr.status
    d = table.digits
    text = _signed(pr.mean, d) if pr.mean is not None else ""
    if pr.lo is not None and pr.hi is not None:
        text += f" [{_signed(pr.lo, d)}, {_signed(pr.hi, d)}]"
    if pr.n != table.paired_n():
        text += f" (n={pr.n})"
    significant = pr.lo is not None and pr.hi is not None and (pr.lo > 0 or pr.hi < 0)
    if fmt == "latex":
        text = _latex_escape(text)
        return f"\\textbf{{{text}}}" if significant else text
    return f"**{text}**" if significant else text


def _caption(table: Table, fmt: str) -> str:
    n = table.common_n()
    pm = "$\\pm$" if fmt == "latex" else "±"
    if n is None:
        seeds = "no finished runs"
    elif n == 1:
        seeds = "one seed per cell"
    else:
        seeds = f"mean {pm} sample std over {n} seeds"
    parts = [seeds]
    if any(c.n and c.n != n for (r, _), c in table.cells.items() if r != TEACHER):
        parts.append("(n=k): a cell with another seed count")
    if table.direction:
        bold, second = ("bold", "underlined") if fmt == "latex" else ("**bold**", "*italic*")
        better = "higher" if table.direction > 0 else "lower"
        parts.append(
            f"{bold}: best, {second}: second best per pair ({better} is better); avg rank: mean of the "
            "per-pair ranks of the rows below the teacher"
        )
    if table.reference is not None:
        delta = "$\\Delta$" if fmt == "latex" else "Δ"
        parts.append(f"paper: published last-epoch top-1 ({', '.join(table.reference_names)}); {delta} = ours - paper")
    if table.setting_marks:
        marks = _setting_caption(table, fmt)
        parts.append(marks)
    return "; ".join(parts) + "."


def _paired_caption(table: Table, fmt: str) -> str:
    n = table.paired_n()
    seeds = f"the {n} seeds both have" if n and n > 1 else "the seeds both have"
    one = "; n=1: no interval" if any(p.n == 1 for p in table.paired.values()) else ""
    metric, vs, bold = table.metric, table.vs or "", "**bold**"
    if fmt == "latex":
        metric, vs, bold = _latex_escape(metric), _latex_row_name(vs), "bold"
    pct = "95\\%" if fmt == "latex" else "95%"
    few = "; with 3 seeds or fewer this interval is the range of the differences" if n is not None and n <= 3 else ""
    return (
        f"{metric}: mean paired difference (method - {vs}) over {seeds}, with a {pct} percentile "
        f"bootstrap interval ({BOOTSTRAP_RESAMPLES:,} resamples, seed {BOOTSTRAP_SEED}){one}{few}; "
        f"{bold}: the interval excludes 0."
    )


def slugify(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def render_md(table: Table, level: int = 3) -> str:
    ref = table.reference is not None
    ranked = bool(table.avg_rank)
    head = ["method"]
    for p in table.pairs:
        head += [p, "paper", "Δ"] if ref else [p]
    head += (["avg rank"] if ranked else []) + (["mean Δ"] if ref else [])
    lines = [
        f"{'#' * level} {table.group} — {table.metric}",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
    ]
    d = table.digits
    for row in table.rows:
        cells = [row]
        for p in table.pairs:
            cells.append(_cell_text(table, row, p, "md", _marks(table, p)))
            if ref:
                diff = table.diff(row, p)
                cells += [_published(table, row, p), _signed(diff, d) if diff is not None else ""]
        if ranked:
            cells.append(f"{table.avg_rank[row]:.2f}" if row in table.avg_rank else "")
        if ref:
            md = table.mean_diff(row)
            cells.append(_signed(md, d) if md is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", _caption(table, "md")]
    lines += [f"Note: {n}." for n in table.notes]
    if table.vs is not None and table.paired:
        lines += [
            "",
            f"{'#' * (level + 1)} {table.group} — {table.metric} vs {table.vs}",
            "",
            "| method | " + " | ".join(table.pairs) + " |",
            "|---|" + "---:|" * len(table.pairs),
        ]
        for row in table.rows:
            if not any((row, p) in table.paired for p in table.pairs):
                continue
            lines.append(
                f"| {row} | "
                + " | ".join(_paired_text(table, table.paired.get((row, p)), "md") for p in table.pairs)
                + " |"
            )
        lines += ["", _paired_caption(table, "md")]
    return "\n".join(lines)


def render_rank_md(table: Table) -> str:
    """The per-pair ranks as a Markdown table (the report shows it under the main table)."""
    if not table.ranks:
        return ""
    lines = ["| method | " + " | ".join(table.pairs) + " | avg rank |", "|---|" + "---:|" * (len(table.pairs) + 1)]
    for row in table.rows:
        if row == TEACHER:
            continue
        ranks = [f"{table.ranks[(row, p)]:g}" if (row, p) in table.ranks else "" for p in table.pairs]
        avg = f"{table.avg_rank[row]:.2f}" if row in table.avg_rank else ""
        lines.append(f"| {row} | " + " | ".join(ranks) + f" | {avg} |")
    return "\n".join(lines)


def _latex_row_name(row: str) -> str:
    return row if row in (TEACHER, STUDENT) else _latex_escape(PAPER_NAMES.get(row, row))


def render_latex(table: Table) -> str:
    ref = table.reference is not None
    ranked = bool(table.avg_rank)
    span = 3 if ref else 1
    extra = int(ranked) + int(ref)
    ncols = 1 + span * len(table.pairs) + extra
    d = table.digits
    label = f"tab:kdbench-{slugify(table.group)}-{slugify(table.metric)}"
    caption = f"{_latex_escape(table.metric)} on {_latex_escape(table.group)}: " + _caption(table, "latex")
    lines = [
        f"% kdbench table: {table.group}, {table.metric}; needs \\usepackage{{booktabs}}",
        "\\begin{table}[t]",
        "\\centering",
        "\\small",
        f"\\caption{{{caption}}}",
        f"\\label{{{label}}}",
        "\\begin{tabular}{l" + "c" * (ncols - 1) + "}",
        "\\toprule",
    ]
    tail_head = (["Avg.\\ rank"] if ranked else []) + (["Mean $\\Delta$"] if ref else [])
    for i, who in enumerate((TEACHER, STUDENT)):
        names = [_latex_escape(p.split(":")[i]) for p in table.pairs]
        cells = [f"\\multicolumn{{{span}}}{{c}}{{{n}}}" if ref else n for n in names]
        tail = tail_head if i == 1 else [""] * extra
        lines.append(" & ".join([who, *cells, *tail]) + " \\\\")
    if ref:
        rules = " ".join(f"\\cmidrule(lr){{{2 + span * k}-{1 + span * (k + 1)}}}" for k in range(len(table.pairs)))
        lines.append(rules)
        lines.append(" & ".join(["", *["Ours & Paper & $\\Delta$"] * len(table.pairs), *[""] * extra]) + " \\\\")
    lines.append("\\midrule")
    for row in table.rows:
        cells = [_latex_row_name(row)]
        for p in table.pairs:
            cells.append(_cell_text(table, row, p, "latex", _marks(table, p)))
            if ref:
                diff = table.diff(row, p)
                cells += [_published(table, row, p), f"${_signed(diff, d)}$" if diff is not None else ""]
        if ranked:
            cells.append(f"{table.avg_rank[row]:.2f}" if row in table.avg_rank else "")
        if ref:
            md = table.mean_diff(row)
            cells.append(f"${_signed(md, d)}$" if md is not None else "")
        lines.append(" & ".join(cells) + " \\\\")
        if row == STUDENT:
            lines.append("\\midrule")
    lines += ["\\bottomrule", "\\end{tabular}"]
    lines += [f"% note: {n}" for n in table.notes]
    lines.append("\\end{table}")
    if table.vs is not None and table.paired:
        vs_label = label + f"-vs-{slugify(table.vs)}"
        cap = _latex_escape(table.group) + ": " + _paired_caption(table, "latex")
        lines += [
            "",
            "\\begin{table}[t]",
            "\\centering",
            "\\small",
            f"\\caption{{{cap}}}",
            f"\\label{{{vs_label}}}",
            "\\begin{tabular}{l" + "c" * len(table.pairs) + "}",
            "\\toprule",
        ]
        for i, who in enumerate((TEACHER, STUDENT)):
            lines.append(" & ".join([who, *[_latex_escape(p.split(":")[i]) for p in table.pairs]]) + " \\\\")
        lines.append("\\midrule")
        for row in table.rows:
            if not any((row, p) in table.paired for p in table.pairs):
                continue
            lines.append(
                " & ".join(
                    [
                        _latex_row_name(row),
                        *[_paired_text(table, table.paired.get((row, p)), "latex") for p in table.pairs],
                    ]
                )
                + " \\\\"
            )
        lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines)


def _f(x: float | None, digits: int = 4) -> str:
    return "" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def render_csv(tables: dict[str, Table]) -> str:
    """Long format: one line per (group, pair, row); reference and paired columns only when asked for."""
    ref = any(t.reference is not None for t in tables.values())
    vs = any(t.vs is not None for t in tables.values())
    head = ["group", "metric", "pair", "row", "mean", "std", "n", "failed", "status", "rank", "avg_rank"]
    head += ["paper", "diff"] if ref else []
    head += ["vs", "vs_n", "vs_mean", "vs_lo", "vs_hi"] if vs else []
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head)
    for table in tables.values():
        for pair in table.pairs:
            for row in table.rows:
                c = table.cell(row, pair)
                if c is None:
                    continue
                rank = table.ranks.get((row, pair))
                line = [
                    table.group,
                    table.metric,
                    pair,
                    row,
                    _f(c.mean) if c.n else "",
                    _f(c.std) if c.n else "",
                    c.n,
                    c.failed,
                    c.status,
                    f"{rank:g}" if rank is not None else "",
                    _f(table.avg_rank.get(row)),
                ]
                if ref:
                    line += [
                        _published(table, row, pair)
                        if (table.reference or {}).get((row, pair)) is None
                        else _f(table.reference[(row, pair)]),
                        _f(table.diff(row, pair)),
                    ]
                if vs:
                    pr = table.paired.get((row, pair))
                    line += ["", "", "", "", ""] if pr is None else [table.vs, pr.n, _f(pr.mean), _f(pr.lo), _f(pr.hi)]
                w.writerow(line)
    return buf.getvalue()


def render(tables: dict[str, Table], fmt: str = "md", metric: str | None = None) -> str:
    """Markdown, LaTeX or CSV text of the tables (`metric` is kept for callers of the old signature)."""
    if fmt == "csv":
        return render_csv(tables)
    if fmt == "md":
        return "\n\n".join(render_md(t) for t in tables.values()) + "\n"
    if fmt == "latex":
        return "\n\n".join(render_latex(t) for t in tables.values()) + "\n"
    raise ValueError(f"unknown format {fmt!r}")
