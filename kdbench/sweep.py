"""From a command line to finished runs: expand the spec, skip what is done, train teachers, train cohorts."""

from __future__ import annotations

import dataclasses
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

import torch

from kdbench.config import (Bench, DataSpec, Protocol, RunSpec, TeacherSpec, apply_protocol_sets, check_safe_name,
                            method_sets, parse_sets)
from kdbench.data import Dataset, load_dataset
from kdbench.errors import KdbenchError
from kdbench.method import MethodEntry, discover, make_config, resolve
from kdbench.models.base import check_model_name
from kdbench.progress import RunLogs, SweepMeter
from kdbench.results import ResultStore
from kdbench.teachers import TeacherStore, sha256_file
from kdbench.train import (Member, build_member, load_checkpoint, not_applicable_reason, result_record,
                           run_init_stage, train_cohort)

# The modern baselines (issue 16): registered like every method, but outside `--methods all`, which keeps meaning
# the mission's methods and their variants (plus installed plugins).
MODERN = ["dkd", "dkd-ls", "kd-ls", "dist", "reviewkd", "simkd", "ofd"]
BUILTIN_ORDER = ["ce", "kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst", "crd",
                 "crd+kd", "crcd", "rrd", "rrd+kd", "rrd-2025", *MODERN]
# Named groups of --methods: name -> (description, members given the registry).
GROUPS: dict[str, str] = {
    "all": "the mission's methods and their variants, and installed plugins (not the modern group)",
    "modern": "the modern baselines that came after CRD",
    "everything": "all + modern",
}


def method_order(names: list[str]) -> list[str]:
    rank = {n: i for i, n in enumerate(BUILTIN_ORDER)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def all_methods(registry: dict[str, MethodEntry] | None = None) -> list[str]:
    """The group `all`: every method that loads, except the modern group."""
    registry = discover() if registry is None else registry
    return method_order([n for n, e in registry.items() if e.ok and n not in MODERN])


def group_members(group: str, registry: dict[str, MethodEntry] | None = None) -> list[str]:
    """The methods of a named group (`all`, `modern`, `everything`)."""
    registry = discover() if registry is None else registry
    if group == "all":
        return all_methods(registry)
    if group == "modern":
        return [n for n in MODERN if n in registry]
    if group == "everything":
        return method_order(all_methods(registry) + [n for n in MODERN if n in registry])
    raise KeyError(group)


@dataclass
class Request:
    """What the user asked for on the command line."""

    methods: list[str]
    pairs: list[str]
    seeds: list[int] | None = None
    protocol: str | None = None
    sets: list[str] = field(default_factory=list)
    dataset: str | None = None  # for pairs named on the command line
    data_root: str | None = None
    image_size: int | None = None


def _split_csv(items: list[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        out += [p.strip() for p in item.split(",") if p.strip()]
    return out


def expand(bench: Bench, req: Request, store: ResultStore | None = None) -> list[RunSpec]:
    """One RunSpec per (pair, method, seed); every name is checked first, so bad input fails before any work."""
    registry = discover()
    names = _split_csv(req.methods)
    if not names:
        raise KdbenchError("no methods given: use --methods all or a list such as ce,kd")
    if any(n in GROUPS for n in names):
        expanded: list[str] = []
        for n in names:
            expanded += group_members(n, registry) if n in GROUPS else [n]
        names = expanded
    entries = {n: resolve(check_safe_name("method", n), registry) for n in dict.fromkeys(names)}

    sets = parse_sets(req.sets)
    per_method = method_sets(sets)
    for name in per_method:
        if name not in entries:
            raise KdbenchError(f"--set methods.{name}.*: method {name!r} is not in this run ({', '.join(entries)})")
    for name in bench.methods:
        if name not in registry and not (name.endswith("+kd") and name[:-3] in registry):
            raise KdbenchError(f"{bench.source}: [methods.{name}]: unknown method")

    seeds = list(req.seeds) if req.seeds is not None else list(bench.seeds)
    if not seeds or any(s < 0 for s in seeds):
        raise KdbenchError("--seeds must be non-negative integers, e.g. --seeds 0,1,2")

    from kdbench.data import DATASETS

    if req.dataset is not None and req.dataset not in DATASETS:
        raise KdbenchError(f"unknown dataset {req.dataset!r}; datasets: {', '.join(DATASETS)}")
    # (pair set, data, pair, student protocol, teacher protocol)
    groups: list[tuple[str, DataSpec, str, Protocol, Protocol]] = []
    pair_names = _split_csv(req.pairs)
    if not pair_names:
        raise KdbenchError("no pairs given: use --pairs cifar100, smoke, or teacher:student")
    for pname in pair_names:
        if ":" in pname:
            t, s = pname.split(":", 1)
            check_model_name(t)
            check_model_name(s)
            data = DataSpec(req.dataset or "cifar100", req.data_root, req.image_size)
            proto = _protocol(bench, req.protocol or bench.protocol, sets)
            groups.append((pname, data, pname, proto, proto))
            continue
        if pname not in bench.pair_sets:
            import difflib

            close = difflib.get_close_matches(pname, list(bench.pair_sets), n=2, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else f"pair sets: {', '.join(bench.pair_sets)}"
            raise KdbenchError(f"unknown pair set {pname!r} ({hint}); or name a pair as teacher:student")
        ps = bench.pair_sets[pname]
        data = ps.data
        if req.data_root:
            data = dataclasses.replace(data, data_root=req.data_root)
        if req.image_size:
            data = dataclasses.replace(data, image_size=req.image_size)
        proto = _protocol(bench, req.protocol or ps.protocol or bench.protocol, sets)
        # A pair set may train its teachers longer than its students (teacher_protocol); --protocol and
        # --set protocol.* then change the students' protocol only.
        t_proto = bench.protocols[ps.teacher_protocol] if ps.teacher_protocol and not req.protocol else proto
        for pair in ps.pairs:
            t, s = pair.split(":", 1)
            check_model_name(t)
            check_model_name(s)
            groups.append((pname, data, pair, proto, t_proto))

    teachers = TeacherStore(store) if store is not None else None
    specs: list[RunSpec] = []
    seen: set[str] = set()
    for set_name, data, pair, proto, t_proto in groups:
        t_arch, s_arch = pair.split(":", 1)
        for seed in seeds:
            for name, entry in entries.items():
                values = {**bench.methods.get(name, {}), **per_method.get(name, {})}
                cfg = make_config(entry, values)
                tspec = None
                if entry.cls.requires_teacher or cfg.kd_weight:
                    tspec = TeacherSpec(t_arch, data, t_proto, bench.teacher_seed)
                    imported = teachers.imported_card(t_arch, data) if teachers else None
                    if imported is not None:
                        tspec = dataclasses.replace(tspec, imported=imported["weights_sha256"])
                spec = RunSpec(s_arch, name, dataclasses.asdict(cfg), seed, proto, data, tspec, pair_set=set_name)
                if spec.run_id not in seen:  # ce runs are shared by pairs with the same student
                    seen.add(spec.run_id)
                    specs.append(spec)
    return specs


def _protocol(bench: Bench, name: str, sets: dict[str, Any]) -> Protocol:
    if name not in bench.protocols:
        raise KdbenchError(f"unknown protocol {name!r}; protocols: {', '.join(bench.protocols)}")
    return apply_protocol_sets(bench.protocols[name], sets)


def teacher_run(tspec: TeacherSpec) -> RunSpec:
    """The vanilla run that trains a teacher."""
    cfg = make_config(resolve("ce"))
    return RunSpec(tspec.arch, "ce", dataclasses.asdict(cfg), tspec.seed, tspec.protocol, tspec.data, None,
                   pair_set="teachers")


# ---------------------------------------------------------------------------------------------- execution


class DataCache:
    def __init__(self, download: bool = False):
        self.download = download
        self._cache: dict[DataSpec, Dataset] = {}

    def get(self, spec: DataSpec) -> Dataset:
        if spec not in self._cache:
            self._cache[spec] = load_dataset(spec.name, spec.data_root, image_size=spec.image_size,
                                             download=self.download, **spec.kwargs())
        return self._cache[spec]


@dataclass
class SweepReport:
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    not_applicable: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class Sweep:
    """Trains a list of RunSpecs into a results folder; rerunning finishes exactly what is missing."""

    def __init__(self, store: ResultStore, device: torch.device, *, cohort: bool = True, download: bool = False,
                 progress: Any = None, log: Callable[[str], None] = lambda s: None,
                 echo: Callable[[str], None] | None = None):
        """``log`` gets the sweep's own messages; ``echo`` (when given) every per-epoch line, which also goes to
        ``runs/<label>.log`` beside each run's JSON."""
        self.store = store
        self.teachers = TeacherStore(store)
        self.device = device
        self.cohort = cohort
        self.data = DataCache(download)
        self.progress = progress
        self.log = log
        self.logs = RunLogs(store.runs_dir, echo)

    def preload(self, specs: list[RunSpec]) -> None:
        """Load every dataset the unfinished runs need (bad data roots fail here, before any file is written)."""
        for spec in {s.data: s for s in self.pending(specs)}.values():
            self.data.get(spec.data)

    def pending(self, specs: list[RunSpec]) -> list[RunSpec]:
        return [s for s in specs if self.store.finished(s.label) is None]

    def teachers_to_train(self, specs: list[RunSpec]) -> list[TeacherSpec]:
        """The teachers that unfinished runs need and that are neither stored nor imported: trained first."""
        out: dict[str, TeacherSpec] = {}
        for s in self.pending(specs):
            t = s.teacher
            if t is not None and not t.imported and t.label not in out and self.teachers.card(t) is None:
                out[t.label] = t
        return list(out.values())

    def run(self, specs: list[RunSpec]) -> SweepReport:
        report = SweepReport()
        todo = []
        for s in specs:
            if self.store.finished(s.label) is not None:
                report.skipped.append(s.label)
            else:
                todo.append(s)
        groups: dict[tuple, list[RunSpec]] = defaultdict(list)
        for s in todo:
            groups[s.cohort_key].append(s)
        meter = self.logs.meter = SweepMeter()
        for t in self.teachers_to_train(todo):
            meter.plan(teacher_run(t).label, t.arch, t.protocol.epochs)
        for s in todo:
            meter.plan(s.label, s.student, s.protocol.epochs)
        if self.progress is not None:
            self.logs.progress = self.progress
            self.logs.task = self.progress.add_task("sweep", total=max(meter.total_epochs, 1))
            self.logs.refresh()
        for group in groups.values():
            batches = [group] if self.cohort else [[s] for s in group]
            for cohort in batches:
                self._run_cohort(cohort, report)
        return report

    # -- teachers

    def teacher(self, tspec: TeacherSpec, data: Dataset) -> tuple[torch.nn.Module, dict[str, Any]]:
        if tspec.imported:
            model, card = self.teachers.load_imported(tspec.arch, tspec.data, data.num_classes, self.device)
            if card.get("weights_sha256") != tspec.imported:
                raise KdbenchError(f"imported teacher {tspec.label} changed since the runs were planned; rerun")
            return model, card
        waited = False
        while self.teachers.card(tspec) is None:
            lock = self.store.lock(f"teacher__{tspec.label}")
            if lock.acquire():
                try:
                    if self.teachers.card(tspec) is None:
                        self._train_teacher(tspec, data)
                finally:
                    lock.release()
            else:  # another process trains this teacher: wait for its card (a dead holder's lock goes stale)
                if not waited:
                    self.log(f"waiting for another process to train teacher {tspec.arch}")
                    waited = True
                time.sleep(2.0)
        return self.teachers.load(tspec, data.num_classes, self.device)

    def _train_teacher(self, tspec: TeacherSpec, data: Dataset) -> None:
        spec = teacher_run(tspec)
        done = self.store.finished(spec.label)
        weights = self.store.root / "weights" / f"{spec.label}.safetensors"
        if done is not None and done["status"] == "done" and weights.is_file():
            # The vanilla run of this architecture exists already: its weights are the teacher.
            from kdbench.models import create_model
            from kdbench.teachers import load_weights_into

            model = create_model(tspec.arch, num_classes=data.num_classes)
            load_weights_into(model, weights, "run weights")
            self.teachers.save(tspec, model, self._card(tspec, data, spec, done["metrics"]))
            return
        self.log(f"training teacher {tspec.arch} on {data.name} ({tspec.protocol.name} protocol, seed {tspec.seed})")
        rep = SweepReport()
        members = self._run_cohort([spec], rep, teacher_for=tspec)
        if rep.failed or rep.busy or not members:
            raise KdbenchError(f"teacher {tspec.arch} could not be trained ({'; '.join(rep.failed + rep.busy)})")

    # -- cohorts

    def _run_cohort(self, specs: list[RunSpec], report: SweepReport,
                    teacher_for: TeacherSpec | None = None) -> list[Member]:
        data = self.data.get(specs[0].data)
        tspec = specs[0].teacher
        teacher, card = (self.teacher(tspec, data) if tspec is not None else (None, None))
        members: list[Member] = []
        locks = []
        try:
            for spec in specs:
                if self.store.finished(spec.label) is not None and teacher_for is None:
                    report.skipped.append(spec.label)
                    continue
                reason = not_applicable_reason(spec, data, teacher)
                if reason is not None:
                    self._write_na(spec, data, card, reason)
                    report.not_applicable.append(spec.label)
                    self.logs.meter.run_done(spec.label)
                    continue
                lock = self.store.lock(spec.label)
                if not lock.acquire():
                    report.busy.append(f"{spec.label} (being trained by another process)")
                    self.logs.meter.run_done(spec.label)
                    continue
                locks.append(lock)
                m = build_member(spec, data, teacher, self.device)
                m.checkpoint_path = self.store.checkpoint_path(spec.label)
                if load_checkpoint(m):
                    self.logs.meter.start(spec.label, m.epoch)
                    self.logs.note([spec], f"resumed at epoch {m.epoch}/{spec.protocol.epochs}")
                members.append(m)
            for m in members:
                if m.method.init_stage() is not None:
                    run_init_stage(m, data, teacher, self.device)
            by_epoch: dict[int, list[Member]] = defaultdict(list)
            for m in members:
                by_epoch[m.epoch].append(m)
            on_epoch = self.logs.cohort(members, len(data.train_labels))
            for _, cohort in sorted(by_epoch.items()):
                train_cohort(cohort, data, teacher, self.device, progress=self.progress, on_epoch=on_epoch)
            t_pred = None
            if teacher is not None and any(m.failed is None for m in members):
                from kdbench.evaluate import predict_test_split

                t_pred = predict_test_split(teacher, data, self.device)
            for m in members:
                self._finish(m, data, teacher, card, len(members), report, teacher_for, t_pred)
        finally:
            for lock in locks:
                lock.release()
        return members

    def _finish(self, m: Member, data: Dataset, teacher, card, cohort_size: int, report: SweepReport,
                teacher_for: TeacherSpec | None, teacher_predictions=None) -> None:
        from kdbench.evaluate import final_metrics

        extra = {}
        if m.failed is None:
            extra = final_metrics(m.evaluated, teacher, data, self.device, teacher_predictions)
        diagnostics = {"corr_diff": extra.pop("corr_diff")} if "corr_diff" in extra else {}
        record = result_record(m, data, card, self.device, cohort_size, extra)
        if diagnostics:
            record["diagnostics"] = diagnostics
        if m.failed is None:
            from kdbench.teachers import save_weights

            weights = self.store.root / "weights" / f"{m.spec.label}.safetensors"
            save_weights(weights, m.evaluated.state_dict())
            record["weights"] = str(weights.relative_to(self.store.root))
            record["weights_sha256"] = sha256_file(weights)
        # The run JSON first, the teacher card last: killed in between, the next call finds the finished run and
        # makes the card from its weights (_train_teacher), so neither is lost.
        self.store.write_run(m.spec.label, record)
        if teacher_for is not None and m.failed is None:
            self.teachers.save(teacher_for, m.student, self._card(teacher_for, data, m.spec, record["metrics"]))
        if m.checkpoint_path is not None:
            Path(m.checkpoint_path).unlink(missing_ok=True)
        (report.failed if m.failed else report.trained).append(m.spec.label if not m.failed
                                                               else f"{m.spec.label}: {m.failed}")
        self.logs.meter.run_done(m.spec.label)
        top1 = record["metrics"].get("top1_last")
        self.logs.note([m.spec], f"failed: {m.failed}" if m.failed else
                       f"done: top1_last {top1:.2f} -> {self.store.run_path(m.spec.label).name}")
        self.logs.refresh()

    @staticmethod
    def _card(tspec: TeacherSpec, data: Dataset, spec: RunSpec, metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "arch": tspec.arch, "dataset": data.name, "image_size": data.image_size, "data_checksum": data.checksum,
            "protocol": tspec.protocol.name, "seed": tspec.seed, "source": "trained", "run_id": spec.run_id,
            "top1": metrics["top1_last"], "top5": metrics["top5_last"], "top1_best": metrics["top1_best"],
        }

    def _write_na(self, spec: RunSpec, data: Dataset, card, reason: str) -> None:
        from kdbench.results import SCHEMA_VERSION, environment

        entry = resolve(spec.method)
        self.store.write_run(spec.label, {
            "schema": SCHEMA_VERSION, "run_id": spec.run_id, "status": "n/a", "reason": reason,
            "spec": spec.to_dict(), "pair": spec.pair,
            "method": {"name": spec.method, "dist": entry.dist, "version": entry.version, "paper": entry.cls.paper,
                       "config": dict(spec.method_config)},
            "teacher": card, "data": {"name": data.name, "checksum": data.checksum}, "metrics": {},
            "environment": environment(self.device),
        })


# ---------------------------------------------------------------------------------------------- executors


def _stderr_line(line: str) -> None:
    import sys

    print(line, file=sys.stderr, flush=True)


def _worker(root: str, device: str, specs: list[RunSpec], cohort: bool, download: bool, threads: int,
            echo: bool = False) -> SweepReport:
    if threads:
        torch.set_num_threads(threads)
    return Sweep(ResultStore(root), torch.device(device), cohort=cohort, download=download,
                 echo=_stderr_line if echo else None).run(specs)


def run_local(store: ResultStore, specs: list[RunSpec], devices: list[str], *, cohort: bool = True,
              download: bool = False, progress: Any = None, log: Callable[[str], None] = lambda s: None,
              echo: Callable[[str], None] | None = None) -> SweepReport:
    """The local executor: one worker per device (each GPU, or N CPU workers), coordinated only through the run
    locks of the results folder, so workers, and other processes on the same folder, never train a run twice."""
    if len(devices) <= 1:
        return Sweep(store, torch.device(devices[0] if devices else "cpu"), cohort=cohort, download=download,
                     progress=progress, log=log, echo=echo).run(specs)
    import concurrent.futures as cf
    import multiprocessing as mp

    # Each worker starts at a different cohort so they do not queue behind one another's locks.
    keys = list(dict.fromkeys(s.cohort_key for s in specs))
    cpu_threads = max(1, (os.cpu_count() or 1) // len(devices)) if devices[0] == "cpu" else 0
    merged = SweepReport()
    with cf.ProcessPoolExecutor(len(devices), mp_context=mp.get_context("spawn")) as pool:
        futures = []
        for i, dev in enumerate(devices):
            order = keys[i * len(keys) // len(devices):] + keys[: i * len(keys) // len(devices)]
            rank = {k: j for j, k in enumerate(order)}
            mine = sorted(specs, key=lambda s: rank[s.cohort_key])
            futures.append(pool.submit(_worker, str(store.root), dev, mine, cohort, download, cpu_threads,
                                       echo is not None))
        for fut in futures:
            rep = fut.result()
            for f in dataclasses.fields(SweepReport):
                getattr(merged, f.name).extend(getattr(rep, f.name))
    # A run trained by one worker shows as skipped or busy in another's report: count each run once.
    merged.skipped = sorted(set(merged.skipped) - set(merged.trained) - set(merged.not_applicable))
    merged.busy = []
    merged.not_applicable = sorted(set(merged.not_applicable))
    return merged
