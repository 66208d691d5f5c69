"""Figures and the Markdown report: every figure is drawn, titled, labelled, non-blank; the report links them all."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from kdbench import plots
from kdbench.report import write_report
from kdbench.results import ResultStore
from kdbench.tables import STUDENT, TEACHER, build_tables, collect

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "results_known"
GROUP = "cifar100 / paper"
PAIRS = ["wrn_40_2:wrn_16_2", "resnet32x4:resnet8x4"]
# seaborn's heatmap calls a colormap method that matplotlib plans to deprecate: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The set_bad function:PendingDeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny training run gains nothing from more, and a shared 2-core machine loses a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def col():
    return collect(ResultStore(FIXTURE))


@pytest.fixture(scope="module")
def table(col):
    return build_tables(col, "top1_last")[GROUP]


def check_figure(fig) -> None:
    """A title, and a label on both axes of every plotting area (colour bars aside)."""
    assert fig is not None
    assert fig.get_suptitle().strip()
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
    assert axes
    for ax in axes:
        assert ax.get_xlabel().strip() and ax.get_ylabel().strip(), (fig.get_suptitle(), ax.get_title())


def check_png(path: Path, title: str | None = None) -> None:
    assert path is not None and path.is_file()
    assert path.stat().st_size > 8_000, f"{path.name} is only {path.stat().st_size} bytes"
    with Image.open(path) as im:
        assert im.text.get("Title", "").strip(), f"{path.name} has no Title"
        if title is not None:
            assert im.text["Title"] == title.replace("\n", " ")  # a wrapped title is stored on one line
        pixels = np.asarray(im.convert("L"), dtype=np.float64) / 255.0
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert pixels.std() > 0.05, f"{path.name} looks blank"
    assert (pixels < 0.5).mean() > 0.005, f"{path.name} has almost nothing drawn"


def _drawn(fig):
    """The renderer of `fig` drawn on an Agg canvas; a figure already drawn there and unchanged since (not stale) is
    not drawn again, so the checks of one figure share a draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not isinstance(fig.canvas, FigureCanvasAgg) or fig.stale:
        FigureCanvasAgg(fig)
        fig.canvas.draw()
    return fig.canvas.get_renderer()


def check_nothing_clipped(fig) -> None:
    """Everything drawn (titles, labels, tick labels, legends, annotations) lies inside the figure: matplotlib's
    tight bounding box of what is drawn (what bbox_inches="tight" would crop to) fits in the canvas."""
    tight = fig.get_tightbbox(_drawn(fig))  # inches
    w, h = fig.get_size_inches()
    eps = 0.02
    assert tight.x0 >= -eps and tight.y0 >= -eps and tight.x1 <= w + eps and tight.y1 <= h + eps, (
        f"drawn area {tight} exceeds the {w:.2f}x{h:.2f} in canvas of {fig.get_suptitle()!r}"
    )


def test_bar_chart(table, tmp_path):
    for pair in PAIRS:
        fig = plots.bar_figure(table, pair)
        check_figure(fig)
        ax = fig.axes[0]
        fitnet = "fitnet" if pair == PAIRS[0] else "fitnet\n(n=2, 1 failed)"
        assert [t.get_text() for t in ax.get_xticklabels()][:3] == ["student (ce)", "kd", fitnet]
        assert any(line.get_linestyle() == "--" for line in ax.get_lines())  # the teacher level
        assert ax.get_ylim()[0] == 0  # every bar chart starts at 0, so that charts of pairs read alike
        # The subtitle says what the error bars are; where bars rest on different seed counts it says so.
        assert ("n=k" in ax.get_title()) == (pair == PAIRS[1]), ax.get_title()
        check_nothing_clipped(fig)
        check_png(plots.save(fig, tmp_path / f"bar-{pair}.png"), fig.get_suptitle())
    # The wrn pair's fitnet failed and fsp is n/a: no bar, a label instead.
    texts = [t.get_text() for t in plots.bar_figure(table, PAIRS[0]).axes[0].texts]
    assert "failed" in texts and "n/a" in texts


def test_gain_heatmap(table, tmp_path):
    fig = plots.gain_figure(table)
    check_figure(fig)
    check_nothing_clipped(fig)
    labels = [t.get_text() for t in fig.axes[0].texts]
    # kd on resnet32x4:resnet8x4: 74.60 - 73.00; crd on wrn_40_2:wrn_16_2: 76.01 - 73.50.
    assert "+1.60" in labels and "+2.51" in labels and "failed" in labels and "n/a" in labels
    check_png(plots.save(fig, tmp_path / "gain.png"))


@pytest.mark.slow
def test_curves_losses_corr_diff_and_alignment(col, tmp_path):
    for pair in PAIRS:
        for fig in (
            plots.curves_figure(col, GROUP, pair, teacher_top1=79.42),
            plots.losses_figure(col, GROUP, pair),
            plots.corr_diff_figure(col, GROUP, pair),
        ):
            check_figure(fig)
            check_nothing_clipped(fig)
            check_png(plots.save(fig, tmp_path / f"{len(list(tmp_path.iterdir()))}.png"), fig.get_suptitle())
    corr = plots.corr_diff_figure(col, GROUP, PAIRS[1])
    assert [ax.get_title().split(":")[0] for ax in corr.axes if ax.get_label() != "<colorbar>"] == [
        "kd",
        "crd",
        "rrd",
        "fitnet",
    ]  # the preferred methods first, at most four
    fig = plots.alignment_figure(col, GROUP, "top1_last")
    check_figure(fig)
    check_nothing_clipped(fig)
    assert [ax.get_xlabel() for ax in fig.axes] == [lab for _, lab in plots.ALIGNMENT]
    # One small point per finished run that has the alignment metric: 3 kd + 3 crd (wrn) + 3 kd + 2 fitnet + 3 fsp
    # + 3 crd + 3 rrd (resnet) = 20, and one large point per method (5).
    sizes = [s for c in fig.axes[0].collections for s in np.broadcast_to(c.get_sizes(), (len(c.get_offsets()),))]
    assert sizes.count(30) == 20 and sizes.count(150) == 5
    # Two pairs, each with its vanilla student: accuracy relative to it (kd on resnet8x4, seed 0: 74.1 - 73.0).
    assert "vanilla student of the pair" in fig.axes[0].get_ylabel()
    assert 1.1 in [round(y, 6) for c in fig.axes[0].collections for y in c.get_offsets()[:, 1]]
    check_png(plots.save(fig, tmp_path / "align.png"))


def test_nothing_to_draw_gives_none(col, table):
    assert plots.curves_figure(col, GROUP, "vgg13:vgg8") is None
    assert plots.corr_diff_figure(col, GROUP, "vgg13:vgg8") is None
    cka = build_tables(col, "cka")[GROUP]  # no vanilla-student row: no gain to show
    assert plots.gain_figure(cka) is None


def test_method_styles_are_distinct_and_stable():
    from kdbench.catalog import BUILTIN_ORDER

    styles = plots.styles_for(list(reversed(BUILTIN_ORDER)))
    looks = [styles[m] for m in BUILTIN_ORDER if m != "ce"]
    assert len({(tuple(c), h) for c, h, _, _ in looks}) == len(looks)  # colour + hatch tell every method apart
    assert len({(tuple(c), ls) for c, _, _, ls in looks}) == len(looks)  # colour + line style too
    many = [f"m{i:02d}" for i in range(25)]
    styles = plots.styles_for(many)
    colours = [tuple(np.round(styles[m][0], 4)) for m in many]
    assert len(set(colours)) == 25 and tuple(np.round(plots.GREY, 4)) not in colours  # 25 methods, 25 colours
    assert len({(h, mk, ls) for _, h, mk, ls in styles.values()}) >= 3  # and the look changes with each round
    assert plots.styles_for(["crd", "kd"])["kd"] == plots.styles_for(["kd", "crd", "zz"])["kd"]


# ---------------------------------------------------------------------------------------------- many methods


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """The fixture's runs with 25 methods on each pair (its kd runs copied under every built-in name and extra
    ones, with shifted numbers): the crowded case of a full report."""
    import copy
    import hashlib
    import json
    import math

    from kdbench.sweep import BUILTIN_ORDER
    from kdbench.variants import method_defaults

    names = [m for m in BUILTIN_ORDER if m != "ce"]
    names += [f"extra{i}" for i in range(25 - len(names))]
    root = tmp_path_factory.mktemp("many")
    (root / "runs").mkdir()
    for f in (FIXTURE / "runs").glob("*.json"):
        try:
            r = json.loads(f.read_text())
        except ValueError:
            continue  # the half-written file
        if r["spec"]["method"] in ("ce", "kd"):
            (root / "runs" / f.name).write_text(json.dumps(r))
        if r["spec"]["method"] != "kd" or r["status"] != "done":
            continue
        for i, m in enumerate(names[1:], 1):
            q = copy.deepcopy(r)
            q["spec"]["method"] = q["method"]["name"] = m
            # each copy at its method's default setting on its pair (else it would be a row of another setting)
            pair = f"{r['spec']['teacher']['arch']}:{r['spec']['student']}"
            q["spec"]["method_config"] = method_defaults([m], pair)[m] or {}
            q["run_id"] = hashlib.sha256(f"{r['run_id']}-{m}".encode()).hexdigest()[:16]  # never an existing id
            d = 1.5 * math.sin(1.7 * i)
            for k in ("top1_last", "top1_best"):
                q["metrics"][k] += d
            q["curve"]["test_top1"] = [v + d for v in q["curve"]["test_top1"]]
            q["curve"]["loss"][m] = [0.5 * v for v in q["curve"]["loss"]["kd"]]
            (root / "runs" / f.name.replace("__kd__", f"__{m}__").replace(r["run_id"], q["run_id"])).write_text(
                json.dumps(q)
            )
    return collect(ResultStore(root))


@pytest.mark.slow  # measured over 2 s of the fast subset on 2 cores
def test_every_figure_kind_with_25_methods(many, tmp_path):
    """The crowded case: nothing clipped, 25 looks for 25 methods, a legend entry for every hatch, bar charts
    that start at 0 for every pair, no '(n=3)' repeated in the curves' legend, markers that mean the method."""
    from matplotlib.patches import Patch, Rectangle

    table = build_tables(many, "top1_last")[GROUP]
    methods = [r for r in table.rows if r not in (TEACHER, STUDENT)]
    assert len(methods) == 25
    styles = plots.styles_for(list(many.runs["method"].unique()))
    figs = []
    for pair in PAIRS:
        bar = plots.bar_figure(table, pair, styles)
        ax = bar.axes[0]
        assert ax.get_ylim()[0] == 0
        bars = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_hatch()]
        legend = {
            (tuple(np.round(h.get_facecolor(), 3)), h.get_hatch()): h.get_label()
            for h in bar.legends[0].legend_handles
            if isinstance(h, Patch)
        }
        assert bars and all((tuple(np.round(b.get_facecolor(), 3)), b.get_hatch()) in legend for b in bars)
        curves = plots.curves_figure(many, GROUP, pair, teacher_top1=79.42, styles=styles)
        labels = [t.get_text() for t in curves.legends[0].get_texts()]
        assert not any("(n=" in t for t in labels) and "3 seeds" in curves.get_suptitle()
        lines = {
            (
                tuple(np.round(h.get_color(), 3)) if not isinstance(h.get_color(), str) else h.get_color(),
                h.get_linestyle(),
                h.get_marker(),
            )
            for h in curves.legends[0].legend_handles
        }
        assert len(lines) == len(labels)  # every entry looks different
        figs += [bar, curves, plots.losses_figure(many, GROUP, pair, styles), plots.corr_diff_figure(many, GROUP, pair)]
    align = plots.alignment_figure(many, GROUP, "top1_last", styles)
    for h in align.axes[-1].get_legend().legend_handles[:-1]:
        assert h.get_marker() == styles[h.get_label()][2]  # the marker tells the method, as everywhere
    figs += [plots.gain_figure(table), align]
    for fig in figs:
        check_figure(fig)
        check_nothing_clipped(fig)
        check_title_clear_of_legends(fig)
        check_png(plots.save(fig, tmp_path / f"{len(list(tmp_path.iterdir()))}.png"), fig.get_suptitle())


def _linked(report: Path) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())


@pytest.mark.slow
def test_report_on_fixture(tmp_path):
    out = write_report(FIXTURE, tmp_path / "rep", reference="crd2020")
    text = out.read_text()
    assert "| crd | **76.01 ± 0.50** | 75.48 | +0.53 |" in text
    assert "#### cifar100 / paper — top1_last vs kd" in text  # kd is the default baseline
    assert "rank per pair" in text and "| rrd |  | 2.5 | 2.50 |" in text
    assert "halfwritten.json" in text  # the malformed file is reported
    assert "| cifar100 / paper | wrn_40_2:wrn_16_2 | fsp | 0 | n/a |" in text
    links = _linked(out)
    expected = {"gain-cifar100-paper.png", "alignment-cifar100-paper.png"} | {
        f"{kind}-cifar100-paper-{p.replace(':', '-').replace('_', '-')}.png"
        for kind in ("top1", "curves", "losses", "corrdiff")
        for p in PAIRS
    }
    assert set(links) == expected
    for name in links:
        check_png(out.parent / name)


# ---------------------------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory, one_thread):
    """A real results folder: the tiny bench of conftest.py (ce, kd, fitnet, crd), two seeds (seconds on a CPU)."""
    from kdbench.config import load_bench
    from kdbench.sweep import Request, Sweep, expand
    from tests.conftest import TINY_TOML

    root = tmp_path_factory.mktemp("tiny-results")
    toml = root / "bench.toml"
    toml.write_text(TINY_TOML)
    store = ResultStore(root / "results")
    specs = expand(load_bench(toml), Request(["ce", "kd", "fitnet", "crd"], ["tiny"], seeds=[0, 1]), store)
    Sweep(store, torch.device("cpu")).run(specs)
    return store.root


@pytest.mark.slow
def test_report_on_a_real_run(tiny_results, tmp_path):
    from kdbench.cli import cli

    res = CliRunner().invoke(cli, ["report", "--results", str(tiny_results), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    report = tmp_path / "rep" / "report.md"
    text = report.read_text()
    assert "## synthetic@16 / tiny" in text and "| kd |" in text and "vs kd" in text
    links = _linked(report)
    assert {name.split("-")[0] for name in links} == {"gain", "alignment", "top1", "curves", "losses", "corrdiff"}
    for name in links:
        check_png(report.parent / name)


def check_title_clear_of_legends(fig) -> None:
    """The figure's title overlaps no legend (a figure legend at the upper right shares the title's height)."""
    renderer = _drawn(fig)
    title = fig._suptitle.get_window_extent(renderer)
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    for legend in legends:
        assert not title.overlaps(legend.get_window_extent(renderer)), (fig.get_suptitle(), legend.get_title())


def test_transfer_figure_with_27_rows_keeps_title_and_legend_apart(tmp_path):
    from kdbench.transfer import Stat, TransferRow, TransferTable

    rows = [TransferRow("resnet20:resnet8", TEACHER, Stat({0: 40.3}), Stat({0: 28.7}), Stat())]
    for i, name in enumerate([STUDENT, *[f"method-{k}" for k in range(26)]]):
        rows.append(
            TransferRow("resnet20:resnet8", name, Stat({0: 30 + i / 5, 1: 30.5 + i / 5}), Stat({0: 25 + i / 9}), Stat())
        )
    title = (
        "tinyimagenet@16 / cpu -> tinyimagenet (100 classes, 20000 train / 5000 test images @16px, data 371f5c80), "
        "probe fast (20 epochs), probe seed 0"
    )
    fig = plots.transfer_figure(TransferTable(title, rows))
    check_figure(fig)
    check_nothing_clipped(fig)
    check_title_clear_of_legends(fig)
    check_png(plots.save(fig, tmp_path / "transfer.png"), fig.get_suptitle())
