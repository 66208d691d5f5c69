"""From a command line to finished runs: expand the spec, skip what is done, train teachers, train cohorts."""

from __future__ import annotations

import dataclasses
import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdbench import distributed
from kdbench.catalog import BUILTIN_ORDER, MODERN, method_order  # noqa: F401 (BUILTIN_ORDER: re-exported)
from kdbench.config import (
    Bench,
    DataSpec,
    Protocol,
    RunSpec,
    TeacherSpec,
    apply_protocol_sets,
    check_safe_name,
    expand_grid,
    group_cohorts,
    method_sets,
    parse_grid,
)
from kdbench.data import Dataset, load_dataset
from kdbench.errors import KdbenchError
from kdbench.guard import check_seed
from kdbench.method import MethodEntry, config_identity, discover, make_config, resolve
from kdbench.models.base import check_model_name
from kdbench.pair_settings import config_fields, resolve_values
from kdbench.progress import RunLogs, SweepMeter
from kdbench.results import ResultStore, load_run
from kdbench.system import usable_cores
from kdbench.teachers import TeacherStore, sha256_file
from kdbench.train import (
    Member,
    autocast,
    build_member,
    fail_member,
    load_checkpoint,
    not_applicable_reason,
    prepare_model,
    result_record,
    run_init_stage,
    run_record,
    train_cohort,
)

# Named groups of --methods: name -> (description, members given the registry).
GROUPS: dict[str, str] = {
    "all": "the mission's methods and their variants, and installed plugins (not the modern group)",
    "modern": "the modern baselines that came after CRD",
    "everything": "all + modern",
}


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
    precision: str = "fp32"  # fp32 or bf16 (autocast of the networks' forward)
    channels_last: bool = False  # the networks and batches in channels_last memory format
    uniform_settings: bool = False  # True: each method's single default on every pair (no per-pair published setting)


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

    # `--set KEY=V1,V2` is a grid: one set of runs per combination of values (the product over the keys).
    grid = parse_grid(req.sets)
    combos = expand_grid(grid)
    per_method = method_sets({k: v[0] for k, v in grid.items()})
    for name in per_method:
        if name not in entries:
            raise KdbenchError(f"--set methods.{name}.*: method {name!r} is not in this run ({', '.join(entries)})")
    for name in bench.methods:
        if name not in registry and not (name.endswith("+kd") and name[:-3] in registry):
            raise KdbenchError(f"{bench.source}: [methods.{name}]: unknown method")

    from kdbench.config import PRECISIONS

    if req.precision not in PRECISIONS:
        raise KdbenchError(f"unknown precision {req.precision!r}; valid: {', '.join(PRECISIONS)}")
    seeds = list(req.seeds) if req.seeds is not None else list(bench.seeds)
    if not seeds or any(s < 0 for s in seeds):
        raise KdbenchError("--seeds must be non-negative integers, e.g. --seeds 0,1,2")
    for seed in seeds:
        check_seed(seed, "--seeds")

    from kdbench.data import DATASETS

    if req.dataset is not None and req.dataset not in DATASETS:
        raise KdbenchError(f"unknown dataset {req.dataset!r}; datasets: {', '.join(DATASETS)}")
    pair_names = _split_csv(req.pairs)
    if not pair_names:
        raise KdbenchError("no pairs given: use --pairs cifar100, smoke, or teacher:student")
    teachers = TeacherStore(store) if store is not None else None
    specs: list[RunSpec] = []
    seen: set[str] = set()
    for sets in combos:
        for spec in _expand_one(bench, req, entries, pair_names, seeds, sets, teachers):
            if spec.run_id not in seen:  # ce runs are shared by pairs with the same student, and by grid points
                seen.add(spec.run_id)
                specs.append(spec)
    return specs


def _expand_one(
    bench: Bench,
    req: Request,
    entries: dict[str, MethodEntry],
    pair_names: list[str],
    seeds: list[int],
    sets: dict[str, Any],
    teachers: TeacherStore | None,
) -> list[RunSpec]:
    """The runs of one point of the --set grid (names already checked by `expand`)."""
    from kdbench.data import DATASETS

    per_method = method_sets(sets)
    # (pair set, data, pair, student protocol, teacher protocol)
    groups: list[tuple[str, DataSpec, str, Protocol, Protocol]] = []
    for pname in pair_names:
        if ":" in pname:
            t, s = pname.split(":", 1)
            check_model_name(t)
            check_model_name(s)
            data = DataSpec(req.dataset or "cifar100", req.data_root, req.image_size)
            proto = _protocol(bench, req.protocol if req.protocol is not None else bench.protocol, sets)
            groups.append((pname, data, pname, proto, proto))
            continue
        if pname not in bench.pair_sets:
            import difflib

            close = difflib.get_close_matches(pname, list(bench.pair_sets), n=2, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else f"pair sets: {', '.join(bench.pair_sets)}"
            raise KdbenchError(f"unknown pair set {pname!r} ({hint}); or name a pair as teacher:student")
        ps = bench.pair_sets[pname]
        data = ps.data
        if data.name not in DATASETS:  # checked here, so that --dry-run refuses it as the run does
            raise KdbenchError(
                f"{bench.source}: pairs.{pname}.dataset {data.name!r} is unknown; datasets: {', '.join(DATASETS)}"
            )
        if req.data_root:
            data = dataclasses.replace(data, data_root=req.data_root)
        if req.image_size:
            data = dataclasses.replace(data, image_size=req.image_size)
        proto = _protocol(bench, req.protocol if req.protocol is not None else ps.protocol or bench.protocol, sets)
        # A pair set may train its teachers longer than its students (teacher_protocol); --protocol and
        # --set protocol.* then change the students' protocol only.
        t_proto = bench.protocols[ps.teacher_protocol] if ps.teacher_protocol and req.protocol is None else proto
        for pair in ps.pairs:
            t, s = pair.split(":", 1)
            check_model_name(t)
            check_model_name(s)
            groups.append((pname, data, pair, proto, t_proto))

    specs: list[RunSpec] = []
    for set_name, data, pair, proto, t_proto in groups:
        t_arch, s_arch = pair.split(":", 1)
        for seed in seeds:
            for name, entry in entries.items():
                values, origin = resolve_values(
                    name,
                    pair,
                    config_fields(entry),
                    bench.methods.get(name, {}),
                    per_method.get(name, {}),
                    uniform=req.uniform_settings,
                )
                cfg = make_config(entry, values)
                tspec = None
                if entry.cls.requires_teacher or cfg.kd_weight:
                    tspec = TeacherSpec(t_arch, data, t_proto, bench.teacher_seed)
                    imported = teachers.imported_card(t_arch, data) if teachers else None
                    if imported is not None:
                        tspec = dataclasses.replace(tspec, imported=imported["weights_sha256"])
                spec = RunSpec(
                    s_arch,
                    name,
                    config_identity(cfg),
                    seed,
                    proto,
                    data,
                    tspec,
                    pair_set=set_name,
                    precision=req.precision,
                    channels_last=req.channels_last,
                    settings=origin,
                )
                specs.append(spec)
    return specs


def _protocol(bench: Bench, name: str, sets: dict[str, Any]) -> Protocol:
    if name not in bench.protocols:
        raise KdbenchError(f"unknown protocol {name!r}; protocols: {', '.join(bench.protocols)}")
    return apply_protocol_sets(bench.protocols[name], sets)


def teacher_run(tspec: TeacherSpec) -> RunSpec:
    """The vanilla run that trains a teacher."""
    cfg = make_config(resolve("ce"))
    return RunSpec(
        tspec.arch, "ce", config_identity(cfg), tspec.seed, tspec.protocol, tspec.data, None, pair_set="teachers"
    )


# ---------------------------------------------------------------------------------------------- execution


class DataCache:
    def __init__(self, download: bool = False):
        self.download = download
        self._cache: dict[DataSpec, Dataset] = {}

    def get(self, spec: DataSpec) -> Dataset:
        if spec not in self._cache:
            self._cache[spec] = load_dataset(
                spec.name, spec.data_root, image_size=spec.image_size, download=self.download, **spec.kwargs()
            )
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

    def __init__(
        self,
        store: ResultStore,
        device: torch.device,
        *,
        cohort: bool = True,
        download: bool = False,
        progress: Any = None,
        log: Callable[[str], None] = lambda s: None,
        compile: bool | str = False,
        echo: Callable[[str], None] | None = None,
    ):
        """``log`` gets the sweep's own messages; ``echo`` (when given) every per-epoch line, which also goes to
        ``runs/<label>.log`` beside each run's JSON."""
        self.store = store
        self.compile = compile  # torch.compile the students' and teachers' forward
        self.teachers = TeacherStore(store)
        self.device = device
        self.cohort = cohort
        self.data = DataCache(download)
        # A distributed run (several ranks, kdbench.distributed): every rank trains, rank 0 alone writes (run JSON,
        # checkpoints, weights, teacher cards, logs) and takes the locks; decisions read from the results folder
        # are rank 0's (distributed.agree), so the ranks never part ways.
        main = distributed.is_main()
        self.progress = progress if main else None
        self.log = log if main else (lambda s: None)
        self.logs = RunLogs(store.runs_dir, echo if main else None)
        self.logs.quiet = not main

    def preload(self, specs: list[RunSpec]) -> None:
        """Load every dataset the unfinished runs need and check every stored teacher they use (bad data roots,
        swapped or broken teacher weights fail here, before any file is written or any run trains)."""
        self._check_paths(specs)
        self.check_teachers(specs)
        for spec in {s.data: s for s in self.pending(specs)}.values():
            self.data.get(spec.data)
        for s in self.pending(specs):  # an epoch without a step would "finish" an untrained run
            n = len(self.data.get(s.data).train_labels)
            if s.protocol.drop_last and s.protocol.batch_size > n:
                raise KdbenchError(
                    f"protocol {s.protocol.name}: batch_size {s.protocol.batch_size} with drop_last "
                    f"leaves no batch of the {n} training images of {s.data.name}"
                )

    def check_teachers(self, specs: list[RunSpec]) -> None:
        """Every stored or imported teacher that an unfinished run needs: its card is well formed and its weights
        are the ones the card names (weights_sha256), with finite numbers. Teachers still to train are skipped."""
        seen: set[str] = set()
        for s in self.pending(specs):
            t = s.teacher
            if t is None or t.label in seen:
                continue
            seen.add(t.label)
            if t.imported:
                card = self.teachers.imported_card(t.arch, t.data)
                label = self.teachers.imported_label(t.arch, t.data)
            else:
                card, label = self.teachers.card(t), t.label
            if card is not None:
                self.teachers.verify(label, card, t.arch)

    def _check_paths(self, specs: list[RunSpec]) -> None:
        for s in specs:
            for path in (self.store.run_path(s.label), self.store.checkpoint_path(s.label)):
                if path.exists() and not path.is_file():
                    raise KdbenchError(f"{path} should be a file but is a folder: remove it and rerun")

    def _tidy(self, spec: RunSpec) -> None:
        """A finished run needs no checkpoint, lock or temporary file: remove those a killed process left behind
        (under the run's lock, so a process still writing them is never disturbed)."""
        if not distributed.is_main():
            return
        leftovers = self._leftovers(spec.label)
        lock = self.store.lock(spec.label)
        if not (leftovers or lock.path.exists()) or not lock.acquire():
            return
        try:
            for p in leftovers:
                p.unlink(missing_ok=True)
        finally:
            lock.release()

    def _leftovers(self, label: str) -> list[Path]:
        """The checkpoint and the temporary files of a run (what a finished run no longer needs)."""
        found = [self.store.checkpoint_path(label)]
        for folder in (self.store.runs_dir, self.store.checkpoint_path(label).parent, self.store.root / "weights"):
            if folder.is_dir():
                found += folder.glob(f".{label}.*.tmp")
        return [p for p in found if p.is_file()]

    def _finished(self, spec: RunSpec) -> dict[str, Any] | None:
        """The run's valid JSON, else None; an unreadable one is reported (it is then trained again)."""
        done = distributed.agree(self.store.finished(spec.label))
        path = self.store.run_path(spec.label)
        if done is None and path.is_file() and distributed.is_main():
            try:
                load_run(path)
            except KdbenchError as exc:
                self.log(f"{exc}: training the run again")
        return done

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
        self._check_paths(specs)
        todo = []
        for s in specs:
            if self._finished(s) is not None:
                report.skipped.append(s.label)
                self._tidy(s)
            else:
                todo.append(s)
        meter = self.logs.meter = SweepMeter()
        for t in self.teachers_to_train(todo):
            meter.plan(teacher_run(t).label, t.arch, t.protocol.epochs)
        for s in todo:
            meter.plan(s.label, s.student, s.protocol.epochs)
        if self.progress is not None:
            self.logs.progress = self.progress
            self.logs.task = self.progress.add_task("sweep", total=max(meter.total_epochs, 1))
            self.logs.refresh()
        for cohort in group_cohorts(todo, self.cohort):
            self._run_cohort(cohort, report)
        return report

    # -- teachers

    def teacher(self, tspec: TeacherSpec, data: Dataset) -> tuple[torch.nn.Module, dict[str, Any]]:
        if tspec.imported:
            model, card = self.teachers.load_imported(tspec.arch, tspec.data, data.num_classes, self.device)
            if card.get("weights_sha256") != tspec.imported:
                raise KdbenchError(f"imported teacher {tspec.label} changed since the runs were planned; rerun")
            return model, card
        if distributed.active():  # all ranks train it together, or none does
            if distributed.agree(self.teachers.card(tspec) is None):
                self._teacher_together(tspec, data)
            return self.teachers.load(tspec, data.num_classes, self.device)
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

    def _teacher_together(self, tspec: TeacherSpec, data: Dataset) -> None:
        """A distributed run trains its missing teacher on all its ranks; rank 0 holds the teacher's lock (taken by
        another process, the run stops: the ranks cannot wait hours in a collective)."""
        lock = self.store.lock(f"teacher__{tspec.label}")
        if not distributed.agree(lock.acquire() if distributed.is_main() else None):
            raise KdbenchError(f"teacher {tspec.arch} is being trained by another process: rerun when it is done")
        try:
            if distributed.agree(self.teachers.card(tspec) is None):
                self._train_teacher(tspec, data)
        finally:
            if distributed.is_main():
                lock.release()
            distributed.barrier()  # the card is written before any rank reads it

    def _train_teacher(self, tspec: TeacherSpec, data: Dataset) -> None:
        spec = teacher_run(tspec)
        done = distributed.agree(self.store.finished(spec.label))
        weights = self.store.weights_path(spec.label)
        if done is not None and done["status"] == "done" and distributed.agree(weights.is_file()):
            if not distributed.is_main():
                return
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

    def _run_cohort(
        self, specs: list[RunSpec], report: SweepReport, teacher_for: TeacherSpec | None = None
    ) -> list[Member]:
        data = self.data.get(specs[0].data)
        tspec = specs[0].teacher
        teacher, card = self.teacher(tspec, data) if tspec is not None else (None, None)
        if teacher is not None:
            prepare_model(teacher, channels_last=specs[0].channels_last, compile=self.compile)
        members: list[Member] = []
        locks = []
        try:
            for spec in specs:
                if distributed.agree(self.store.finished(spec.label)) is not None and teacher_for is None:
                    report.skipped.append(spec.label)
                    continue
                reason = not_applicable_reason(spec, data, teacher)
                if reason is not None:
                    self._write_na(spec, data, card, reason)
                    report.not_applicable.append(spec.label)
                    self.logs.meter.run_done(spec.label)
                    continue
                lock = self.store.lock(spec.label)
                if not distributed.agree(lock.acquire() if distributed.is_main() else None):
                    report.busy.append(f"{spec.label} (being trained by another process)")
                    self.logs.meter.run_done(spec.label)
                    continue
                if distributed.is_main():
                    locks.append(lock)
                if teacher_for is None and distributed.agree(self.store.finished(spec.label)) is not None:
                    # Finished by another process (or worker) between our first look and our lock: not again.
                    report.skipped.append(spec.label)
                    self.logs.meter.run_done(spec.label)
                    continue
                try:
                    m = build_member(spec, data, teacher, self.device, compile=self.compile)
                except KdbenchError:
                    raise
                except Exception as exc:  # e.g. a setting too large to allocate: this run fails, the others go on
                    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
                    self._write_na(
                        spec, data, card, f"could not be built: {type(exc).__name__}: {first}", status="failed"
                    )
                    report.failed.append(f"{spec.label}: could not be built ({type(exc).__name__})")
                    continue
                m.checkpoint_path = self.store.checkpoint_path(spec.label)
                loaded = load_checkpoint(m)
                if distributed.agree((loaded, m.epoch, m.init_done)) != (loaded, m.epoch, m.init_done):
                    raise KdbenchError(f"{spec.label}: the ranks read different checkpoints (is the folder shared?)")
                if loaded:
                    self.logs.meter.start(spec.label, m.epoch)
                    self.logs.note([spec], f"resumed at epoch {m.epoch}/{spec.protocol.epochs}")
                elif m.discarded:
                    self.log(m.discarded)
                members.append(m)
            for m in members:
                try:
                    run_init_stage(m, data, teacher, self.device)  # returns at once for a method without one
                except Exception as exc:  # this member fails; its cohort-mates go on
                    fail_member(m, exc, -1)
                    m.failed = "init stage: " + m.failed
            by_epoch: dict[int, list[Member]] = defaultdict(list)
            for m in members:
                by_epoch[m.epoch].append(m)
            on_epoch = self.logs.cohort(members, len(data.train_labels))
            for _, cohort in sorted(by_epoch.items()):
                train_cohort(cohort, data, teacher, self.device, progress=self.progress, on_epoch=on_epoch)
            t_pred = None
            if teacher is not None and any(m.failed is None for m in members):
                from kdbench.evaluate import predict_test_split

                with autocast(self.device, specs[0].precision):
                    t_pred = predict_test_split(teacher, data, self.device)
            errors = []
            for m in members:  # each member's result is written even when another's cannot be
                try:
                    self._finish(m, data, teacher, card, len(members), report, teacher_for, t_pred)
                except Exception as exc:
                    errors.append(exc)
            if errors:
                raise errors[0]
        finally:
            for lock in locks:
                lock.release()
        distributed.barrier()  # what rank 0 wrote is there before any rank reads it
        return members

    def _finish(
        self,
        m: Member,
        data: Dataset,
        teacher,
        card,
        cohort_size: int,
        report: SweepReport,
        teacher_for: TeacherSpec | None,
        teacher_predictions=None,
    ) -> None:
        from kdbench.evaluate import final_metrics

        extra: dict[str, Any] = {}
        if m.failed is None:
            try:
                with autocast(self.device, m.spec.precision):
                    extra = final_metrics(m.evaluated, teacher, data, self.device, teacher_predictions)
            except Exception as exc:  # the trained student is kept; only the extra metrics are missing
                self.log(f"{m.spec.label}: final metrics failed ({type(exc).__name__}: {exc}); top-1 is recorded")
                extra = {"final_metrics_error": f"{type(exc).__name__}: {exc}"}
        diagnostics = {"corr_diff": extra.pop("corr_diff")} if "corr_diff" in extra else {}
        if not distributed.is_main():  # rank 0 writes the run; the others only took part in the metrics
            (report.failed if m.failed else report.trained).append(m.spec.label)
            return
        record = result_record(m, data, card, self.device, cohort_size, extra)
        if diagnostics:
            record["diagnostics"] = diagnostics
        if m.failed is None:
            from kdbench.teachers import save_weights

            weights = self.store.weights_path(m.spec.label)
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
        for p in self._leftovers(m.spec.label):  # .tmp files of earlier, killed attempts (we hold the run's lock)
            p.unlink(missing_ok=True)
        (report.failed if m.failed else report.trained).append(
            m.spec.label if not m.failed else f"{m.spec.label}: {m.failed}"
        )
        self.logs.meter.run_done(m.spec.label)
        top1 = record["metrics"].get("top1_last")
        self.logs.note(
            [m.spec],
            f"failed: {m.failed}"
            if m.failed
            else f"done: top1_last {top1:.2f} -> {self.store.run_path(m.spec.label).name}",
        )
        self.logs.refresh()

    @staticmethod
    def _card(tspec: TeacherSpec, data: Dataset, spec: RunSpec, metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "arch": tspec.arch,
            "dataset": data.name,
            "image_size": data.image_size,
            "data_checksum": data.checksum,
            "protocol": tspec.protocol.name,
            "seed": tspec.seed,
            "source": "trained",
            "run_id": spec.run_id,
            "top1": metrics["top1_last"],
            "top5": metrics["top5_last"],
            "top1_best": metrics["top1_best"],
        }

    def _write_na(self, spec: RunSpec, data: Dataset, card, reason: str, status: str = "n/a") -> None:
        if not distributed.is_main():
            return
        self.store.write_run(spec.label, run_record(spec, data, card, self.device, status=status, reason=reason))


# ---------------------------------------------------------------------------------------------- executors


def _stderr_line(line: str) -> None:
    import sys

    print(line, file=sys.stderr, flush=True)


def _worker(
    root: str,
    device: str,
    specs: list[RunSpec],
    cohort: bool,
    download: bool,
    threads: int,
    compile: bool | str = False,
    echo: bool = False,
) -> SweepReport:
    if threads:
        torch.set_num_threads(threads)
    return worker_sweep(root, torch.device(device), cohort, download, compile, echo).run(specs)


def worker_sweep(
    root: str, device: torch.device, cohort: bool, download: bool, compile: bool | str, echo: bool
) -> Sweep:
    """The Sweep of a worker process (a local worker, or one rank of a distributed run): its lines go to stderr."""
    return Sweep(
        ResultStore(root),
        device,
        cohort=cohort,
        download=download,
        compile=compile,
        log=_stderr_line,
        echo=_stderr_line if echo else None,
    )


def _die_with_parent(parent: int) -> None:
    """Worker initializer: a worker never outlives the process that started it (no orphans, even after a SIGKILL of
    the parent): Linux's parent-death signal where there is one, and a watchdog thread everywhere."""
    import signal
    import threading

    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent watchdog").start()


def max_workers(device: torch.device) -> int:
    """The most local workers a device supports: one per visible GPU, or one per CPU core."""
    if device.type == "cuda":
        return 1 if device.index is not None else max(1, torch.cuda.device_count())
    return usable_cores()


def run_local(
    store: ResultStore,
    specs: list[RunSpec],
    devices: list[str],
    *,
    cohort: bool = True,
    download: bool = False,
    progress: Any = None,
    log: Callable[[str], None] = lambda s: None,
    compile: bool | str = False,
    echo: Callable[[str], None] | None = None,
) -> SweepReport:
    """The local executor: one worker per device (each GPU, or N CPU workers), coordinated only through the run
    locks of the results folder, so workers, and other processes on the same folder, never train a run twice."""
    if len(devices) <= 1:
        return Sweep(
            store,
            torch.device(devices[0] if devices else "cpu"),
            cohort=cohort,
            download=download,
            progress=progress,
            log=log,
            compile=compile,
            echo=echo,
        ).run(specs)
    import concurrent.futures as cf
    import multiprocessing as mp

    # Each worker starts at a different cohort so they do not queue behind one another's locks.
    keys = list(dict.fromkeys(s.cohort_key for s in specs))
    # CPU numbers depend on the intra-op thread count: every worker uses the thread count this process would
    # train with, so --workers never changes a result (environment.torch_threads records it in every run).
    cpu_threads = torch.get_num_threads() if devices[0] == "cpu" else 0
    merged = SweepReport()
    with cf.ProcessPoolExecutor(
        len(devices), mp_context=mp.get_context("spawn"), initializer=_die_with_parent, initargs=(os.getpid(),)
    ) as pool:
        futures = []
        for i, dev in enumerate(devices):
            order = keys[i * len(keys) // len(devices) :] + keys[: i * len(keys) // len(devices)]
            rank = {k: j for j, k in enumerate(order)}
            mine = sorted(specs, key=lambda s: rank[s.cohort_key])
            futures.append(
                pool.submit(
                    _worker, str(store.root), dev, mine, cohort, download, cpu_threads, compile, echo is not None
                )
            )
        for fut in futures:
            rep = fut.result()
            for f in dataclasses.fields(SweepReport):
                getattr(merged, f.name).extend(getattr(rep, f.name))
    # A run trained by one worker shows as skipped or busy in another's report: count each run once.
    merged.skipped = sorted(set(merged.skipped) - set(merged.trained) - set(merged.not_applicable))
    merged.busy = []
    merged.not_applicable = sorted(set(merged.not_applicable))
    return merged
