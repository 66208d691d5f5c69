"""The transfer linear probe: a frozen student (eval mode, untouched weights and BN statistics), a linear head on its
pooled features, a JSON linked to the run; and the STL-10 reader it can use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdbench.errors import KdbenchError
from kdbench.probe import PROBE_PROTOCOLS, ProbeProtocol, load_student, resolve_run, run_probe, train_linear_probe
from kdbench.results import ResultStore
from tests.conftest import shared_data

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "results_known"
TINY_IMAGENET = shared_data("tiny-imagenet-100")
SMALL = {"num_classes": 5, "train_size": 96, "test_size": 40, "seed": 3}  # synthetic probe data
QUICK = ProbeProtocol("quick", 3, (2,), batch_size=32)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these tiny models gain nothing from more, and a shared 2-core machine loses a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread):
    """A finished kd run of the tiny bench (resnet14 -> resnet8, 16x16 synthetic data), with its weights."""
    from kdbench.config import load_bench
    from kdbench.sweep import Request, Sweep, expand
    from tests.conftest import TINY_TOML

    root = tmp_path_factory.mktemp("probe-results")
    (root / "bench.toml").write_text(TINY_TOML)
    store = ResultStore(root / "results")
    Sweep(store, torch.device("cpu")).run(expand(load_bench(root / "bench.toml"), Request(["kd"], ["tiny"]), store))
    (path,) = store.runs_dir.glob("*__kd__*.json")
    return path, store.root


def test_protocols_follow_the_crd_recipe():
    paper, fast = PROBE_PROTOCOLS["paper"], PROBE_PROTOCOLS["fast"]
    assert (paper.epochs, paper.milestones, paper.batch_size, paper.lr, paper.lr_small) == (
        120,
        (30, 60, 90),
        64,
        0.05,
        0.01,
    )
    assert (paper.momentum, paper.weight_decay) == (0.9, 5e-4)
    assert paper.lr_at(0.05, 29) == pytest.approx(0.05) and paper.lr_at(0.05, 30) == pytest.approx(0.005)
    assert paper.lr_at(0.05, 119) == pytest.approx(0.05e-3)
    assert [m / fast.epochs for m in fast.milestones] == [m / paper.epochs for m in paper.milestones]


def test_resolve_run(tiny_run, tmp_path):
    path, root = tiny_run
    run_id = path.stem.split("__")[-1]
    got_path, run, got_root = resolve_run(run_id[:6], root)
    assert got_path == path and run["run_id"] == run_id and got_root == root
    got_path, _, got_root = resolve_run(str(path))  # a JSON path: its results folder is found from it
    assert got_path == path and got_root.resolve() == root.resolve()
    with pytest.raises(KdbenchError, match="matches 2 runs"):
        resolve_run("synthetic", root)  # the kd run and the teacher's own ce run
    with pytest.raises(KdbenchError, match="no run whose id or file name starts with 'zzz'"):
        resolve_run("zzz", root)
    outside = tmp_path / "run.json"
    outside.write_text(path.read_text())
    with pytest.raises(KdbenchError, match="pass --results"):
        resolve_run(str(outside))


def test_a_failed_run_has_nothing_to_probe():
    (failed,) = (FIXTURE / "runs").glob("*__wrn_16_2__fitnet__s0__*.json")
    _, run, root = resolve_run(str(failed))
    with pytest.raises(KdbenchError, match="is failed: only a finished run has weights"):
        load_student(run, root, torch.device("cpu"))


def test_backbone_stays_frozen(tiny_run):
    from kdbench.data import load_dataset

    path, root = tiny_run
    _, run, _ = resolve_run(str(path))
    model = load_student(run, root, torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert any("running_mean" in k for k in before)
    data = load_dataset("synthetic", image_size=16, **SMALL)
    out = train_linear_probe(model, data, QUICK, 0.05, seed=0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights or BN statistics moved"
    assert not model.training and all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert out["curve"]["epoch"] == [1, 2, 3] and out["curve"]["lr"] == pytest.approx([0.05, 0.05, 0.005])
    assert out["top1_last"] == out["curve"]["test_top1"][-1] and out["top1_best"] == max(out["curve"]["test_top1"])


class GridColours(torch.nn.Module):
    """A fixed backbone whose pooled features are the mean colours of a 4x4 grid (what tells synthetic classes
    apart), through a BatchNorm whose statistics must not move."""

    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(48)
        self.feature_info = type("FI", (), {"pooled_dim": 48})()

    def forward(self, x):
        pooled = self.bn(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))
        return type("Out", (), {"pooled": pooled})()


def test_probe_learns_from_informative_features():
    from kdbench.data import load_dataset

    model = GridColours()
    bn = {k: v.clone() for k, v in model.bn.state_dict().items()}
    data = load_dataset("synthetic", image_size=16, num_classes=5, train_size=400, test_size=200, seed=1)
    out = train_linear_probe(model, data, ProbeProtocol("t", 6, (4,), batch_size=32), 0.05, seed=0)
    assert out["top1_last"] > 80.0, out["curve"]  # chance is 20%
    assert out["curve"]["loss"][-1] < out["curve"]["loss"][0]
    assert all(torch.equal(bn[k], v) for k, v in model.bn.state_dict().items())


def test_run_probe_writes_a_json_linked_to_the_run(tiny_run):
    path, root = tiny_run
    _, run, _ = resolve_run(str(path))
    rec = run_probe(run, root, "synthetic", protocol=QUICK, dataset_options=SMALL, run_file=path)
    saved = Path(rec["path"])
    assert saved.parent == root / "probes" and saved.name.startswith(path.stem)
    on_disk = json.loads(saved.read_text())
    assert on_disk["run_id"] == run["run_id"] and on_disk["run_label"] == path.stem
    assert on_disk["dataset"]["name"] == "synthetic" and on_disk["dataset"]["num_classes"] == 5
    assert on_disk["protocol"]["name"] == "quick" and on_disk["backbone"]["mode"] == "eval"
    assert on_disk["top1_last"] == on_disk["curve"]["test_top1"][-1] and len(on_disk["curve"]["loss"]) == 3
    assert on_disk["published"] is None  # a synthetic run has no published transfer number
    again = run_probe(run, root, "synthetic", protocol=QUICK, dataset_options=SMALL, save=False)
    assert again["curve"] == on_disk["curve"]  # seeded: the same numbers twice

    from kdbench.report import write_report

    text = write_report(root, root / "report").read_text()
    assert "## Transfer (linear probe on frozen students)" in text
    assert "| resnet14:resnet8 | kd | 0 | synthetic |" in text


def test_cli_probe(tiny_run):
    from kdbench.cli import cli

    path, root = tiny_run
    run_id = path.stem.split("__")[-1]
    args = [
        "probe",
        run_id[:8],
        "--results",
        str(root),
        "--dataset",
        "synthetic",
        "--protocol",
        "smoke",
        "--device",
        "cpu",
    ]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "kd resnet14:resnet8 -> synthetic: top-1 last" in res.stdout
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0 and "already probed" in res.stdout
    res = CliRunner().invoke(cli, [*args[:4], "--dataset", "imagenet21k"])
    assert res.exit_code != 0 and "unknown dataset 'imagenet21k'" in str(res.exception)


# ---------------------------------------------------------------------------------------------- STL-10


def _write_stl10(root: Path, n_train: int = 6, n_test: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Fake stl10_binary files: images [N, 3, 96, 96] (row-major in memory) written column-major, as STL-10 is."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = []
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 3, 96, 96), dtype=np.uint8)
        images[:, 0, :10, :] = 255  # a bright band at the top of the red channel: orientation is checked below
        labels = (np.arange(n) % 10 + 1).astype(np.uint8)  # 1..10 on disk
        images.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")
        labels.tofile(folder / f"{split}_y.bin")
        out.append(images)
    return out[0], out[1]


def test_stl10_reader(tmp_path):
    from kdbench.data import load_dataset

    train, test = _write_stl10(tmp_path)
    ds = load_dataset("stl10", tmp_path, image_size=96)
    assert ds.name == "stl10" and ds.num_classes == 10 and ds.classes[0] == "airplane"
    assert torch.equal(ds.train_images, torch.from_numpy(train)) and torch.equal(ds.test_images, torch.from_numpy(test))
    assert ds.train_labels.tolist() == [0, 1, 2, 3, 4, 5]
    small = load_dataset("stl10", tmp_path)  # default: 32x32, like the CRD transfer experiment
    assert small.image_size == 32 and tuple(small.train_images.shape) == (6, 3, 32, 32)
    assert (small.train_images[:, 0, :3, :] == 255).all()  # the band is still at the top after resizing


def test_stl10_missing_says_where_it_looked(tmp_path):
    from kdbench.data import load_dataset

    with pytest.raises(KdbenchError, match=f"STL-10 not found: looked for {tmp_path / 'stl10_binary'}"):
        load_dataset("stl10", tmp_path)


# ---------------------------------------------------------------------------------------------- Tiny-ImageNet


@pytest.mark.slow
@pytest.mark.skipif(not TINY_IMAGENET.is_dir(), reason=f"no Tiny-ImageNet-100 copy at {TINY_IMAGENET}")
def test_probe_on_tiny_imagenet(tiny_run):
    """The smoke protocol on real Tiny-ImageNet-100 (2,000 train / 1,000 test images at 32x32); decoding the data
    takes about a minute the first time, then it comes from the ~/.cache/kdbench cache."""
    path, root = tiny_run
    _, run, _ = resolve_run(str(path))
    rec = run_probe(
        run, root, "tinyimagenet", protocol="smoke", data_root=TINY_IMAGENET, image_size=32, run_file=path, save=False
    )
    assert rec["dataset"]["num_classes"] == 100 and rec["dataset"]["image_size"] == 32
    assert (rec["dataset"]["train_size"], rec["dataset"]["test_size"]) == (2000, 1000)
    assert 0.0 <= rec["top1_last"] <= 100.0 and len(rec["curve"]["test_top1"]) == 2


# ---------------------------------------------------------------------------------------------- --all and the table


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, one_thread):
    """ce and kd at seeds 0 and 1 on the tiny bench, with the teacher's own run; the weights/ copy of the teacher's
    run removed (as in a folder where only teachers/ is kept) and one kd run's weights lost."""
    from kdbench.config import load_bench
    from kdbench.sweep import Request, Sweep, expand
    from tests.conftest import TINY_TOML

    root = tmp_path_factory.mktemp("probe-all")
    (root / "bench.toml").write_text(TINY_TOML)
    store = ResultStore(root / "results")
    specs = expand(load_bench(root / "bench.toml"), Request(["ce", "kd"], ["tiny"], [0, 1]), store)
    Sweep(store, torch.device("cpu")).run(specs)
    (teacher_card,) = store.teachers_dir.glob("*.json")
    teacher_run = json.loads(teacher_card.read_text())["run_id"]
    teacher_json = next(store.runs_dir.glob(f"*{teacher_run}.json"))
    (store.root / "weights" / teacher_json.with_suffix(".safetensors").name).unlink()
    lost = next(store.runs_dir.glob("*__kd__s1__*.json"))
    (store.root / "weights" / lost.with_suffix(".safetensors").name).unlink()
    return store.root, lost.name


def test_probe_all_and_the_transfer_table(tiny_sweep):
    from kdbench.cli import cli

    root, lost = tiny_sweep
    args = ["probe", "--all", "--results", str(root), "--dataset", "synthetic", "--protocol", "smoke"]
    res = CliRunner().invoke(cli, [*args, "--device", "cpu"])
    assert res.exit_code == 0, res.output
    # the teacher's own run (weights from its card in teachers/), ce at 2 seeds and kd seed 0; kd seed 1 is named
    assert "4 runs probed, 1 skipped" in res.stdout
    assert lost in res.stdout and "not found" in res.stdout
    again = CliRunner().invoke(cli, [*args, "--device", "cpu"])
    assert again.exit_code == 0 and "0 runs probed, 1 skipped" in again.stdout  # nothing probed twice
    records = {json.loads(p.read_text())["run_id"]: json.loads(p.read_text()) for p in (root / "probes").glob("*")}
    assert len(records) == 4

    res = CliRunner().invoke(cli, ["table", "--results", str(root), "--transfer"])
    assert res.exit_code == 0, res.output
    lines = [line for line in res.stdout.splitlines() if line.startswith("| resnet14:resnet8")]
    assert [line.split(" | ")[1] for line in lines] == ["Teacher", "Student (ce)", "kd"]
    kd = next(r for r in records.values() if r["method"] == "kd")
    ce0 = next(r for r in records.values() if r["method"] == "ce" and r["seed"] == 0)
    assert lines[2].split(" | ")[2] == "0"  # kd: seed 0 only
    assert lines[2].split(" | ")[4] == f"{kd['top1_last']:.2f}"
    assert lines[2].rstrip(" |").split(" | ")[-1] == f"{kd['top1_last'] - ce0['top1_last']:+.2f}"
    assert lines[1].split(" | ")[2] == "0, 1"

    bad = CliRunner().invoke(cli, ["probe", "--results", str(root), "--dataset", "synthetic"])
    assert isinstance(bad.exception, KdbenchError) and "give one RUN" in str(bad.exception)
    bad = CliRunner().invoke(cli, ["table", "--results", str(root), "--transfer", "--vs", "kd"])
    assert isinstance(bad.exception, KdbenchError) and "--transfer" in str(bad.exception)


def test_probe_all_with_a_bad_data_root_is_one_error(tiny_sweep, tmp_path):
    """The probe data is loaded once before any run: a missing data set stops at once (not one skip per run)."""
    from kdbench.cli import cli

    root, _ = tiny_sweep
    res = CliRunner().invoke(
        cli, ["probe", "--all", "--results", str(root), "--dataset", "stl10", "--data-root", str(tmp_path / "none")]
    )
    assert isinstance(res.exception, KdbenchError) and "STL-10 not found" in str(res.exception)


def test_transfer_tables_keep_training_protocols_apart():
    """Two probes of kd seed 0 trained under two protocols are two tables, never one averaged cell; a second probe of
    the same seed in one cell is named and left out; a probed teacher that teaches no probed student has a table."""
    import pandas as pd

    from kdbench.tables import Collected
    from kdbench.transfer import build_transfer

    def run(run_id, method, group, seed=0, teacher="resnet14", student="resnet8"):
        return {"run_id": run_id, "method": method, "group": group, "seed": seed, "teacher": teacher,
                "student": student, "data": "synthetic", "top1_last": 50.0}  # fmt: skip

    runs = pd.DataFrame(
        [
            run("a", "kd", "synthetic@16 / fast"),
            run("b", "kd", "synthetic@16 / paper"),
            run("c", "kd", "synthetic@16 / paper"),
            run("t", "ce", "synthetic@16 / teacher", teacher=None, student="resnet32"),
        ]
    )
    col = Collected(runs, pd.DataFrame(), teacher_runs={"t"})

    def probe(run_id, top1, name):
        data, proto = {"name": "synthetic", "num_classes": 5}, {"name": "smoke", "epochs": 2}
        return {"run_id": run_id, "top1_last": top1, "_file": name, "probe_seed": 0, "dataset": data, "protocol": proto}

    tables = build_transfer(
        col, [probe("a", 30.0, "a"), probe("b", 40.0, "b"), probe("c", 45.0, "c"), probe("t", 9, "t")]
    )
    by_title = {t.title.split(" -> ")[0]: t for t in tables}
    assert set(by_title) == {"synthetic@16 / fast", "synthetic@16 / paper", "synthetic@16 / teacher"}
    assert by_title["synthetic@16 / fast"].rows[0].target.values == {0: 30.0}
    paper = by_title["synthetic@16 / paper"]
    assert paper.rows[0].target.values == {0: 40.0} and any("second probe of kd seed 0" in s for s in paper.skipped)
    assert by_title["synthetic@16 / teacher"].rows[0].row == "Teacher"
