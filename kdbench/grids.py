"""What a grid over settings changes in a ranking: each method at its default setting against the best point of its
grid, and Kendall's tau between the two rankings of the methods (``kdbench table --best-of-grid``).

The best point is chosen on the same test split that the table reports, so the best-of-grid row is an optimistic
bound (the selection is not validated on held-out data); the output says so.
"""

from __future__ import annotations

from kdbench.rankcorr import kendall_tau
from kdbench.tables import STUDENT, TEACHER, Cell, Table
from kdbench.variants import base_method


def best_of_grid(table: Table, pair: str) -> dict[str, tuple[str, Cell, Cell]]:
    """method -> (row name of its best setting, the default's cell, the best cell), for every method whose default
    row has runs on `pair` (a method without a grid is its own best)."""
    sign = table.direction or 1
    out: dict[str, tuple[str, Cell, Cell]] = {}
    for row in table.rows:
        if row in (TEACHER, STUDENT) or base_method(row) != row:
            continue
        default = table.cell(row, pair)
        if default is None or not default.n:
            continue
        best_row, best = row, default
        for other in table.rows:
            cell = table.cell(other, pair)
            if base_method(other) == row and other != row and cell is not None and cell.n:
                if sign * cell.mean > sign * best.mean:
                    best_row, best = other, cell
        out[row] = (best_row, default, best)
    return out


def render_best_of_grid_md(table: Table) -> str:
    """Per pair: each method's default and best-of-grid cell, and Kendall's tau between the two rankings."""
    parts = []
    d = table.digits
    for pair in table.pairs:
        best = best_of_grid(table, pair)
        if not any(b[0] != m for m, b in best.items()):
            continue
        lines = [
            f"### Best of grid: {table.group} — {pair} ({table.metric})",
            "",
            "| method | default setting | best of its grid | best setting | best - default |",
            "|---|---:|---:|---|---:|",
        ]

        def fmt(c: Cell) -> str:  # each setting's mean is over its own seeds: their number is shown
            return (f"{c.mean:.{d}f} ± {c.std:.{d}f}" if c.n > 1 else f"{c.mean:.{d}f}") + f" (n={c.n})"

        for m, (row, dc, bc) in best.items():
            setting = row[len(m) + 2 : -1] if row != m else "default"
            lines.append(f"| {m} | {fmt(dc)} | {fmt(bc)} | {setting} | {bc.mean - dc.mean:+.{d}f} |")
        methods = list(best)
        text = ""
        if len(methods) >= 3:
            try:
                r = kendall_tau([best[m][1].mean for m in methods], [best[m][2].mean for m in methods])
                text = (
                    f"Kendall tau-b between the ranking of the {r.n} methods at their default settings and at the best "
                    f"point of each grid: {r.tau:.3f} (two-sided p = {r.p_value:.3g}, {r.method})."
                )
            except ValueError as exc:
                text = f"Kendall tau-b between the two rankings: undefined ({exc})."
        lines += [
            "",
            (text + " " if text else "")
            + "The best point is chosen on the test split the table reports: an optimistic bound, not a tuned result.",
        ]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)
