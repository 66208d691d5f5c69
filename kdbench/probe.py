"""Transfer by linear probe (CRD, ICLR 2020, Table 4): how well do a distilled student's features carry over?

The student of a finished run is loaded from its weights and frozen for good: eval mode (BatchNorm keeps the
statistics it learned on its own training data; one public reference script lets them drift) and no gradients.
A linear classifier is trained on its pooled features of another data set. As in the reference, the features are
recomputed for every augmented batch (random crop + flip done batched by ``GPULoader``); the test split is not
augmented, so its features are computed once. The last epoch's top-1 is the reported number.

Inputs are normalised with the probe data set's own channel statistics, computed on its training split.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.files import atomic_write_json
from kdbench.results import ResultStore, load_run
from kdbench.system import environment

PROBE_SCHEMA = 1
SMALL_LR_STUDENTS = ("mobilenetv2", "shufflenetv1", "shufflenetv2")
PAPER_CLASSES = {"stl10": 10, "tinyimagenet": 200}  # the data of the published transfer numbers


@dataclass(frozen=True)
class ProbeProtocol:
    """The linear-probe recipe of the CRD transfer experiment, and shorter variants of it."""

    name: str
    epochs: int
    milestones: tuple[int, ...]
    batch_size: int = 64
    lr: float = 0.05
    lr_small: float = 0.01  # MobileNetV2 / ShuffleNet students
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_decay: float = 0.1
    max_train: int | None = None  # a fixed random subset of the training split (smoke only)
    max_test: int | None = None

    def lr_at(self, base: float, epoch: int) -> float:
        """x lr_decay after each milestone (epochs count from 0: milestone 30 = from the 31st epoch on)."""
        return base * self.lr_decay ** sum(epoch >= m for m in self.milestones)


PROBE_PROTOCOLS = {
    "paper": ProbeProtocol("paper", 120, (30, 60, 90)),
    "fast": ProbeProtocol("fast", 20, (5, 10, 15)),  # the same fractions of the schedule
    "smoke": ProbeProtocol("smoke", 2, (1,), max_train=2000, max_test=1000),
}


def resolve_run(run: str, results: str | Path | None = None) -> tuple[Path, dict[str, Any], Path]:
    """(JSON path, run, results root) from a run JSON path or a prefix of a run id (or of its file name)."""
    path = Path(run)
    if path.suffix == ".json" and path.is_file():
        obj = load_run(path)
        if results is not None:
            root = Path(results)
        elif path.resolve().parent.name == "runs":
            root = path.resolve().parent.parent
        else:
            raise KdbenchError(f"{path} is not inside a results folder's runs/: pass --results DIR")
        return path, obj, root
    store = ResultStore(results if results is not None else "results")
    if not store.runs_dir.is_dir():
        raise KdbenchError(f"{run!r} is not a run JSON file, and {store.runs_dir} does not exist: pass --results DIR")
    hits = [
        p
        for p in sorted(store.runs_dir.glob("*.json"))
        if p.stem.split("__")[-1].startswith(run) or p.stem.startswith(run)
    ]
    if not hits:
        raise KdbenchError(f"no run whose id or file name starts with {run!r} in {store.runs_dir}")
    if len(hits) > 1:
        names = ", ".join(p.stem for p in hits[:5]) + (f" and {len(hits) - 5} more" if len(hits) > 5 else "")
        raise KdbenchError(f"{run!r} matches {len(hits)} runs ({names}): give more of the run id")
    return hits[0], load_run(hits[0]), store.root


class MissingWeights(KdbenchError):
    """A run that has no weights to probe (not finished, none recorded, or the file is gone)."""


def probe_image_size(run: dict[str, Any], image_size: int | None = None) -> int:
    """The image size a run is probed at: the one asked for, else the run's own, else 32."""
    return image_size or (run.get("data") or {}).get("image_size") or 32


def load_student(run: dict[str, Any], root: Path, device: torch.device) -> nn.Module:
    """The run's trained student, frozen: eval mode and requires_grad False on every parameter."""
    from kdbench.models import create_model, freeze
    from kdbench.teachers import load_weights_into

    if run["status"] != "done":
        raise MissingWeights(f"run {run['run_id']} is {run['status']}: only a finished run has weights to probe")
    rel = run.get("weights")
    if not rel:
        raise MissingWeights(f"run {run['run_id']} records no weights file")
    store = ResultStore(root)
    weights = store.inside(rel, f"weights of run {run['run_id']}")
    if not weights.is_file():
        weights = _teacher_weights(store, run) or weights
    if not weights.is_file():
        raise MissingWeights(f"weights of run {run['run_id']} not found at {weights}")
    num_classes = (run.get("data") or {}).get("num_classes")
    if not isinstance(num_classes, int):
        raise KdbenchError(f"run {run['run_id']} does not record its class count (data.num_classes)")
    model = create_model(run["spec"]["student"], num_classes=num_classes)
    load_weights_into(model, weights, "run weights", prefix=(run.get("model") or {}).get("student_prefix") or "")
    return freeze(model, device)


def _teacher_weights(store: ResultStore, run: dict[str, Any]) -> Path | None:
    """A teacher's own training run keeps its weights in teachers/ (the card's file, which is committed where the
    runs' weights/ folder is not): that file, when a card names this run and holds the same weights."""
    import json

    from kdbench.teachers import sha256_file

    want = run.get("weights_sha256")
    folder = store.teachers_dir
    for card_path in sorted(folder.glob("*.json")) if folder.is_dir() and want else []:
        try:
            card = json.loads(card_path.read_text())
        except (OSError, ValueError, RecursionError):
            continue
        if not isinstance(card, dict) or card.get("run_id") != run["run_id"] or card.get("weights_sha256") != want:
            continue
        try:
            rel = card.get("weights")
            path = store.inside(f"{folder.name}/{rel}" if isinstance(rel, str) else rel, "teacher weights")
        except KdbenchError:
            continue
        if path.is_file() and sha256_file(path) == want:
            return path
    return None


@torch.no_grad()
def _features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(images).pooled.float()


def _subset(n: int, k: int | None, seed: int) -> torch.Tensor | None:
    if k is None or k >= n:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:k].sort().values


def probe_label(run_label: str, dataset: str, protocol: str, seed: int) -> str:
    return f"{run_label}__probe-{dataset}__{protocol}__s{seed}"


def train_linear_probe(
    model: nn.Module,
    data: Any,
    proto: ProbeProtocol,
    base_lr: float,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    head_seed: int | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Train a linear head on the pooled features of a frozen `model` (kept in eval mode, never updated) over
    `data` (a kdbench Dataset, already subsampled if wanted); returns the curve and the last and best top-1."""
    from kdbench.models import freeze
    from kdbench.seeds import derive_seed

    device = torch.device(device)
    freeze(model)
    pooled_dim = model.feature_info.pooled_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "probe-head") if head_seed is None else head_seed)
        head = nn.Linear(pooled_dim, data.num_classes)
    head.to(device)
    opt = torch.optim.SGD(head.parameters(), lr=base_lr, momentum=proto.momentum, weight_decay=proto.weight_decay)
    pad = max(1, data.image_size // 8)  # 4 at 32x32, as in the CIFAR recipe
    loader = data.train_loader(proto.batch_size, seed=derive_seed(seed, "probe-data"), device=device, pad=pad)
    test_loader = data.test_loader(256, device=device)
    test_feats = torch.cat([_features(model, b.images) for b in test_loader.epoch(0)])
    test_labels = test_loader.labels

    curve: dict[str, list[float]] = {"epoch": [], "lr": [], "loss": [], "train_top1": [], "test_top1": []}
    best, best_epoch, epoch_seconds = -1.0, 0, []
    for epoch in range(proto.epochs):
        t0 = time.perf_counter()
        lr = proto.lr_at(base_lr, epoch)
        for g in opt.param_groups:
            g["lr"] = lr
        head.train()
        loss_sum = torch.zeros((), device=device)
        hits = torch.zeros((), device=device)
        for batch in loader.epoch(epoch):
            logits = head(_features(model, batch.images))
            loss = F.cross_entropy(logits, batch.labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(batch.labels)
            hits += logits.detach().argmax(1).eq(batch.labels).sum()
        head.eval()
        with torch.no_grad():
            top1 = 100.0 * head(test_feats).argmax(1).eq(test_labels).float().mean().item()
        n = loader.num_samples
        curve["epoch"].append(epoch + 1)
        curve["lr"].append(lr)
        curve["loss"].append(float(loss_sum) / n)
        curve["train_top1"].append(100.0 * float(hits) / n)
        curve["test_top1"].append(top1)
        if top1 > best:
            best, best_epoch = top1, epoch + 1
        epoch_seconds.append(time.perf_counter() - t0)
        log(f"epoch {epoch + 1}/{proto.epochs}: loss {curve['loss'][-1]:.3f}, test top-1 {top1:.2f}")
    return {
        "curve": curve,
        "top1_last": curve["test_top1"][-1] if curve["test_top1"] else None,
        "top1_best": best if best >= 0 else None,
        "best_epoch": best_epoch,
        "epoch_seconds": epoch_seconds,
        "pooled_dim": pooled_dim,
    }


def run_probe(
    run: dict[str, Any],
    root: Path,
    dataset: str,
    *,
    protocol: str | ProbeProtocol = "paper",
    data_root: str | Path | None = None,
    image_size: int | None = None,
    download: bool = False,
    device: torch.device | str = "cpu",
    seed: int = 0,
    dataset_options: dict[str, Any] | None = None,
    run_file: Path | None = None,
    save: bool = True,
    log: Callable[[str], None] = lambda s: None,
    data: Any = None,
) -> dict[str, Any]:
    """Train and evaluate the linear probe of one finished run; returns (and by default saves) its record.

    ``data``: the probe data set already loaded (at the run's probe image size), e.g. once for many runs."""
    from kdbench.data import Dataset, load_dataset
    from kdbench.seeds import derive_seed
    from kdbench.tables import PAPER_NAMES, load_transfer_reference

    proto = PROBE_PROTOCOLS.get(protocol) if isinstance(protocol, str) else protocol
    if proto is None:
        raise KdbenchError(f"unknown probe protocol {protocol!r}; valid: {', '.join(PROBE_PROTOCOLS)}")
    device = torch.device(device)
    model = load_student(run, root, device)
    size = probe_image_size(run, image_size)
    if data is None:
        data = load_dataset(dataset, data_root, image_size=size, download=download, **(dataset_options or {}))
    train_x, train_y, test_x, test_y = data.train_images, data.train_labels, data.test_images, data.test_labels
    if (idx := _subset(len(train_y), proto.max_train, derive_seed(seed, "probe-train-subset"))) is not None:
        train_x, train_y = train_x[idx], train_y[idx]
    if (idx := _subset(len(test_y), proto.max_test, derive_seed(seed, "probe-test-subset"))) is not None:
        test_x, test_y = test_x[idx], test_y[idx]
    # The subset keeps the full split's normalisation statistics and identity (checksum).
    probe_data = Dataset(
        data.name,
        train_x,
        train_y,
        test_x,
        test_y,
        data.classes,
        data.mean,
        data.std,
        data.checksum,
        class_ids=data.class_ids,
        source=data.source,
    )

    student = run["spec"]["student"]
    small = tuple(run["spec"].get("protocol", {}).get("small_lr_students", SMALL_LR_STUDENTS))
    base_lr = proto.lr_small if student in small else proto.lr
    log(
        f"probe {run['spec']['method']} {student} on {data.name} ({len(train_y)} train / {len(test_y)} test, "
        f"{proto.name}: {proto.epochs} epochs, lr {base_lr})"
    )
    out = train_linear_probe(
        model,
        probe_data,
        proto,
        base_lr,
        seed=seed,
        device=device,
        head_seed=derive_seed(seed, run["run_id"], "probe-head"),
        log=log,
    )
    curve, pooled_dim, epoch_seconds = out["curve"], out["pooled_dim"], out["epoch_seconds"]

    teacher = (run["spec"].get("teacher") or {}).get("arch")
    paper_method = PAPER_NAMES.get(run["spec"]["method"])
    published = None
    if (run.get("data") or {}).get("name") == "cifar100" and teacher and paper_method:
        published = load_transfer_reference().get((teacher, student, paper_method, dataset))
    comparable = (
        PAPER_CLASSES.get(dataset) == data.num_classes
        and data.image_size == 32
        and proto.epochs == PROBE_PROTOCOLS["paper"].epochs
        and proto.max_train is None
    )
    run_label = (
        run_file.stem
        if run_file is not None
        else f"{run['spec']['data']['name']}__{teacher or 'none'}__{student}__{run['spec']['method']}__"
        f"s{run['spec']['seed']}__{run['run_id']}"
    )
    record = {
        "schema": PROBE_SCHEMA,
        "kind": "linear_probe",
        "run_id": run["run_id"],
        "run_label": run_label,
        "pair": run.get("pair", f"{teacher or '-'}:{student}"),
        "method": run["spec"]["method"],
        "student": student,
        "teacher": teacher,
        "seed": run["spec"]["seed"],
        "probe_seed": seed,
        "source_data": (run.get("data") or {}).get("name"),
        "dataset": {
            "name": data.name,
            "checksum": data.checksum,
            "num_classes": data.num_classes,
            "image_size": data.image_size,
            "train_size": len(train_y),
            "test_size": len(test_y),
            "mean": list(data.mean),
            "std": list(data.std),
            "source": data.source,
        },
        "protocol": dataclasses.asdict(proto),
        "lr": base_lr,
        "backbone": {"frozen": True, "mode": "eval", "features": "pooled", "pooled_dim": pooled_dim},
        "top1_last": out["top1_last"],
        "top1_best": out["top1_best"],
        "best_epoch": out["best_epoch"],
        "published": published,
        "published_comparable": comparable if published is not None else None,
        "published_note": (
            f"published probe (CRD Table 4 / RRD paper) on {PAPER_CLASSES.get(dataset)}-class "
            f"{dataset} at 32x32, 120 epochs; this probe: {data.num_classes} classes, "
            f"{data.image_size}px, {proto.epochs} epochs"
        )
        if published is not None
        else None,
        "curve": curve,
        "timings": {"epoch_seconds": epoch_seconds, "total_seconds": sum(epoch_seconds)},
        "environment": environment(device),
    }
    if save:
        path = ResultStore(root).probe_path(probe_label(run_label, data.name, proto.name, seed))
        atomic_write_json(path, record)
        record["path"] = str(path)
    return record
