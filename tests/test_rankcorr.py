"""Kendall's tau and the rank agreement of `kdbench table --rank-corr`, on hand-derived cases.

The tau and p-values below were derived by hand (concordant/discordant counts; the exact null distribution is the
number of permutations with k inversions) and agree with scipy.stats.kendalltau 1.x on the same inputs.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdbench.cli import cli
from kdbench.errors import KdbenchError
from kdbench.rankcorr import _inversion_counts, kendall_tau, rank_agreement

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "results_known"


@pytest.mark.parametrize(
    "x, y, tau, p, how",
    [
        ([1, 2, 3, 4, 5], [1, 2, 3, 5, 4], 0.8, 10 / 120, "exact"),  # 9 concordant, 1 discordant; P(D <= 1) = 5/120
        ([1, 2, 3, 4, 5, 6, 7], [3, 1, 2, 7, 5, 4, 6], 9 / 21, 0.2388888888888889, "exact"),
        ([5, 4, 3, 2, 1, 0, 9, 8], [1, 2, 3, 4, 5, 6, 7, 8], -4 / 28, 0.7195436507936508, "exact"),
        ([1, 2, 2, 3, 4, 5], [2, 1, 3, 3, 5, 4], 0.6428571428571429, 0.07983871964585261, "normal"),  # ties: tau-b
    ],
)
def test_kendall_tau_known_values(x, y, tau, p, how):
    r = kendall_tau(x, y)
    assert r.tau == pytest.approx(tau, abs=1e-12)
    assert r.p_value == pytest.approx(p, rel=1e-9)
    assert r.method == how and r.n == len(x)


def test_perfect_and_reversed_rankings():
    up = kendall_tau([1, 2, 3, 4], [10, 20, 30, 40])
    down = kendall_tau([1, 2, 3, 4], [40, 30, 20, 10])
    assert up.tau == 1.0 and down.tau == -1.0
    assert up.p_value == down.p_value == pytest.approx(2 / 24)


@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_inversion_distribution_is_a_distribution(n):
    counts = _inversion_counts(n)
    assert sum(counts) == math.factorial(n)
    assert len(counts) == n * (n - 1) // 2 + 1
    assert counts == counts[::-1]  # symmetric


def test_kendall_rejects_bad_input():
    with pytest.raises(ValueError):
        kendall_tau([1, 2], [1])
    with pytest.raises(ValueError):
        kendall_tau([1, 1, 1], [1, 2, 3])


def test_rank_agreement_uses_rows_both_have():
    a = rank_agreement(
        {"Student": 70.0, "kd": 71.0, "crd": 73.0, "rrd": 72.0},
        {"Student": 72.5, "kd": 73.3, "crd": 75.5},
        pair="a:b",
        published_pair="c:d",
        reference="crd2020",
    )
    assert a.rows == ("Student", "kd", "crd") and a.result.tau == 1.0
    with pytest.raises(ValueError, match="only 2 rows"):
        rank_agreement(
            {"kd": 1.0, "crd": 2.0}, {"kd": 1.0, "crd": 2.0}, pair="a:b", published_pair="c:d", reference="crd2020"
        )


def test_table_rank_corr_on_the_known_fixture():
    # resnet32x4:resnet8x4 ours: crd 75.5 > kd 74.6 > fitnet 73.25 > Student 73.0 > fsp 72.6; CRD Table 1:
    # crd 75.51 > fitnet 73.50 > kd 73.33 > fsp 72.62 > Student 72.50. Two discordant pairs of ten: tau 0.6,
    # exact p = 2 * (1 + 4 + 9) / 120.
    res = CliRunner().invoke(
        cli, ["table", "--results", str(FIXTURE), "--reference", "crd2020", "--rank-corr", "resnet32x4:resnet8x4"]
    )
    assert res.exit_code == 0, res.output
    assert (
        "Rank agreement of resnet32x4:resnet8x4 with the published ranking of the same pair (crd2020): Kendall "
        "tau-b = 0.600, two-sided p = 0.233 (exact), over the 5 rows both have: Student, kd, fitnet, fsp, crd."
    ) in res.output


def test_table_rank_corr_over_several_references_is_one_ranking():
    # CRD's table and RRD's README on resnet32x4:resnet8x4: crd 75.51 > rrd 74.48 > fitnet 73.50 > kd 73.33 >
    # fsp 72.62 > Student 72.50; ours crd 75.5 > kd 74.6 = rrd 74.6 > fitnet 73.25 > Student 73.0 > fsp 72.6.
    # 12 concordant, 2 discordant (Student-fsp, kd-fitnet), 1 tied in ours only (kd-rrd): tau-b = 10 / sqrt(15 * 14).
    res = CliRunner().invoke(
        cli,
        ["table", "--results", str(FIXTURE), "--reference", "crd2020,rrd2024", "--rank-corr", "resnet32x4:resnet8x4"],
    )
    assert res.exit_code == 0, res.output
    assert (
        "Rank agreement of resnet32x4:resnet8x4 with the published ranking of the same pair (crd2020, rrd2024): "
        "Kendall tau-b = 0.690, two-sided p = 0.0558 (normal), over the 6 rows both have: Student, kd, fitnet, fsp, "
        "crd, rrd."
    ) in res.output
    assert f"{10 / (15 * 14) ** 0.5:.3f}" == "0.690"


def test_table_rank_corr_refuses_two_references_that_disagree(monkeypatch):
    import kdbench.tables as tables

    rows = tables._reference_rows()
    extra = dict(rows[0], source="RRD (Giakoumoglou & Stathaki 2024; a test row)", teacher="resnet32x4")
    extra.update(student="resnet8x4", method="KD", top1="70.00")  # CRD's table says 73.33
    monkeypatch.setattr(tables, "_reference_rows", lambda: [*rows, extra])
    res = CliRunner().invoke(
        cli,
        ["table", "--results", str(FIXTURE), "--reference", "crd2020,rrd2024", "--rank-corr", "resnet32x4:resnet8x4"],
    )
    assert isinstance(res.exception, KdbenchError)
    assert "crd2020 and rrd2024 publish different numbers for kd (73.33 and 70.00)" in str(res.exception)


@pytest.mark.parametrize(
    "extra, message",
    [
        # CRD's table leaves FSP empty on wrn_40_2:wrn_40_1 (not applicable): a number elsewhere is a disagreement
        (
            {"teacher": "wrn_40_2", "student": "wrn_40_1", "method": "FSP", "top1": "70.00"},
            "fsp (not applicable and 70.00)",
        ),
        # the vanilla student is named as the table names it
        (
            {"teacher": "resnet32x4", "student": "resnet8x4", "method": "Student", "top1": "60.00"},
            "for Student (72.50 and 60.00)",
        ),
    ],
)
def test_table_rank_corr_refuses_not_applicable_against_a_number(monkeypatch, extra, message):
    import kdbench.tables as tables

    rows = tables._reference_rows()
    monkeypatch.setattr(
        tables, "_reference_rows", lambda: [*rows, dict(rows[0], source="RRD (Giakoumoglou: a test row)", **extra)]
    )
    pair = f"{extra['teacher']}:{extra['student']}"
    res = CliRunner().invoke(
        cli, ["table", "--results", str(FIXTURE), "--reference", "crd2020,rrd2024", "--rank-corr", pair]
    )
    assert isinstance(res.exception, KdbenchError)
    assert message in str(res.exception)


def test_table_rank_corr_names_each_source_once_and_only_those_with_numbers():
    res = CliRunner().invoke(
        cli,
        [
            "table", "--results", str(FIXTURE), "--reference", "crd2020,crd2020,simkd2022,rrd2024",
            "--rank-corr", "wrn_40_2:wrn_16_2",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "of the same pair (crd2020, rrd2024): Kendall" in res.output  # simkd2022 has no number for this pair


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rank-corr", "resnet32x4:resnet8x4"], "needs a --reference"),
        (["--reference", ",", "--rank-corr", "resnet32x4:resnet8x4"], "needs a --reference"),
        (["--reference", "crd2020,nope", "--rank-corr", "resnet32x4:resnet8x4"], "unknown reference 'nope'"),
        (["--reference", "crd2020", "--rank-corr", "resnet32x4"], "expected TEACHER:STUDENT"),
        (["--reference", "crd2020", "--rank-corr", "resnet32x4:resnet8x4", "--format", "csv"], "use --format md"),
        (["--reference", "crd2020", "--rank-corr", "resnet32x4:resnet8x4", "--metric", "cka"], "top1"),
        (["--reference", "crd2020", "--rank-corr", "vgg8:vgg8"], "has no numbers for that pair"),
    ],
)
def test_table_rank_corr_bad_input(args, message):
    res = CliRunner().invoke(cli, ["table", "--results", str(FIXTURE), *args])
    assert isinstance(res.exception, KdbenchError)  # main() prints it as one line and exits 2
    assert message in str(res.exception)


def test_table_several_metrics():
    res = CliRunner().invoke(
        cli, ["table", "--results", str(FIXTURE), "--metric", "top1_last", "--metric", "top1_best"]
    )
    assert res.exit_code == 0, res.output
    assert "— top1_last" in res.output and "— top1_best" in res.output
    assert res.output.index("— top1_last") < res.output.index("— top1_best")
