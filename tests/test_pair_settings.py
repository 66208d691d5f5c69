"""The authors' settings per teacher/student pair (issue 23): the shipped data, how a run resolves them (default <
per-pair < bench.toml < --set, or uniform), what the run JSON records, `list methods --pair`, and the table marks."""

from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdbench.cli import cli
from kdbench.config import load_bench
from kdbench.method import discover, make_config, resolve
from kdbench.models.base import check_model_name
from kdbench.pair_settings import load_pair_settings, parse_pair_settings
from kdbench.sweep import Request, expand
from kdbench.tables import REFERENCE_DIR

ROOT = Path(__file__).resolve().parents[1]


def shown(method: str, pair: str) -> dict[str, str]:
    """`kdbench list methods --config METHOD --pair PAIR` as {key: value}."""
    res = CliRunner().invoke(cli, ["list", "methods", "--config", method, "--pair", pair], terminal_width=200)
    assert res.exit_code == 0, res.output
    out = {}
    for line in res.output.splitlines():
        cols = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cols) == 3:
            out[cols[0]] = cols[1]
    return out


@pytest.mark.parametrize(
    "pair,beta", [("resnet56:resnet20", "2.0"), ("vgg13:vgg8", "6.0"), ("resnet32x4:resnet8x4", "8.0")]
)
def test_list_methods_shows_dkd_beta_per_pair(pair, beta):
    assert shown("dkd", pair)["beta"] == beta


def test_list_methods_shows_dkd_ls_on_resnet56_resnet20():
    got = shown("dkd-ls", "resnet56:resnet20")
    assert (got["temperature"], got["alpha"], got["beta"]) == ("3.0", "18.0", "36.0")


def test_list_methods_pair_without_setting_shows_the_default_and_bad_pair_is_exit_2():
    assert shown("dkd", "resnet50:vgg8")["beta"] == "8.0"
    import subprocess
    import sys

    for args, words in ((["--config", "dkd", "--pair", "vgg13"], "teacher:student"), (["--pair", "a:b"], "--config")):
        res = subprocess.run(
            [sys.executable, "-c", "from kdbench.cli import main; main()", "list", "methods", *args],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 2 and words in res.stderr and "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1


def test_every_shipped_setting_is_a_valid_config_of_a_known_pair():
    settings = load_pair_settings()
    registry = discover()
    assert settings
    for (method, pair), ps in settings.items():
        for arch in pair.split(":"):
            check_model_name(arch)
        cfg = make_config(registry[method], dict(ps.values))  # raises on an unknown key or a value out of range
        assert all(getattr(cfg, k) == v for k, v in ps.values)
        assert " @ " in ps.source and len(ps.source.split(" @ ")[1].split(":")[0]) == 40  # repo @ full commit: path
        assert ps.confirmed or ps.note


def test_every_published_dkd_and_ls_cell_has_a_cited_setting():
    """DKD, DKD+LS and KD+LS numbers were produced with per-pair settings: each published cell must have one."""
    settings = load_pair_settings()
    ours = {"DKD": "dkd", "DKD+LS": "dkd-ls", "KD+LS": "kd-ls"}
    with open(REFERENCE_DIR / "cifar100_top1.csv", newline="") as fh:
        cells = [
            (ours[r["method"]], f"{r['teacher']}:{r['student']}") for r in csv.DictReader(fh) if r["method"] in ours
        ]
    assert len(cells) == 30
    assert [c for c in cells if c not in settings] == []


def test_sources_md_cites_every_per_pair_value():
    text = (REFERENCE_DIR / "SOURCES.md").read_text()
    for (method, pair), ps in load_pair_settings().items():
        assert f"| `{method}` | `{pair}` |" in text, (method, pair)
        assert ps.source.split(": ", 1)[1].split(" (")[0] in text, (method, pair)


def test_the_values_the_issue_lists_to_be_confirmed():
    s = {k: dict(v.values) for k, v in load_pair_settings().items()}
    cifar = {(m, p): v for (m, p), v in s.items() if not p.startswith("tv_")}  # ImageNet: a test of its own
    assert {p: v["beta"] for (m, p), v in cifar.items() if m == "dkd" and v["beta"] != 8.0} == {
        "resnet56:resnet20": 2.0,
        "resnet110:resnet32": 2.0,
        "vgg13:vgg8": 6.0,
        "vgg13:mobilenetv2": 6.0,
        "wrn_40_2:wrn_16_2": 6.0,
        "wrn_40_2:wrn_40_1": 6.0,
    }
    ls = {p: (v["temperature"], v["alpha"], v["beta"]) for (m, p), v in s.items() if m == "dkd-ls"}
    for p in ("vgg13:vgg8", "resnet110:resnet32", "resnet110:resnet20", "resnet50:mobilenetv2"):
        assert ls[p] == (2.0, 15.0, 30.0)
    assert ls["wrn_40_2:wrn_40_1"] == ls["wrn_40_2:wrn_16_2"] == (2.0, 12.0, 24.0)
    assert ls["resnet56:resnet20"] == (3.0, 18.0, 36.0) and ls["vgg13:mobilenetv2"] == (3.0, 9.0, 18.0)
    assert ls["resnet32x4:resnet8x4"] == ls["resnet32x4:shufflenetv2"] == (2.0, 9.0, 72.0)
    assert (s[("kd-ls", "resnet110:resnet20")]["temperature"], s[("kd-ls", "resnet110:resnet20")]["weight"]) == (4, 12)
    review = {p: v["weight"] for (m, p), v in s.items() if m == "reviewkd"}
    assert (review["resnet56:resnet20"], review["resnet110:resnet32"], review["resnet32x4:shufflenetv2"]) == (0.6, 1, 8)
    assert "vgg13:vgg8" not in review  # the authors' script has no line for it: kdbench's default applies


def _spec(req: Request, toml: Path | None = None):
    (spec,) = expand(load_bench(toml or ROOT / "bench.toml"), req)
    return spec


def test_precedence_default_pair_bench_set_and_uniform(tmp_path):
    pair = ["resnet56:resnet20"]
    s = _spec(Request(["dkd"], pair))
    assert s.method_config["beta"] == 2.0 and dict(s.settings.origin)["beta"] == "pair"
    assert s.settings.to_dict()["pair_setting"]["source"].startswith("megvii-research/mdistiller @ a08d46f")
    assert s.settings.kind == "pair"
    s = _spec(Request(["dkd"], pair, sets=["methods.dkd.beta=5"]))
    assert s.method_config["beta"] == 5.0 and dict(s.settings.origin)["beta"] == "--set" and s.settings.kind == "set"
    toml = tmp_path / "bench.toml"
    toml.write_text((ROOT / "bench.toml").read_text() + "\n[methods.dkd]\nbeta = 4.0\n")
    s = _spec(Request(["dkd"], pair), toml)
    assert s.method_config["beta"] == 4.0 and dict(s.settings.origin)["beta"] == "bench.toml"
    s = _spec(Request(["dkd"], pair, sets=["methods.dkd.beta=5"]), toml)
    assert s.method_config["beta"] == 5.0
    u = _spec(Request(["dkd"], pair, uniform_settings=True))
    assert u.method_config["beta"] == 8.0 and u.settings.mode == "uniform" and u.settings.kind == "default"
    assert set(dict(u.settings.origin).values()) == {"default"}


def test_run_id_changes_only_where_the_setting_does():
    per_pair = _spec(Request(["dkd"], ["resnet56:resnet20"]))
    uniform = _spec(Request(["dkd"], ["resnet56:resnet20"], uniform_settings=True))
    assert per_pair.run_id != uniform.run_id
    # beta 8 on resnet32x4 -> resnet8x4 is the default: the same experiment, the same id with or without the switch
    a = _spec(Request(["dkd"], ["resnet32x4:resnet8x4"]))
    b = _spec(Request(["dkd"], ["resnet32x4:resnet8x4"], uniform_settings=True))
    assert a.run_id == b.run_id and a.settings.kind == "pair" and b.settings.kind == "default"


def test_uniform_settings_option_reaches_the_runs(tmp_path, monkeypatch):
    import kdbench.sweep

    seen = []
    real = kdbench.sweep.expand

    def spy(bench, req, store=None):
        specs = real(bench, req, store)
        seen.append([s.method_config["beta"] for s in specs])
        return specs

    monkeypatch.setattr(kdbench.sweep, "expand", spy)
    for flag in (["--uniform-settings"], []):
        args = ["run", "-m", "dkd", "-p", "resnet56:resnet20", "--dry-run", "--results", str(tmp_path), *flag]
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 0, res.output
    assert seen == [[8.0], [2.0]]


def test_parse_rejects_a_malformed_file():
    with pytest.raises(Exception, match="teacher:student"):
        parse_pair_settings({"dkd": {"pairs": {"vgg13": {"beta": 6.0, "from": "x"}}}}, "f")
    with pytest.raises(Exception, match="sets no value"):
        parse_pair_settings({"dkd": {"pairs": {"a:b": {"from": "x"}}}}, "f")
    with pytest.raises(Exception, match=r"\[dkd.pairs\]"):
        parse_pair_settings({"dkd": {"beta": 2}}, "f")


SMOKE_TOML = textwrap.dedent("""
    [defaults]
    protocol = "smoke"

    [protocols.smoke]
    epochs = 3
    batch_size = 16
    lr = 0.05
    lr_small = 0.01
    small_lr_students = ["mobilenetv2"]
    momentum = 0.9
    weight_decay = 5e-4
    milestones = [2]
    lr_decay = 0.1
    init_epochs = 1

    [pairs.two]
    dataset = "synthetic"
    pairs = ["resnet56:resnet20", "vgg13:vgg8"]

    [pairs.two.dataset_options]
    num_classes = 4
    image_size = 16
    train_size = 32
    test_size = 16
    seed = 0
""")


@pytest.mark.slow
def test_smoke_run_records_the_per_pair_values(tmp_path):
    """dkd, dkd-ls, kd-ls and reviewkd on two pairs whose published settings differ: each run JSON holds the
    pair's values and says where each came from; `kdbench table` marks the cells † and, with --reference, a
    uniform-setting cell ≠."""
    toml = tmp_path / "bench.toml"
    toml.write_text(SMOKE_TOML)
    out = tmp_path / "res"
    args = ["run", "-m", "dkd,dkd-ls,kd-ls,reviewkd", "-p", "two", "--config", str(toml), "--results", str(out)]
    res = CliRunner().invoke(cli, [*args, "--set", "protocol.epochs=1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    runs = {}
    for f in (out / "runs").glob("*.json"):
        rec = json.loads(f.read_text())
        if rec["spec"]["teacher"] is not None:
            runs[(rec["method"]["name"], rec["pair"])] = rec
    assert len(runs) == 8 and all(r["status"] == "done" for r in runs.values())
    expected = {
        ("dkd", "resnet56:resnet20"): {"beta": 2.0},
        ("dkd", "vgg13:vgg8"): {"beta": 6.0},
        ("dkd-ls", "resnet56:resnet20"): {"temperature": 3.0, "alpha": 18.0, "beta": 36.0},
        ("dkd-ls", "vgg13:vgg8"): {"temperature": 2.0, "alpha": 15.0, "beta": 30.0},
        ("kd-ls", "resnet56:resnet20"): {"temperature": 2.0, "weight": 9.0},
        ("kd-ls", "vgg13:vgg8"): {"temperature": 3.0, "weight": 9.0},
        ("reviewkd", "resnet56:resnet20"): {"weight": 0.6},
    }
    for key, values in expected.items():
        rec = runs[key]
        assert {k: rec["method"]["config"][k] for k in values} == values, key
        assert {k: rec["settings"]["from"][k] for k in values} == dict.fromkeys(values, "pair"), key
        assert rec["settings"]["pair_setting"]["values"] == values and rec["settings"]["kind"] == "pair"
    # the authors' script has no ReviewKD weight for vgg13 -> vgg8: the default, and nothing claimed
    plain = runs[("reviewkd", "vgg13:vgg8")]
    assert plain["method"]["config"]["weight"] == 5.0 and plain["settings"]["pair_setting"] is None
    assert plain["settings"]["kind"] == "default"
    table = CliRunner().invoke(cli, ["table", "--results", str(out)], terminal_width=300)
    assert table.exit_code == 0, table.output
    dkd_row = next(line for line in table.output.splitlines() if line.startswith("| dkd |"))
    assert dkd_row.count("†") == 2
    assert "the authors' per-pair setting" in table.output

    # A uniform-setting dkd run beside the published numbers: marked as another experiment (the data set here is
    # synthetic, so the reference is compared on a cifar100-named copy of the records)
    res = CliRunner().invoke(cli, [*args[:2], "dkd", *args[3:], "--set", "protocol.epochs=1", "--uniform-settings"])
    assert res.exit_code == 0, res.output
    cifar = tmp_path / "cifar"
    (cifar / "runs").mkdir(parents=True)
    for f in (out / "runs").glob("*.json"):
        rec = json.loads(f.read_text())
        if rec["method"]["name"] not in ("dkd", "ce"):
            continue
        rec["spec"]["data"]["name"] = "cifar100"
        (cifar / "runs" / f.name).write_text(json.dumps(rec))
    ref = CliRunner().invoke(cli, ["table", "--results", str(cifar), "--reference", "dkd2022"], terminal_width=300)
    assert ref.exit_code == 0, ref.output
    # the uniform runs are a row of their own (another setting than the pair's default), set beside the
    # published number and marked; the per-pair runs are the method's row, not marked ≠
    uniform_row = next(line for line in ref.output.splitlines() if line.startswith("| dkd (beta=8) |"))
    assert "≠" in uniform_row and "not the one the published number came from" in ref.output
    dkd_row = next(line for line in ref.output.splitlines() if line.startswith("| dkd |"))
    assert "≠" not in dkd_row and "†" in dkd_row


def test_kd_ls_cell_whose_setting_is_unconfirmed_is_marked(tmp_path):
    """A published cell whose setting could not be confirmed (kd-ls on resnet32x4 -> shufflenetv2) is marked '?'."""
    from kdbench.results import ResultStore
    from kdbench.tables import build_tables, collect

    runs = tmp_path / "runs"
    runs.mkdir()
    spec = _spec(Request(["kd-ls"], ["resnet32x4:shufflenetv2"]))
    other = _spec(Request(["kd-ls"], ["resnet56:resnet20"]))
    for s in (spec, other):
        rec = {
            "schema": 1,
            "run_id": s.run_id,
            "status": "done",
            "spec": s.to_dict(),
            "pair": s.pair,
            "method": {"name": s.method, "config": s.method_config},
            "settings": s.settings.to_dict(),
            "teacher": None,
            "metrics": {"top1_last": 70.0, "top1_best": 70.0},
        }
        (runs / f"{s.label}.json").write_text(json.dumps(rec))
    (table,) = build_tables(collect(ResultStore(tmp_path)), reference="ls2024").values()
    assert table.setting_marks[("kd-ls", "resnet32x4:shufflenetv2")] == ["pair", "unknown"]
    assert table.setting_marks[("kd-ls", "resnet56:resnet20")] == ["pair"]


def test_resolve_is_unchanged_for_methods_without_per_pair_settings():
    s = _spec(Request(["kd"], ["resnet56:resnet20"]))
    assert s.settings.kind == "default" and s.settings.pair is None
    assert s.method_config == {k: v for k, v in make_config(resolve("kd")).__dict__.items()}


def test_imagenet_kd_and_dkd_get_mdistillers_settings_and_the_table_marks_only_other_settings(tmp_path):
    """mdistiller's ImageNet KD and DKD (configs/imagenet/*/kd.yaml, dkd.yaml) are not its CIFAR defaults: every
    published ImageNet cell has a cited setting, the runs get it, and `--reference mdistiller-imagenet` marks ≠ a
    run at another setting (--uniform-settings) but not one at the published setting."""
    from kdbench.results import ResultStore
    from kdbench.tables import build_tables, collect

    s = {k: dict(v.values) for k, v in load_pair_settings().items()}
    for pair in ("tv_resnet34:tv_resnet18", "tv_resnet50:mobilenetv1"):
        assert s[("kd", pair)] == {"ce_weight": 0.5, "kd_weight": 0.5, "temperature": 1.0}
        assert load_pair_settings()[("kd", pair)].reference == "mdistiller-imagenet"
        assert load_pair_settings()[("dkd", pair)].reference == "mdistiller-imagenet"
    dkd = {
        p: (v["beta"], v.get("temperature"), v.get("warmup"), v.get("warmup_reference_epochs"))
        for (m, p), v in s.items()
        if m == "dkd"
    }
    assert dkd["tv_resnet34:tv_resnet18"] == (0.5, 1.0, 1.0, 100) and dkd["tv_resnet50:mobilenetv1"][0] == 2.0
    with open(REFERENCE_DIR / "imagenet_top1.csv", newline="") as fh:
        cells = [(r["method"].lower(), f"{r['teacher']}:{r['student']}") for r in csv.DictReader(fh)]
    assert len(cells) == 4 and [c for c in cells if c not in s] == []

    runs = tmp_path / "runs"
    runs.mkdir()
    bench = load_bench(ROOT / "bench.toml")
    published = expand(bench, Request(["kd", "dkd"], ["imagenet"], data_root=str(tmp_path)))
    uniform = expand(bench, Request(["kd"], ["imagenet"], data_root=str(tmp_path), uniform_settings=True))
    for spec in published + uniform[:1]:
        rec = {
            "schema": 1,
            "run_id": spec.run_id,
            "status": "done",
            "spec": spec.to_dict(),
            "pair": spec.pair,
            "method": {"name": spec.method, "config": spec.method_config},
            "settings": spec.settings.to_dict(),
            "teacher": None,
            "metrics": {"top1_last": 70.0, "top1_best": 70.0},
        }
        (runs / f"{spec.label}.json").write_text(json.dumps(rec))
    assert {sp.method_config["temperature"] for sp in published} == {1.0}
    (table,) = build_tables(collect(ResultStore(tmp_path)), reference="mdistiller-imagenet").values()
    marks = table.setting_marks
    for pair in ("tv_resnet34:tv_resnet18", "tv_resnet50:mobilenetv1"):
        assert marks[("kd", pair)] == ["pair"] and marks[("dkd", pair)] == ["pair"]
    other = [row for row in table.rows if row.startswith("kd (")]
    assert len(other) == 1 and "differs" in marks[(other[0], "tv_resnet34:tv_resnet18")]
