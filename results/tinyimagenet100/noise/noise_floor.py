"""The noise floor of results/tinyimagenet100: how far apart two runs land that differ only by floating-point
rounding, against how far apart seeds land, and the smallest difference between two methods that 3 seeds resolve.

Rounding twins: `noise/runs/` holds runs with the same seed, code, data, teacher and run id as runs of `../runs/`,
trained with 1 intra-op thread instead of 2 (OMP_NUM_THREADS=1): the same arithmetic summed in another order, so
they differ by rounding alone (a first-step gradient differs by ~1e-7). Seeds: the runs of `../runs/`.
Both are compared at the last epoch and at the end of the lr 0.05 phase (the last epoch before the first decay).

    python results/tinyimagenet100/noise/noise_floor.py > results/tinyimagenet100/noise/noise.md

Reads the run JSON (and kdbench's method registry, to name the rows as `kdbench table` does); the output is Markdown.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAIN = HERE.parent / "runs"
TWINS = HERE / "runs"
# Two-sided 95% quantiles of Student's t (standard tables), by degrees of freedom.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
# KD's top-1 at the last epoch from RepDistiller's own code on this exact setting (3 seeds), measured by an earlier
# session and written in issue 22 (its runs are not in this repository).
REFERENCE_KD = [34.18, 33.68, 33.50]


def _teacher_runs() -> set[str]:
    """The run ids of the teachers' own training runs (their cards in ../teachers/ name them)."""
    return {json.loads(p.read_text())["run_id"] for p in (HERE.parent / "teachers").glob("*.json")}


def _runs(folder: Path) -> dict[tuple[str, int, str], dict]:
    out = {}
    teachers = _teacher_runs()
    for path in sorted(folder.glob("*.json")):
        run = json.loads(path.read_text())
        spec = run["spec"]
        if run.get("status") != "done" or run["run_id"] in teachers:
            continue
        if any(k in spec for k in ("precision", "channels_last")):
            continue
        out[(spec["method"], spec["seed"], run["run_id"])] = run
    return out


def _lr_phase_end(run: dict) -> int:
    """Index of the last epoch at the initial learning rate."""
    lrs = run["curve"]["lr"]
    return max(i for i, lr in enumerate(lrs) if math.isclose(lr, lrs[0]))


def _at(run: dict, where: str) -> float:
    if where == "last":
        return float(run["metrics"]["top1_last"])
    return float(run["curve"]["test_top1"][_lr_phase_end(run)])


def _setting(run: dict) -> tuple[str, str]:
    """A method at one setting (a grid point is another setting)."""
    return run["spec"]["method"], json.dumps(run["spec"]["method_config"], sort_keys=True)


def _default(method: str, runs: dict) -> tuple[str, str] | None:
    """A method at its default setting (the row `kdbench table` names by the method alone: kdbench.variants); a
    grid point of the method is another setting, not another seed of it."""
    keys = {_setting(r) for r in runs.values() if r["spec"]["method"] == method}
    return next((k for k in keys if not _changed(k, runs)), None)


def _changed(key: tuple[str, str], runs: dict) -> dict:
    """The keys where this setting differs from the method's default for its pair."""
    from kdbench.variants import method_defaults, setting_diff

    method, config = key
    run = next(r for r in runs.values() if _setting(r) == key)
    pair = f"{(run['spec'].get('teacher') or {}).get('arch', '-')}:{run['spec']['student']}"
    return setting_diff(json.loads(config), method_defaults([method], pair)[method])


def _row_name(key: tuple[str, str], runs: dict) -> str:
    """The row `kdbench table` gives this setting: the method, with the keys where it differs from the default."""
    from kdbench.variants import row_name

    method = key[0]
    name = row_name(method, _changed(key, runs))
    return name.replace("ce", "vanilla student (ce)", 1) if method == "ce" else name


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def main() -> str:
    main_runs, twins = _runs(MAIN), _runs(TWINS)
    methods = sorted({m for (m, _s, _r) in twins}, key=["kd", "fitnet", "pkt"].index)
    default = {m: _default(m, main_runs) for m in {*methods, "kd"}}  # each method's default setting, resolved once
    kd = sorted((s, _at(r, "last")) for (_m, s, _rid), r in main_runs.items() if _setting(r) == default["kd"])
    out = [
        "# Noise floor of results/tinyimagenet100 (resnet20:resnet8, Tiny-ImageNet-100 at 16x16, `cpu` protocol)",
        "",
    ]
    any_run = next(iter(main_runs.values()))
    phase_end = _lr_phase_end(any_run) + 1
    out += [
        f"Top-1 (%) at the last epoch ({len(any_run['curve']['lr'])}) and at the end of the lr 0.05 phase (epoch "
        f"{phase_end}). Rounding twin: the same run (same seed and run id) trained with 1 thread instead of 2.",
        "",
        "## Rounding twins",
        "",
        "| method | seed | last: 2 threads | last: 1 thread | last: difference | "
        f"epoch {phase_end}: 2 threads | epoch {phase_end}: 1 thread | epoch {phase_end}: difference |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rounding: dict[str, dict[str, list[float]]] = {}
    for key in sorted(twins, key=lambda k: (methods.index(k[0]), k[1])):
        if key not in main_runs:
            continue
        a, b = main_runs[key], twins[key]
        row = [key[0], str(key[1])]
        for where in ("last", "phase"):
            x, y = _at(a, where), _at(b, where)
            rounding.setdefault(key[0], {}).setdefault(where, []).append(y - x)
            row += [f"{x:.2f}", f"{y:.2f}", f"{y - x:+.2f}"]
        out.append("| " + " | ".join(row) + " |")
    out += [
        "",
        "## Rounding against seeds",
        "",
        "Spread of one run: from the twins, the standard deviation that rounding alone gives a run, estimated as "
        "|difference| x sqrt(pi)/2 averaged over the twins (for two independent draws E|X1 - X2| = 2 sigma / "
        "sqrt(pi)); from the seeds, the sample standard deviation over the seeds of `runs/`.",
        "",
        f"| method | twins | seeds | last: rounding sd | last: seed sd | epoch {phase_end}: rounding sd | "
        f"epoch {phase_end}: seed sd |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    seed_sd: dict[str, dict[str, float]] = {}
    seed_counts: dict[str, int] = {}
    for m in methods:
        seeds = sorted((s, r) for (_m, s, r), run in main_runs.items() if _setting(run) == default[m])
        seed_counts[m] = len(seeds)
        row = [m, str(len(rounding.get(m, {}).get("last", []))), ", ".join(str(s) for s, _ in seeds)]
        for where in ("last", "phase"):
            diffs = rounding.get(m, {}).get(where, [])
            r_sd = statistics.mean(abs(d) for d in diffs) * math.sqrt(math.pi) / 2 if diffs else float("nan")
            values = [_at(main_runs[(m, s, r)], where) for s, r in seeds]
            seed_sd.setdefault(m, {})[where] = _sd(values)
            row += [f"{r_sd:.2f}", f"{_sd(values):.2f}"]
        out.append("| " + " | ".join(row) + " |")

    # the smallest difference 3 seeds resolve: two-sided t-test of two methods' means at 5%, with the pooled
    # per-run sd (at the last epoch) of these methods, and of every method setting of the table with 2 seeds or more
    def pooled(keys: list[tuple[str, str]]) -> tuple[float, int]:
        var, dof = 0.0, 0
        for key in keys:
            values = [_at(r, "last") for r in main_runs.values() if _setting(r) == key]
            if len(values) > 1:
                var += statistics.variance(values) * (len(values) - 1)
                dof += len(values) - 1
        return (math.sqrt(var / dof) if dof else float("nan")), dof

    mine = [default[m] for m in methods]
    table = sorted({_setting(r) for r in main_runs.values()})
    sigma, dof = pooled(mine)
    sigma_all, dof_all = pooled(table)
    n = 3
    out += [
        "",
        "## The smallest difference 3 seeds resolve",
        "",
        f"Pooled per-run standard deviation at the last epoch: **{sigma:.2f} points** over these "
        f"{len(methods)} methods' seeds ({dof} degrees of freedom), **{sigma_all:.2f}** over every method of the table "
        f"with 2 seeds or more ({dof_all} degrees of freedom). Two methods with 3 seeds each differ significantly "
        f"(two-sided t-test, 5%) when their means differ by more than t(0.975, {2 * n - 2}) x sd x sqrt(2/3): "
        f"**{T975[2 * n - 2] * sigma * math.sqrt(2 / n):.2f} points** with the first, "
        f"**{T975[2 * n - 2] * sigma_all * math.sqrt(2 / n):.2f}** with the second. A difference of exactly that size "
        "is found significant only half the time; for 80% of the time it takes (t(0.975, 4) + t(0.80, 4)) x sd x "
        f"sqrt(2/3) = {(T975[2 * n - 2] + 0.941) * sigma * math.sqrt(2 / n):.2f} and "
        f"{(T975[2 * n - 2] + 0.941) * sigma_all * math.sqrt(2 / n):.2f} points.",
    ]
    # which rows of the table differ from KD by more than that floor (pooled sd of the table, each row's seed count)
    kd_values = [v for _, v in kd]
    if kd_values:
        out += [
            "",
            f"### The table's rows against KD at this floor (pooled sd {sigma_all:.2f})",
            "",
            f"Each row's mean minus KD's ({statistics.mean(kd_values):.2f}, {len(kd_values)} seeds), and the smallest "
            "difference its seed count resolves against KD's: t(0.975, n + n_KD - 2) x sd x sqrt(1/n + 1/n_KD).",
            "",
            "| row | seeds | top-1 last | - KD | resolvable | beyond the floor |",
            "|---|---:|---:|---:|---:|---|",
        ]
        rows = []
        for key in table:
            if key == default["kd"]:
                continue
            values = [_at(r, "last") for r in main_runs.values() if _setting(r) == key]
            n, nk = len(values), len(kd_values)
            if n < 2:
                continue
            diff = statistics.mean(values) - statistics.mean(kd_values)
            floor = T975[min(10, n + nk - 2)] * sigma_all * math.sqrt(1 / n + 1 / nk)
            rows.append((diff, _row_name(key, main_runs), n, statistics.mean(values), floor))
        for diff, name, n, mean, floor in sorted(rows, reverse=True):
            beyond = "yes" if abs(diff) > floor else "no"
            out.append(f"| {name} | {n} | {mean:.2f} | {diff:+.2f} | {floor:.2f} | {beyond} |")
    if len(kd) >= 2:
        ours = [v for _, v in kd]
        diff = statistics.mean(REFERENCE_KD) - statistics.mean(ours)
        se = math.sqrt(statistics.variance(REFERENCE_KD) / len(REFERENCE_KD) + statistics.variance(ours) / len(ours))
        a, b = statistics.variance(REFERENCE_KD) / len(REFERENCE_KD), statistics.variance(ours) / len(ours)
        welch_df = (a + b) ** 2 / (a**2 / (len(REFERENCE_KD) - 1) + b**2 / (len(ours) - 1))
        t = diff / se
        crit = T975[max(1, min(10, math.floor(welch_df)))]
        out += [
            "",
            "## KD against the reference code",
            "",
            f"kdbench's KD, {len(ours)} seeds ({', '.join(str(s) for s, _ in kd)}): "
            f"{', '.join(f'{v:.2f}' for v in ours)}; mean {statistics.mean(ours):.2f} ± {_sd(ours):.2f}. "
            f"RepDistiller's own code on the same setting, 3 seeds (an earlier session's runs, issue 22): "
            f"{', '.join(f'{v:.2f}' for v in REFERENCE_KD)}; mean {statistics.mean(REFERENCE_KD):.2f} ± "
            f"{_sd(REFERENCE_KD):.2f}. Difference {diff:+.2f} points; Welch's t = {t:.2f} on {welch_df:.1f} degrees of "
            f"freedom against a 5% critical value of {crit:.2f} (df rounded down): "
            + ("**significant**" if abs(t) > crit else "**not significant**")
            + ".",
        ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(main())
