"""Tables from the per-run JSON: exact text on a fixture results folder whose numbers are known by hand.

The fixture (tests/fixtures/results_known, written by make_results_known.py) has two CIFAR-100 pairs and three
seeds. Per pair and method the top-1 values are (seed 0, 1, 2):

    wrn_40_2:wrn_16_2 (teacher 75.61)         resnet32x4:resnet8x4 (teacher 79.42)
    ce      73.0  73.5  74.0   73.50 ± 0.50   ce      72.0  73.0  74.0     73.00 ± 1.00
    kd      74.45 74.95 75.45  74.95 ± 0.50   kd      74.1  74.6  75.1     74.60 ± 0.50
    fitnet  failed x3                         fitnet  73.0  73.5  failed   73.25 ± 0.35 (n=2)
    fsp     n/a x3                            fsp     72.5  72.6  72.7     72.60 ± 0.10
    crd     75.51 76.01 76.51  76.01 ± 0.50   crd     73.5  75.0  78.0     75.50 ± 2.29 (sqrt(5.25))
                                              rrd     74.1  74.6  75.1     74.60 ± 0.50 (ties with kd)

Ranks (higher is better, ties share the mean rank): wrn pair crd 1, kd 2, ce 3; resnet pair crd 1, kd = rrd 2.5,
fitnet 4, ce 5, fsp 6. Paired differences against kd: identical differences give a zero-width interval; with
three seeds or fewer the 95% percentile bootstrap interval is the range of the differences (the resampled mean
equals the smallest difference with probability 1/27 > 2.5%).
"""

# ruff: noqa: E501  (the expected tables below are verbatim program output, long lines included)
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdbench.cli import cli
from kdbench.errors import KdbenchError
from kdbench.render import render
from kdbench.results import ResultStore
from kdbench.tables import bootstrap_ci, build_tables, collect, load_reference

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "results_known"
CAPTION = (
    "mean ± sample std over 3 seeds; (n=k): a cell with another seed count; **bold**: best, *italic*: second "
    "best per pair (higher is better); avg rank: mean of the per-pair ranks of the rows below the teacher"
)

MD_TOP1 = f"""\
### cifar100 / paper — top1_last

| method | wrn_40_2:wrn_16_2 | resnet32x4:resnet8x4 | avg rank |
|---|---:|---:|---:|
| Teacher | 75.61 | 79.42 |  |
| Student | 73.50 ± 0.50 | 73.00 ± 1.00 | 4.00 |
| kd | *74.95 ± 0.50* | *74.60 ± 0.50* | 2.25 |
| fitnet | failed | 73.25 ± 0.35 (n=2) (1 failed) | 4.00 |
| fsp | n/a | 72.60 ± 0.10 | 6.00 |
| crd | **76.01 ± 0.50** | **75.50 ± 2.29** | 1.00 |
| rrd |  | *74.60 ± 0.50* | 2.50 |

{CAPTION}.
"""

MD_VS_KD = (
    MD_TOP1.rstrip("\n")
    + """

#### cifar100 / paper — top1_last vs kd

| method | wrn_40_2:wrn_16_2 | resnet32x4:resnet8x4 |
|---|---:|---:|
| Student | **-1.45 [-1.45, -1.45]** | **-1.60 [-2.10, -1.10]** |
| fitnet | failed | **-1.10 [-1.10, -1.10] (n=2)** |
| fsp | n/a | **-2.00 [-2.40, -1.60]** |
| crd | **+1.06 [+1.06, +1.06]** | +0.90 [-0.60, +2.90] |
| rrd |  | +0.00 [+0.00, +0.00] |

top1_last: mean paired difference (method - kd) over the 3 seeds both have, with a 95% percentile bootstrap \
interval (10,000 resamples, seed 0); with 3 seeds or fewer this interval is the range of the differences; \
**bold**: the interval excludes 0.
"""
)

# Published (CRD Table 1): wrn pair Teacher 75.61, Student 73.26, KD 74.92, FitNet 73.58, FSP 72.91, CRD 75.48;
# resnet pair Teacher 79.42, Student 72.50, KD 73.33, FitNet 73.50, FSP 72.62, CRD 75.51; no RRD in crd2020.
MD_REF = f"""\
### cifar100 / paper — top1_last

| method | wrn_40_2:wrn_16_2 | paper | Δ | resnet32x4:resnet8x4 | paper | Δ | avg rank | mean Δ |
|---|---:|---:|---:|---:|---:|---:|---:|---:|
| Teacher | 75.61 | 75.61 | +0.00 | 79.42 | 79.42 | +0.00 |  | +0.00 |
| Student | 73.50 ± 0.50 | 73.26 | +0.24 | 73.00 ± 1.00 | 72.50 | +0.50 | 4.00 | +0.37 |
| kd | *74.95 ± 0.50* | 74.92 | +0.03 | *74.60 ± 0.50* | 73.33 | +1.27 | 2.25 | +0.65 |
| fitnet | failed | 73.58 |  | 73.25 ± 0.35 (n=2) (1 failed) | 73.50 | -0.25 | 4.00 | -0.25 |
| fsp | n/a | 72.91 |  | 72.60 ± 0.10 | 72.62 | -0.02 | 6.00 | -0.02 |
| crd | **76.01 ± 0.50** | 75.48 | +0.53 | **75.50 ± 2.29** | 75.51 | -0.01 | 1.00 | +0.26 |
| rrd |  |  |  | *74.60 ± 0.50* |  |  | 2.50 |  |

{CAPTION}; paper: published last-epoch top-1 (crd2020); Δ = ours - paper.
"""

# CKA: the teacher has none and the vanilla student (trained without a teacher) has none: both rows go.
MD_CKA = f"""\
### cifar100 / paper — cka

| method | wrn_40_2:wrn_16_2 | resnet32x4:resnet8x4 | avg rank |
|---|---:|---:|---:|
| kd | *0.820 ± 0.020* | 0.720 ± 0.020 | 3.00 |
| fitnet | failed | *0.855 ± 0.007 (n=2) (1 failed)* | 2.00 |
| fsp | n/a | 0.600 ± 0.000 | 5.00 |
| crd | **0.910 ± 0.010** | **0.890 ± 0.010** | 1.00 |
| rrd |  | 0.760 ± 0.010 | 3.00 |

{CAPTION}.
"""

LATEX_REF = r"""% kdbench table: cifar100 / paper, top1_last; needs \usepackage{booktabs}
\begin{table}[t]
\centering
\small
\caption{top1\_last on cifar100 / paper: mean $\pm$ sample std over 3 seeds; (n=k): a cell with another seed count; bold: best, underlined: second best per pair (higher is better); avg rank: mean of the per-pair ranks of the rows below the teacher; paper: published last-epoch top-1 (crd2020); $\Delta$ = ours - paper.}
\label{tab:kdbench-cifar100-paper-top1-last}
\begin{tabular}{lcccccccc}
\toprule
Teacher & \multicolumn{3}{c}{wrn\_40\_2} & \multicolumn{3}{c}{resnet32x4} &  &  \\
Student & \multicolumn{3}{c}{wrn\_16\_2} & \multicolumn{3}{c}{resnet8x4} & Avg.\ rank & Mean $\Delta$ \\
\cmidrule(lr){2-4} \cmidrule(lr){5-7}
 & Ours & Paper & $\Delta$ & Ours & Paper & $\Delta$ &  &  \\
\midrule
Teacher & 75.61 & 75.61 & $+0.00$ & 79.42 & 79.42 & $+0.00$ &  & $+0.00$ \\
Student & 73.50 $\pm$ 0.50 & 73.26 & $+0.24$ & 73.00 $\pm$ 1.00 & 72.50 & $+0.50$ & 4.00 & $+0.37$ \\
\midrule
KD & \underline{74.95 $\pm$ 0.50} & 74.92 & $+0.03$ & \underline{74.60 $\pm$ 0.50} & 73.33 & $+1.27$ & 2.25 & $+0.65$ \\
FitNet & failed & 73.58 &  & 73.25 $\pm$ 0.35 (n=2) (1 failed) & 73.50 & $-0.25$ & 4.00 & $-0.25$ \\
FSP & n/a & 72.91 &  & 72.60 $\pm$ 0.10 & 72.62 & $-0.02$ & 6.00 & $-0.02$ \\
CRD & \textbf{76.01 $\pm$ 0.50} & 75.48 & $+0.53$ & \textbf{75.50 $\pm$ 2.29} & 75.51 & $-0.01$ & 1.00 & $+0.26$ \\
RRD &  &  &  & \underline{74.60 $\pm$ 0.50} &  &  & 2.50 &  \\
\bottomrule
\end{tabular}
\end{table}
"""

LATEX_VS = r"""% kdbench table: cifar100 / paper, top1_last; needs \usepackage{booktabs}
\begin{table}[t]
\centering
\small
\caption{top1\_last on cifar100 / paper: mean $\pm$ sample std over 3 seeds; (n=k): a cell with another seed count; bold: best, underlined: second best per pair (higher is better); avg rank: mean of the per-pair ranks of the rows below the teacher.}
\label{tab:kdbench-cifar100-paper-top1-last}
\begin{tabular}{lccc}
\toprule
Teacher & wrn\_40\_2 & resnet32x4 &  \\
Student & wrn\_16\_2 & resnet8x4 & Avg.\ rank \\
\midrule
Teacher & 75.61 & 79.42 &  \\
Student & 73.50 $\pm$ 0.50 & 73.00 $\pm$ 1.00 & 4.00 \\
\midrule
KD & \underline{74.95 $\pm$ 0.50} & \underline{74.60 $\pm$ 0.50} & 2.25 \\
FitNet & failed & 73.25 $\pm$ 0.35 (n=2) (1 failed) & 4.00 \\
FSP & n/a & 72.60 $\pm$ 0.10 & 6.00 \\
CRD & \textbf{76.01 $\pm$ 0.50} & \textbf{75.50 $\pm$ 2.29} & 1.00 \\
RRD &  & \underline{74.60 $\pm$ 0.50} & 2.50 \\
\bottomrule
\end{tabular}
\end{table}

\begin{table}[t]
\centering
\small
\caption{cifar100 / paper: top1\_last: mean paired difference (method - KD) over the 3 seeds both have, with a 95\% percentile bootstrap interval (10,000 resamples, seed 0); with 3 seeds or fewer this interval is the range of the differences; bold: the interval excludes 0.}
\label{tab:kdbench-cifar100-paper-top1-last-vs-kd}
\begin{tabular}{lcc}
\toprule
Teacher & wrn\_40\_2 & resnet32x4 \\
Student & wrn\_16\_2 & resnet8x4 \\
\midrule
Student & \textbf{-1.45 [-1.45, -1.45]} & \textbf{-1.60 [-2.10, -1.10]} \\
FitNet & failed & \textbf{-1.10 [-1.10, -1.10] (n=2)} \\
FSP & n/a & \textbf{-2.00 [-2.40, -1.60]} \\
CRD & \textbf{+1.06 [+1.06, +1.06]} & +0.90 [-0.60, +2.90] \\
RRD &  & +0.00 [+0.00, +0.00] \\
\bottomrule
\end{tabular}
\end{table}
"""

CSV_FULL = """\
group,metric,pair,row,mean,std,n,failed,status,rank,avg_rank,paper,diff,vs,vs_n,vs_mean,vs_lo,vs_hi
cifar100 / paper,top1_last,wrn_40_2:wrn_16_2,Teacher,75.6100,,1,0,done,,,75.6100,0.0000,,,,,
cifar100 / paper,top1_last,wrn_40_2:wrn_16_2,Student,73.5000,0.5000,3,0,done,3,4.0000,73.2600,0.2400,kd,3,-1.4500,-1.4500,-1.4500
cifar100 / paper,top1_last,wrn_40_2:wrn_16_2,kd,74.9500,0.5000,3,0,done,2,2.2500,74.9200,0.0300,,,,,
cifar100 / paper,top1_last,wrn_40_2:wrn_16_2,fitnet,,,0,3,failed,,4.0000,73.5800,,kd,0,,,
cifar100 / paper,top1_last,wrn_40_2:wrn_16_2,fsp,,,0,0,n/a,,6.0000,72.9100,,kd,0,,,
cifar100 / paper,top1_last,wrn_40_2:wrn_16_2,crd,76.0100,0.5000,3,0,done,1,1.0000,75.4800,0.5300,kd,3,1.0600,1.0600,1.0600
cifar100 / paper,top1_last,resnet32x4:resnet8x4,Teacher,79.4200,,1,0,done,,,79.4200,0.0000,,,,,
cifar100 / paper,top1_last,resnet32x4:resnet8x4,Student,73.0000,1.0000,3,0,done,5,4.0000,72.5000,0.5000,kd,3,-1.6000,-2.1000,-1.1000
cifar100 / paper,top1_last,resnet32x4:resnet8x4,kd,74.6000,0.5000,3,0,done,2.5,2.2500,73.3300,1.2700,,,,,
cifar100 / paper,top1_last,resnet32x4:resnet8x4,fitnet,73.2500,0.3536,2,1,done,4,4.0000,73.5000,-0.2500,kd,2,-1.1000,-1.1000,-1.1000
cifar100 / paper,top1_last,resnet32x4:resnet8x4,fsp,72.6000,0.1000,3,0,done,6,6.0000,72.6200,-0.0200,kd,3,-2.0000,-2.4000,-1.6000
cifar100 / paper,top1_last,resnet32x4:resnet8x4,crd,75.5000,2.2913,3,0,done,1,1.0000,75.5100,-0.0100,kd,3,0.9000,-0.6000,2.9000
cifar100 / paper,top1_last,resnet32x4:resnet8x4,rrd,74.6000,0.5000,3,0,done,2.5,2.5000,,,kd,3,0.0000,0.0000,0.0000
"""


@pytest.fixture(scope="module")
def col():
    return collect(ResultStore(FIXTURE))


def test_markdown_table_exact(col):
    assert render(build_tables(col, "top1_last"), "md") == MD_TOP1


def test_markdown_paired_comparison_exact(col):
    assert render(build_tables(col, "top1_last", vs="kd"), "md") == MD_VS_KD


def test_markdown_reference_exact(col):
    assert render(build_tables(col, "top1_last", reference="crd2020"), "md") == MD_REF


def test_any_metric_as_the_cell(col):
    assert render(build_tables(col, "cka"), "md") == MD_CKA


def test_latex_exact(col):
    assert render(build_tables(col, "top1_last", reference="crd2020"), "latex") == LATEX_REF
    assert render(build_tables(col, "top1_last", vs="kd"), "latex") == LATEX_VS


def test_csv_exact(col):
    assert render(build_tables(col, "top1_last", reference="crd2020", vs="kd"), "csv") == CSV_FULL


def test_both_references_and_the_published_na():
    ref, names = load_reference("crd2020,rrd2024")
    assert names == ["crd2020", "rrd2024"]
    assert ref[("resnet32x4", "resnet8x4", "RRD")] == 74.48 and ref[("resnet32x4", "resnet8x4", "CRD")] == 75.51
    assert ref[("wrn_40_2", "wrn_40_1", "FSP")] is None  # N/A in the paper (channel counts differ)
    only_rrd, _ = load_reference("rrd2024")
    assert set(k[2] for k in only_rrd) == {"RRD", "RRD+KD"}


def test_rrd_reference_row(col):
    table = build_tables(col, "top1_last", reference="crd2020,rrd2024")["cifar100 / paper"]
    assert table.reference[("rrd", "resnet32x4:resnet8x4")] == 74.48
    assert round(table.diff("rrd", "resnet32x4:resnet8x4"), 6) == 0.12


def test_bootstrap_is_seeded_and_exact_in_known_cases():
    assert bootstrap_ci([0.7, 0.7, 0.7, 0.7]) == (0.7, 0.7)
    assert bootstrap_ci([-2.0, 1.0, 4.0]) == (-2.0, 4.0)  # n <= 3: the range
    wide = [0.1, -0.4, 0.9, 0.3, 0.2, -0.1, 0.5, 0.0]
    lo, hi = bootstrap_ci(wide)
    assert bootstrap_ci(wide) == (lo, hi) and min(wide) < lo < sum(wide) / len(wide) < hi < max(wide)


def test_errors_name_what_is_valid(col):
    with pytest.raises(
        KdbenchError,
        match=r"unknown metric 'top1'; valid: top1_last, top1_best, top5_last, "
        r"top5_best, agreement, best_epoch, cka, ece",
    ):
        build_tables(col, "top1")
    with pytest.raises(KdbenchError, match="unknown reference 'crd2021'; valid: crd2020, rrd2024"):
        build_tables(col, "top1_last", reference="crd2021")
    with pytest.raises(KdbenchError, match="needs --metric top1_last or top1_best"):
        build_tables(col, "cka", reference="crd2020")
    with pytest.raises(KdbenchError, match=r"--vs 'vid': no runs of that method; methods present: ce, kd, fitnet"):
        build_tables(col, "top1_last", vs="vid")


def test_reference_is_not_applied_to_other_data(tmp_path):
    import json

    for src in (FIXTURE / "runs").glob("*__kd__s0__*.json"):
        obj = json.loads(src.read_text())
        obj["spec"]["data"]["name"] = "synthetic"
        (tmp_path / "runs").mkdir(exist_ok=True)
        (tmp_path / "runs" / src.name).write_text(json.dumps(obj))
    tables = build_tables(collect(ResultStore(tmp_path)), "top1_last", reference="crd2020")
    (table,) = tables.values()
    assert table.reference is None and "not shown for synthetic" in table.notes[0]
    assert "Note: published numbers (crd2020) are CIFAR-100 and ImageNet results: not shown for synthetic." in render(
        tables, "md"
    )


def test_cli_table_names_the_half_written_file_and_goes_on():
    res = CliRunner().invoke(cli, ["table", "--results", str(FIXTURE), "--vs", "kd"])
    assert res.exit_code == 0, res.output
    assert res.stdout == MD_VS_KD
    assert "halfwritten.json" in res.stderr.replace("\n", "") and "unreadable JSON" in res.stderr
    res = CliRunner().invoke(cli, ["table", "--results", str(FIXTURE), "--metric", "nope"])
    assert res.exit_code != 0 and "valid: top1_last" in str(res.exception)


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_latex_compiles(col, tmp_path):
    body = render(build_tables(col, "top1_last", reference="crd2020,rrd2024", vs="kd"), "latex")
    doc = (
        "\\documentclass{article}\n\\usepackage[T1]{fontenc}\n\\usepackage{booktabs}\n"
        "\\usepackage[margin=1cm,landscape]{geometry}\n\\begin{document}\n" + body + "\\end{document}\n"
    )
    (tmp_path / "t.tex").write_text(doc)
    out = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "t.tex"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout[-3000:]
    assert (tmp_path / "t.pdf").stat().st_size > 1000


def test_modern_references_hold_only_their_methods_rows():
    ref, names = load_reference("dkd2022,dist2022,ls2024,simkd2022")
    assert names == ["dkd2022", "dist2022", "ls2024", "simkd2022"]
    assert {k[2] for k in ref} == {"DKD", "DIST", "KD+LS", "DKD+LS", "SimKD"}
    assert ref[("resnet32x4", "resnet8x4", "DKD")] == 76.32 and ref[("resnet56", "resnet20", "DIST")] == 71.75
    assert ref[("resnet110", "resnet20", "DKD+LS")] == 71.85 and ref[("resnet32x4", "resnet8x4", "SimKD")] == 78.08
    crd, _ = load_reference("crd2020")
    assert not {k[2] for k in crd} & {"DKD", "DIST", "KD+LS", "DKD+LS", "SimKD"}


def test_modern_reference_beside_our_run(tmp_path):
    import json
    import shutil

    shutil.copytree(FIXTURE, tmp_path / "res")
    runs = tmp_path / "res" / "runs"
    for src in runs.glob("cifar100__resnet32x4__resnet8x4__rrd__s*.json"):  # rrd's runs, renamed to dkd
        run = json.loads(src.read_text())
        run["spec"]["method"] = run["method"]["name"] = "dkd"
        src.unlink()
        (runs / src.name.replace("__rrd__", "__dkd__")).write_text(json.dumps(run))
    table = build_tables(collect(ResultStore(tmp_path / "res")), "top1_last", reference="dkd2022")["cifar100 / paper"]
    assert table.reference[("dkd", "resnet32x4:resnet8x4")] == 76.32
    assert round(table.diff("dkd", "resnet32x4:resnet8x4"), 6) == round(74.60 - 76.32, 6)
    assert ("kd", "resnet32x4:resnet8x4") not in table.reference  # dkd2022 holds only DKD's own rows
