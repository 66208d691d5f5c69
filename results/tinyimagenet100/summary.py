"""The results README's main table: every method name at its reference setting, one row each, ordered by top-1 at
the last epoch, with the paired comparisons against KD and the vanilla student and the probe on the unseen classes.

    python results/tinyimagenet100/summary.py            # prints the table (Markdown)
    python results/tinyimagenet100/summary.py --readme   # writes it into README.md between its two markers, and
                                                         # a two-column digest into the repository's README.md

Every number comes from the committed run and probe JSON through kdbench's own table code (`kdbench table --vs kd`,
`--vs ce` and `--transfer` print the same numbers, one question at a time); tests/test_committed_results.py checks
that both READMEs hold exactly what this prints. Grid points (a method at another setting) are not rows here:
best_of_grid.md and the report's sensitivity figure give them.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEGIN = "<!-- summary.py: begin (generated; edit summary.py, not this table) -->"
END = "<!-- summary.py: end -->"


def _seeds(seeds: list[int]) -> str:
    """0, 1, 2 -> "0-2"; 2, 3, 4 -> "2-4"; 0, 2 -> "0, 2"."""
    seeds = sorted(seeds)
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def _paired(p) -> str:
    if p is None or p.mean is None:
        return ""
    if p.lo is None:
        return f"{p.mean:+.2f} (1 seed)"
    text = f"{p.mean:+.2f} [{p.lo:+.2f}, {p.hi:+.2f}]"
    return f"**{text}**" if p.lo > 0 or p.hi < 0 else text


@functools.lru_cache(maxsize=4)
def _tables(results: Path):
    """The tables against KD and the vanilla student, the pair, and the rows at their reference settings (the
    teacher first, then by mean top-1 at the last epoch). Read once: the README's table and the digest share it."""
    from kdbench.results import ResultStore
    from kdbench.tables import STUDENT, TEACHER, build_tables, collect
    from kdbench.variants import base_method

    col = collect(ResultStore(results))
    (vs_kd,) = build_tables(col, vs="kd").values()
    (vs_ce,) = build_tables(col, vs="ce").values()
    (pair,) = vs_kd.pairs
    rows = [r for r in vs_kd.rows if r in (TEACHER, STUDENT) or base_method(r) == r]
    rows.sort(key=lambda r: (r != TEACHER, -vs_kd.cell(r, pair).mean))
    return col, vs_kd, vs_ce, pair, rows


def _top1_and_seeds(table, row: str, pair: str) -> tuple[str, str]:
    """A row's top-1 (mean ± sample std, or the one value) and its seeds (the teacher's card is seed 0)."""
    from kdbench.tables import TEACHER
    from kdbench.transfer import Stat

    cell = table.cell(row, pair)
    return Stat(cell.by_seed()).fmt(), "0" if row == TEACHER else _seeds([s for s, _ in cell.values])


def main(results: Path = HERE) -> str:
    from kdbench.results import ResultStore
    from kdbench.tables import STUDENT, TEACHER
    from kdbench.transfer import build_transfer, collect_probes

    col, vs_kd, vs_ce, pair, rows = _tables(results)
    (transfer,) = build_transfer(col, collect_probes(ResultStore(results))[0])
    probes = {r.row: r for r in transfer.rows}
    lines = [
        "| | method | seeds | top-1 last | - KD, same seed | - vanilla student, same seed "
        "| probe on unseen classes (seeds) | probe - vanilla student, same seed |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for i, row in enumerate(rows):
        name = {TEACHER: "Teacher (resnet20)", STUDENT: "vanilla student (`ce`, resnet8)"}.get(row, row)
        top1, seeds = _top1_and_seeds(vs_kd, row, pair)
        kd = "" if row in (TEACHER, "kd") else _paired(vs_kd.paired.get((row, pair)))
        ce = "" if row in (TEACHER, STUDENT) else _paired(vs_ce.paired.get((row, pair)))
        probe = probes.get(row)
        target = f"{probe.target.fmt()} ({_seeds(list(probe.target.values))})" if probe and probe.target.n else ""
        gain = ""
        if probe and row not in (TEACHER, STUDENT) and probe.gain.n:
            gain = f"{probe.gain.mean:+.2f}"
            if probe.gain.n != probe.target.n:  # the vanilla student was probed at fewer of this row's seeds
                gain += f" ({'seed' if probe.gain.n == 1 else 'seeds'} {_seeds(list(probe.gain.values))})"
        lines.append(f"| {i or ''} | {name} | {seeds} | {top1} | {kd} | {ce} | {target} | {gain} |")
    lines += [
        "",
        f"{len(rows) - 2} method names and the vanilla student on {pair}, 16x16 Tiny-ImageNet-100, the `cpu` protocol; "
        "top-1 % at the last epoch on the 5,000 validation images, mean ± sample std over the seeds listed. "
        "Paired columns: the mean of (row - baseline) over the seeds both have, with its 95% bootstrap interval "
        "(with 3 seeds or fewer, the range of the differences); **bold**: the interval excludes 0 (with 3 seeds, the "
        "differences agree in sign: a weaker test than the noise floor's, see below). Probe: a linear "
        'classifier on the frozen pooled features, 100 classes no model saw (see "Transfer"), mean ± std over '
        "the seeds probed, and its mean difference from the vanilla student's probe of the same seed (over the "
        "seeds named where the vanilla student was probed at fewer of them).",
    ]
    return "\n".join(lines) + "\n"


def digest(results: Path = HERE) -> str:
    """The repository README's short form: top-1 at the last epoch and the seeds of every row, in two columns."""
    from kdbench.tables import STUDENT, TEACHER

    _, vs_kd, _, pair, rows = _tables(results)
    cells = []
    for row in rows:
        name = {TEACHER: "Teacher (resnet20)", STUDENT: "vanilla student (ce)"}.get(row, row)
        top1, seeds = _top1_and_seeds(vs_kd, row, pair)
        cells.append(f"{name} | {top1} | {seeds}")
    half = (len(cells) + 1) // 2
    left, right = cells[:half], cells[half:] + [" |  | "] * (2 * half - len(cells))
    lines = ["| method | top-1 last | seeds | method | top-1 last | seeds |", "|---|---:|---|---|---:|---|"]
    lines += [f"| {a} | {b} |" for a, b in zip(left, right)]
    return "\n".join(lines) + "\n"


README = HERE / "README.md"
MAIN_README = HERE.parents[1] / "README.md"


def write_readme(readme: Path, text: str) -> None:
    old = readme.read_text()
    head, _, rest = old.partition(BEGIN + "\n")
    _, found, tail = rest.partition(END)
    if not found:
        sys.exit(f"{readme}: no {BEGIN!r} ... {END!r} markers")
    readme.write_text(head + BEGIN + "\n" + text + END + tail)


def readme_block(readme: Path = README) -> str:
    """What a README holds between the markers."""
    return readme.read_text().partition(BEGIN + "\n")[2].partition(END)[0]


if __name__ == "__main__":
    if sys.argv[1:] == ["--readme"]:
        write_readme(README, main())
        write_readme(MAIN_README, digest())
    elif sys.argv[1:]:
        sys.exit("usage: python results/tinyimagenet100/summary.py [--readme]")
    else:
        sys.stdout.write(main())
