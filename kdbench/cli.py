"""The kdbench command line: parses, calls the library, prints. Bad input: one line on stderr and exit code 2."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import kdbench
from kdbench.errors import KdbenchError

console = Console()
err_console = Console(stderr=True)
# Images are resized to a square of this side: 1 to 512 pixels (beyond, a data set no longer fits in memory).
IMAGE_SIZE = click.IntRange(min=1, max=512)
NON_NEGATIVE = click.IntRange(min=0)


def _device(name: str):
    from kdbench.system import resolve_device

    return resolve_device(name)


def _progress() -> Progress:
    # No rich time-remaining column: it guesses from the last seconds only; the sweep's line shows an ETA priced
    # from measured epochs (kdbench.progress.SweepMeter).
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
        disable=not err_console.is_terminal,
    )


def _echo_epochs():
    """Where per-epoch lines go besides each run's log file: stderr when it is not a terminal (nohup, > log, | tee,
    a SLURM log), nowhere in a terminal (the progress display shows them)."""
    if err_console.is_terminal:
        return None
    return lambda line: click.echo(line, err=True)


def _library_messages() -> None:
    """Messages the library logs (e.g. a first Tiny-ImageNet decode) go to stderr, one line each."""
    import logging

    logger = logging.getLogger("kdbench")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise KdbenchError(f"--seeds {text!r}: expected integers such as 0,1,2") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(kdbench.__version__, prog_name="kdbench")
def cli() -> None:
    """kdbench: a benchmark of knowledge-distillation methods on CIFAR-style teacher/student pairs."""


# ---------------------------------------------------------------------------------------------- list


@cli.group("list")
def list_() -> None:
    """List models, datasets, methods, pair sets or protocols."""


@list_.command("models")
@click.argument("pattern", default="*")
def list_models_cmd(pattern: str) -> None:
    """Registered architectures (PATTERN is a wildcard such as 'resnet*')."""
    from kdbench.models import feature_info, list_models

    table = Table(title=f"models matching {pattern!r}")
    for col in ("name", "taps (channels)", "pooled", "reduction"):
        table.add_column(col)
    for name in list_models(pattern):
        fi = feature_info(name)
        table.add_row(name, " ".join(map(str, fi.channels)), str(fi.pooled_dim), " ".join(map(str, fi.reduction)))
    console.print(table)


@list_.command("datasets")
def list_datasets_cmd() -> None:
    """Datasets kdbench can read."""
    from kdbench.data import list_datasets

    table = Table(title="datasets")
    table.add_column("name")
    table.add_column("description")
    for name, desc in list_datasets():
        table.add_row(name, desc)
    console.print(table)


@list_.command("methods")
@click.option("--config", "show_config", default=None, help="Show the default settings of one method.")
@click.option(
    "--pair",
    default=None,
    metavar="TEACHER:STUDENT",
    help="With --config: the settings a run on this pair gets (the authors' per-pair setting where there is one).",
)
def list_methods_cmd(show_config: str | None, pair: str | None) -> None:
    """Registered distillation methods (built-in and plugins), with their paper and status."""
    import dataclasses

    from kdbench.catalog import method_order
    from kdbench.method import discover, make_config, resolve
    from kdbench.models.base import check_model_name
    from kdbench.pair_settings import config_fields, resolve_values
    from kdbench.sweep import GROUPS, group_members

    if pair is not None and not show_config:
        raise KdbenchError("--pair needs --config NAME, e.g. kdbench list methods --config dkd --pair vgg13:vgg8")
    if show_config:
        entry = resolve(show_config)
        if pair is None:
            table = Table(title=f"{show_config}: default settings")
            table.add_column("key")
            table.add_column("value")
            for k, v in dataclasses.asdict(make_config(entry)).items():
                table.add_row(k, repr(v))
            console.print(table)
            return
        if pair.count(":") != 1:
            raise KdbenchError(f"--pair {pair!r}: expected teacher:student, e.g. resnet32x4:resnet8x4")
        for arch in pair.split(":"):
            check_model_name(arch)
        values, origin = resolve_values(show_config, pair, config_fields(entry), {}, {})
        table = Table(title=f"{show_config} on {pair}: settings")
        for col in ("key", "value", "from"):
            table.add_column(col)
        where = dict(origin.origin)
        for k, v in dataclasses.asdict(make_config(entry, values)).items():
            table.add_row(k, repr(v), "per-pair (published)" if where.get(k) == "pair" else "method default")
        console.print(table)
        if origin.pair is not None:
            console.print(f"per-pair setting from {origin.pair.source}", soft_wrap=True, markup=False)
            if not origin.pair.confirmed:
                console.print(f"not confirmed: {origin.pair.note}", soft_wrap=True, markup=False)
        else:
            console.print(f"no published per-pair setting of {show_config} for {pair}: the method's default applies")
        console.print(
            "bench.toml [methods] and --set override these; --uniform-settings runs the default everywhere",
            soft_wrap=True,
            markup=False,
        )
        return
    reg = discover()
    table = Table(title="methods")
    for col in ("name", "paper", "from", "status"):
        table.add_column(col, overflow="fold")
    for name in method_order(list(reg)):
        e = reg[name]
        status = "ok" if e.ok else f"[red]broken[/red]: {e.error}"
        table.add_row(name, e.cls.paper if e.cls else e.value, f"{e.dist} {e.version}", status)
    console.print(table)
    groups = Table(title="groups (--methods NAME)")
    for col in ("group", "meaning", "methods"):
        groups.add_column(col, overflow="fold")
    for group, meaning in GROUPS.items():
        groups.add_row(group, meaning, ", ".join(group_members(group, reg)))
    console.print(groups)


@list_.command("pairs")
@click.option("--config", "config_path", type=click.Path(), default=None)
def list_pairs_cmd(config_path: str | None) -> None:
    """Pair sets of bench.toml."""
    from kdbench.config import load_bench

    bench = load_bench(config_path)
    table = Table(title=f"pair sets ({bench.source})")
    for col in ("name", "dataset", "protocol", "pairs"):
        table.add_column(col, overflow="fold")
    for ps in bench.pair_sets.values():
        table.add_row(ps.name, ps.data.name, ps.protocol or bench.protocol, ", ".join(ps.pairs))
    console.print(table)


@list_.command("protocols")
@click.option("--config", "config_path", type=click.Path(), default=None)
def list_protocols_cmd(config_path: str | None) -> None:
    """Protocols of bench.toml."""
    from kdbench.config import load_bench

    bench = load_bench(config_path)
    table = Table(title=f"protocols ({bench.source})")
    for col in ("name", "epochs", "batch", "lr (small)", "milestones", "init epochs"):
        table.add_column(col)
    for p in bench.protocols.values():
        table.add_row(
            p.name,
            str(p.epochs),
            str(p.batch_size),
            f"{p.lr} ({p.lr_small})",
            " ".join(map(str, p.milestones)),
            str(p.init_epochs),
        )
    console.print(table)


# ---------------------------------------------------------------------------------------------- run

_run_options = [
    click.option(
        "--pairs",
        "-p",
        multiple=True,
        required=True,
        help="Pair sets of bench.toml (cifar100, tinyimagenet100, smoke) or teacher:student pairs.",
    ),
    click.option("--seeds", default=None, help="Comma-separated seeds (default: bench.toml defaults.seeds)."),
    click.option("--protocol", default=None, help="paper, fast, smoke (default: the pair set's or bench.toml's)."),
    click.option(
        "--set",
        "sets",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a setting: methods.NAME.KEY=V or protocol.KEY=V (repeatable).",
    ),
    click.option("--dataset", default=None, help="Dataset of pairs named as teacher:student (default cifar100)."),
    click.option("--data-root", default=None, type=click.Path(), help="Folder holding the dataset files."),
    click.option("--image-size", default=None, type=IMAGE_SIZE, help="Resize images (tinyimagenet: 32 or 64)."),
    click.option("--download", is_flag=True, help="Download CIFAR-100 when it is missing (needs internet)."),
    click.option("--results", default=None, type=click.Path(), help="Results folder (default bench.toml's)."),
    click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N."),
    click.option("--config", "config_path", default=None, type=click.Path(), help="bench.toml to use."),
    click.option(
        "--uniform-settings",
        is_flag=True,
        help="Run each method's single default setting on every pair, not the authors' per-pair settings.",
    ),
]


def _with_options(options):
    def deco(f):
        for opt in reversed(options):
            f = opt(f)
        return f

    return deco


def _prepare(
    methods,
    *,
    pairs,
    seeds,
    protocol,
    sets,
    dataset,
    data_root,
    image_size,
    results,
    config_path,
    precision="fp32",
    channels_last=False,
    uniform_settings=False,
):
    """(bench, store, run specs) of the run-selection options that `run` and `teachers train` share."""
    from kdbench.config import load_bench
    from kdbench.results import ResultStore
    from kdbench.sweep import Request, expand

    bench = load_bench(config_path)
    if results is not None and not results.strip():
        raise KdbenchError("--results '': give a folder, e.g. --results results")
    store = ResultStore(results or bench.results)
    store.check_layout()  # runs/ (or another sub-folder) that is a file: refused before any work, dry run too
    req = Request(
        list(methods),
        list(pairs),
        _seeds(seeds),
        protocol,
        list(sets),
        dataset,
        data_root,
        image_size,
        precision,
        channels_last,
        uniform_settings,
    )
    specs = expand(bench, req, store)
    return bench, store, specs


@cli.command()
@click.option(
    "--methods",
    "-m",
    multiple=True,
    required=True,
    help="Comma-separated method names or groups: all, modern, everything (see `kdbench list methods`).",
)
@_with_options(_run_options)
@click.option("--no-cohort", is_flag=True, help="Train each run alone instead of side by side per (pair, seed).")
@click.option(
    "--executor",
    type=click.Choice(["local", "slurm"]),
    default="local",
    help="local: worker processes on this machine; slurm: a job array through submitit.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Local worker processes (default: one per visible GPU, or 1 on the CPU).",
)
@click.option("--slurm-partition", default=None, help="SLURM partition (default bench.toml [slurm]).")
@click.option("--slurm-time", type=click.IntRange(min=1), default=None, help="Minutes per array task.")
@click.option("--slurm-gpus", type=click.IntRange(min=0), default=None, help="GPUs per array task.")
@click.option("--slurm-cpus", type=click.IntRange(min=1), default=None, help="CPUs per array task.")
@click.option(
    "--nproc-per-node",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Processes per run (DDP, one per GPU; gloo on the CPU). The protocol's batch size and lr are the global "
    "ones. With --executor slurm: GPUs and tasks per node.",
)
@click.option(
    "--slurm-nodes", type=click.IntRange(min=1), default=None, help="Nodes per run (DDP over them; default 1)."
)
@click.option("--dry-run", is_flag=True, help="List the runs and what is already done; train nothing.")
@click.option(
    "--precision",
    type=click.Choice(["fp32", "bf16"]),
    default="fp32",
    show_default=True,
    help="bf16: the networks' forward under bfloat16 autocast (part of the run id when not fp32).",
)
@click.option(
    "--channels-last",
    is_flag=True,
    help="Networks and batches in channels_last memory format (part of the run id when set).",
)
@click.option(
    "--compile",
    "compile_",
    is_flag=True,
    help="torch.compile the students' and teachers' forward (recorded in the run JSON; not part of the run id).",
)
def run(
    methods,
    download,
    device,
    no_cohort,
    executor,
    workers,
    slurm_partition,
    slurm_time,
    slurm_gpus,
    slurm_cpus,
    nproc_per_node,
    slurm_nodes,
    dry_run,
    compile_,
    **selection,
) -> None:
    """Train the runs of METHODS x PAIRS x SEEDS (skipping finished runs, resuming interrupted ones)."""
    from kdbench.execute import execute

    # selection: the options that choose the runs (pairs, seeds, protocol, --set, data, results, config, precision,
    # channels_last), handed to _prepare by name.
    bench, store, specs = _prepare(methods, **selection)
    _check_processes(specs, nproc_per_node * (slurm_nodes or 1) if executor == "slurm" else nproc_per_node)
    slurm = None
    if executor == "slurm":
        from kdbench.config import SlurmSettings

        if nproc_per_node > 1 and slurm_gpus is not None and slurm_gpus != nproc_per_node:
            raise KdbenchError(
                f"--slurm-gpus {slurm_gpus} with --nproc-per-node {nproc_per_node}: one process per GPU, give one"
            )
        distributed_run = nproc_per_node > 1 or (slurm_nodes or 1) > 1
        slurm = SlurmSettings.from_dict(bench.slurm, bench.source).with_overrides(
            partition=slurm_partition,
            time_min=slurm_time,
            gpus_per_task=nproc_per_node if nproc_per_node > 1 else slurm_gpus,
            cpus_per_task=slurm_cpus,
            nodes=slurm_nodes,
            tasks_per_node=nproc_per_node if distributed_run else None,
        )
        if not dry_run:
            from kdbench.slurm import _submitit

            _submitit()  # missing submitit is bad input: say so before anything is written
    elif slurm_nodes is not None:
        raise KdbenchError("--slurm-nodes needs --executor slurm (on one machine: --nproc-per-node)")
    elif workers is not None and nproc_per_node > 1:
        raise KdbenchError("--nproc-per-node and --workers exclude each other (one run on several processes)")
    elif workers is not None:
        from kdbench.sweep import max_workers

        dev = _device(device)
        if workers > max_workers(dev):
            raise KdbenchError(
                f"--workers {workers}: at most {max_workers(dev)} on {dev} "
                f"({'one per visible GPU' if dev.type == 'cuda' else 'one per CPU core'})"
            )
    _library_messages()
    echo = _echo_epochs()
    if dry_run:
        if slurm is None:
            _device(device)  # a bad --device fails in a dry run too
        _dry_run(store, specs, slurm, cohort=not no_cohort)
        return
    with _progress() as progress:
        done = execute(
            store,
            specs,
            executor=executor,
            device=device,
            workers=workers,
            cohort=not no_cohort,
            download=download,
            slurm=slurm,
            progress=progress,
            compile=compile_,
            echo=echo,
            log=lambda s: err_console.print(f"[dim]{escape(s)}[/dim]"),
            nproc=1 if executor == "slurm" else nproc_per_node,
        )
    from kdbench import distributed

    if not distributed.is_main():  # a rank of a torchrun launch: rank 0 reports
        return
    if done.report is None:
        jobs = done.jobs
        console.print(
            f"submitted {len(jobs)} jobs ({', '.join(j.job_id for j in jobs[:5])}"
            f"{' ...' if len(jobs) > 5 else ''}); rerun the same command to finish what is missing"
        )
        return
    report = done.report
    console.print(
        f"trained {len(report.trained)}, already done {len(report.skipped)}, "
        f"n/a {len(report.not_applicable)}, failed {len(report.failed)}, busy {len(report.busy)} "
        f"-> {store.runs_dir} (per-epoch logs: *.log beside each JSON)",
        soft_wrap=True,
    )
    for line in report.failed:
        err_console.print(f"[red]failed[/red] {line}")
    for line in report.busy:
        err_console.print(f"[yellow]skipped[/yellow] {line}")


def _check_processes(specs, processes: int) -> None:
    """Several processes per run: refuse, before anything is written (also in --dry-run), a method whose loss couples
    the samples of a batch and a batch size that does not split evenly over the processes."""
    from kdbench import distributed
    from kdbench.method import refuse_coupled

    refuse_coupled([s.method for s in specs], processes)
    for batch_size in dict.fromkeys(s.protocol.batch_size for s in specs):
        distributed.check_batch(batch_size, processes)


def _dry_run(store, specs, slurm, cohort: bool) -> None:
    """--dry-run: the batch script of the SLURM array, or the runs and what is already done; trains nothing."""
    if slurm is not None:
        from kdbench.slurm import cohorts, sbatch_script

        click.echo(sbatch_script(store, slurm, max(1, len(cohorts(store, specs, cohort)))))
        return
    _dry_run_table(store, specs)


def _dry_run_table(store, specs) -> None:
    """The runs and their state, then the teachers that would be trained first, with their estimated cost."""
    import torch

    from kdbench.progress import estimate_seconds, hms
    from kdbench.sweep import Sweep, teacher_run
    from kdbench.variants import pair_defaults, setting_diff, setting_label

    Sweep(store, torch.device("cpu")).check_teachers(specs)  # a swapped or broken teacher: refused as the run does
    # a run at a setting other than its method's default (a --set value or grid point) says which
    defaults = pair_defaults([(s.method, s.pair) for s in specs])
    settings = [setting_label(setting_diff(s.method_config, defaults[(s.method, s.pair)])) for s in specs]
    table = Table(title=f"{len(specs)} runs")
    for col in ("pair", "method", *(["setting"] if any(settings) else []), "seed", "protocol", "state", "estimate"):
        table.add_column(col)
    pending = 0.0
    unknown = 0
    for s, setting in zip(specs, settings):
        resumable = store.checkpoint_path(s.label).exists()
        state = "done" if store.finished(s.label) else "resume" if resumable else "todo"
        est = estimate_seconds(store, s.student, s.data, s.protocol.epochs) if state != "done" else None
        if state != "done":
            pending += est or 0.0
            unknown += est is None
        table.add_row(
            s.pair,
            s.method,
            *([setting or "default"] if any(settings) else []),
            str(s.seed),
            s.protocol.name,
            state,
            hms(est) if est is not None else ("-" if state == "done" else "unknown"),
        )
    console.print(table)
    teachers = Sweep(store, torch.device("cpu")).teachers_to_train(specs)
    if teachers:
        tt = Table(title=f"{len(teachers)} teachers to train first (each the vanilla ce run of its architecture)")
        for col in ("teacher", "dataset", "protocol", "epochs", "seed", "estimate"):
            tt.add_column(col)
        for t in teachers:
            est = estimate_seconds(store, t.arch, t.data, t.protocol.epochs)
            pending += est or 0.0
            unknown += est is None
            tt.add_row(
                t.arch,
                f"{t.data.name}" + (f" {t.data.image_size}px" if t.data.image_size else ""),
                t.protocol.name,
                str(t.protocol.epochs),
                str(t.seed),
                hms(est) if est is not None else "unknown",
            )
        console.print(tt)
        labels = ", ".join(teacher_run(t).label for t in teachers[:2]) + (" ..." if len(teachers) > 2 else "")
        console.print(
            f"Teachers are trained before their students ({labels}). To use published checkpoints "
            "instead (RepDistiller, mdistiller), import each once, e.g.\n  kdbench teachers import "
            f"ckpt_{teachers[0].arch}.pth --arch {teachers[0].arch} --dataset {teachers[0].data.name}"
            + (f" --results {store.root}" if str(store.root) != "results" else ""),
            soft_wrap=True,
        )
    else:
        console.print("No teacher to train: every teacher these runs need is stored or imported.")
    why = f"no finished run of the same architecture on the same data in {store.runs_dir} to measure its speed"
    if unknown and not pending:
        console.print(f"No time estimate yet: {why}.", soft_wrap=True)
        return
    note = f"; {unknown} without an estimate ({why})" if unknown else ""
    console.print(
        f"Estimated training time of what is left: {hms(pending)} on this machine, from the measured "
        f"epoch times of earlier runs{note}.",
        soft_wrap=True,
    )


# ---------------------------------------------------------------------------------------------- table


def _store_with_runs(results: str):
    from kdbench.results import ResultStore

    store = ResultStore(results)
    if not store.runs_dir.is_dir():
        raise KdbenchError(
            f"no runs in {store.root} (expected {store.runs_dir}); run `kdbench run` first or pass --results"
        )
    return store


def _collect(results: str):
    from kdbench.tables import collect

    store = _store_with_runs(results)
    col = collect(store)
    for problem in col.problems:
        err_console.print(f"[yellow]skipped or worth a look:[/yellow] {escape(problem)}", soft_wrap=True)
    if col.runs.empty:
        raise KdbenchError(f"no readable runs in {store.runs_dir}")
    return col


@cli.command()
@click.option("--results", default="results", type=click.Path(), help="Results folder.")
@click.option(
    "--metric",
    "metrics",
    default=("top1_last",),
    multiple=True,
    help="Any numeric metric of the run JSON: top1_last, top1_best, top5_*, cka, agreement, ece, kl_t1, "
    "kl_t4, corr_diff_mean, corr_diff_max, ... Repeat it for one table per metric.",
)
@click.option("--format", "fmt", type=click.Choice(["md", "latex", "csv"]), default="md")
@click.option(
    "--reference",
    default=None,
    metavar="NAME[,NAME]",
    help="Published top-1 beside ours, with ours - published: CIFAR-100 crd2020, rrd2024, dkd2022, "
    "dist2022, ls2024, simkd2022; ImageNet mdistiller-imagenet; in any combination (sources: "
    "kdbench/reference/SOURCES.md).",
)
@click.option(
    "--vs",
    default=None,
    metavar="METHOD",
    help="Paired differences over seeds against this method (ce = the vanilla student), with a 95% bootstrap interval.",
)
@click.option(
    "--rank-corr",
    "rank_corr",
    default=None,
    metavar="TEACHER:STUDENT",
    help="With --reference and --format md: Kendall tau between each pair's ranking of the methods and the "
    "published ranking of this pair (e.g. the closest published pair). Several references make one ranking "
    "of their rows (e.g. CRD's table and the modern methods' own papers, which use its teachers and protocol); "
    "two that publish different numbers for one method of the pair are refused.",
)
@click.option(
    "--compute",
    is_flag=True,
    help="Instead of the table: the compute of the folder's finished runs, measured from their JSON timings "
    "(wall-clock hours and seconds per epoch, per method, the teachers and the total), in Markdown.",
)
@click.option(
    "--long",
    "long_",
    is_flag=True,
    help="With --format csv: every run's per-epoch curve as one tidy CSV (one row per run, epoch and "
    "quantity: lr, loss_<term>, test_top1, test_top5) instead of the table.",
)
@click.option(
    "--best-of-grid",
    "best_grid",
    is_flag=True,
    help="With --format md: after the table, each method's default setting against the best point of its "
    "--set grid, and Kendall tau between the two rankings.",
)
@click.option(
    "--transfer",
    is_flag=True,
    help="Instead of the table: the transfer table of the folder's linear probes (`kdbench probe`), each "
    "method's probe top-1 beside the same runs' top-1 on their own data, in Markdown.",
)
def table(
    results: str,
    metrics: tuple[str, ...],
    fmt: str,
    reference: str | None,
    vs: str | None,
    rank_corr: str | None,
    compute: bool,
    long_: bool,
    best_grid: bool,
    transfer: bool,
) -> None:
    """Methods x pairs table of a results folder: mean ± std over seeds, best per pair in bold, average rank."""
    from kdbench.render import render
    from kdbench.tables import build_tables

    if transfer:
        if compute or long_ or rank_corr or reference or vs or fmt != "md" or len(metrics) != 1:
            raise KdbenchError("--transfer writes one Markdown table per probe data set; it takes only --results")
        click.echo(_transfer_text(results, metrics[0]), nl=False)
        return

    if compute:
        ignored = [
            name
            for name, used in (
                ("--metric", metrics != ("top1_last",)),
                ("--format", fmt != "md"),
                ("--reference", reference is not None),
                ("--vs", vs is not None),
                ("--rank-corr", rank_corr is not None),
                ("--long", long_),
            )
            if used
        ]
        if ignored:
            raise KdbenchError(f"--compute writes one Markdown table of the compute; it takes no {', '.join(ignored)}")
        click.echo(_compute_text(results), nl=False)
        return
    if best_grid and fmt != "md":
        raise KdbenchError("--best-of-grid is written in Markdown: use --format md")
    if long_ and fmt != "csv":
        raise KdbenchError("--long writes the per-epoch curves as CSV: use it with --format csv")
    if long_:
        from kdbench.export import curves_long_csv, without_curves

        col = _collect(results)
        for line in without_curves(col):
            err_console.print(f"[yellow]skipped:[/yellow] {escape(line)}", soft_wrap=True)
        click.echo(curves_long_csv(col), nl=False)
        return
    if rank_corr is not None:
        if not reference or not reference.strip(", "):
            raise KdbenchError("--rank-corr needs a --reference, e.g. --reference crd2020")
        if fmt != "md":
            raise KdbenchError("--rank-corr is written in Markdown: use --format md")
        if rank_corr.count(":") != 1:
            raise KdbenchError(f"--rank-corr {rank_corr!r}: expected TEACHER:STUDENT, e.g. resnet56:resnet20")
        if any(not m.startswith("top1") for m in metrics):
            raise KdbenchError("--rank-corr compares published top-1: use --metric top1_last or top1_best")
    col = _collect(results)
    parts = []
    for metric in metrics:
        tables = build_tables(col, metric, reference=reference, vs=vs)
        if not tables:
            raise KdbenchError(
                f"{results}: only the teachers' own training runs so far (their numbers are the Teacher row of the "
                "students' tables); no student run to tabulate yet"
            )
        for t in tables.values():
            for note in t.notes:
                err_console.print(f"[yellow]note:[/yellow] {t.group}: {note}")
        text = render(tables, fmt, metric)
        if rank_corr is not None:
            text += _rank_corr_text(tables, reference, rank_corr)
        if best_grid:
            from kdbench.grids import render_best_of_grid_md

            grid_text = "\n".join(filter(None, (render_best_of_grid_md(t) for t in tables.values())))
            text += "\n" + (grid_text or "No method has runs at more than one setting: no grid to compare.\n")
        parts.append(text)
    click.echo("\n".join(parts), nl=False)


def _transfer_text(results: str, metric: str) -> str:
    from kdbench.results import ResultStore
    from kdbench.transfer import build_transfer, collect_probes, render_transfer_md

    col = _collect(results)
    probes, skipped = collect_probes(ResultStore(results))
    tables = build_transfer(col, probes, metric)
    for line in skipped + [s for t in tables for s in t.skipped]:
        err_console.print(f"[yellow]skipped:[/yellow] {line}", soft_wrap=True)
    if not tables:
        raise KdbenchError(f"no linear probes in {ResultStore(results).probes_dir}: run `kdbench probe --all` first")
    return render_transfer_md(tables, metric)


def _compute_text(results: str) -> str:
    from kdbench.compute import render_compute_md

    store = _store_with_runs(results)
    from kdbench.export import duplicate_line

    runs = []
    first: dict[str, Path] = {}
    for path, run, error in store.iter_runs():
        if run is None:
            err_console.print(f"[yellow]skipped:[/yellow] {escape(str(error))}", soft_wrap=True)
        elif run["run_id"] in first:  # a copied file: its compute is counted once
            line = duplicate_line(run["run_id"], first[run["run_id"]], path)
            err_console.print(f"[yellow]skipped:[/yellow] {escape(line)}", soft_wrap=True)
        else:
            first[run["run_id"]] = path
            runs.append((path, run))
    if not any(r.get("status") in ("done", "failed") for _p, r in runs):
        raise KdbenchError(f"no finished runs in {store.runs_dir}")
    return render_compute_md(runs, store.teacher_run_ids())


def _rank_corr_text(tables, reference: str, published_pair: str) -> str:
    from kdbench.rankcorr import rank_agreement, render_agreement_md
    from kdbench.tables import PAPER_NAMES, STUDENT, TEACHER, load_reference

    t_arch, s_arch = published_pair.split(":")
    _, names = load_reference(reference)
    names = list(dict.fromkeys(names))
    rows = {STUDENT: "Student", **{r: paper for r, paper in PAPER_NAMES.items() if paper != "Student"}}
    pub: dict[str, float | None] = {}  # None: the paper reports the method as not applicable to the pair
    source: dict[str, str] = {}
    for name in names:  # one ranking from several sources: refused where two disagree on a method of the pair
        published, _ = load_reference(name)
        for row, paper in rows.items():
            if (t_arch, s_arch, paper) not in published:
                continue
            value = published[(t_arch, s_arch, paper)]
            if row in pub and pub[row] != value:
                a, b = ("not applicable" if v is None else f"{v:.2f}" for v in (pub[row], value))
                raise KdbenchError(
                    f"--rank-corr {published_pair}: {source[row]} and {name} publish different numbers for "
                    f"{row} ({a} and {b}); name one of them"
                )
            pub[row], source[row] = value, name
    if not pub:
        raise KdbenchError(f"--rank-corr {published_pair}: {', '.join(names)} has no numbers for that pair")
    reference = ", ".join(dict.fromkeys(source.values()))  # the sources that gave this pair's numbers
    lines = []
    for t in tables.values():
        for pair in t.pairs:
            ours = {r: c.mean for r in t.rows if r != TEACHER and (c := t.cell(r, pair)) is not None and c.n}
            try:
                a = rank_agreement(ours, pub, pair=pair, published_pair=published_pair, reference=reference)
            except ValueError as exc:
                lines.append(f"Rank agreement: {exc}.")
                continue
            lines.append(render_agreement_md(a))
    return "\n" + "\n\n".join(lines) + "\n" if lines else ""


def _writable_folder(path: str, what: str) -> None:
    """A folder that exists or can be made, and can be written: bad input otherwise (one line, nothing written)."""
    import os

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise KdbenchError(f"{what} {path} is a file, not a folder")
    parent = next((a for a in [p, *p.parents] if a.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise KdbenchError(f"{what} {path} is not writable")


@cli.command()
@click.option("--results", default="results", type=click.Path(), help="Results folder.")
@click.option("--out", default=None, type=click.Path(), help="Report folder (default RESULTS/report).")
@click.option("--metric", default="top1_last", help="Metric of the tables (figures show top-1).")
@click.option("--reference", default=None, metavar="NAME[,NAME]", help="Published numbers: crd2020, rrd2024.")
@click.option("--vs", default=None, metavar="METHOD", help="Baseline of the paired comparisons (default kd).")
def report(results: str, out: str | None, metric: str, reference: str | None, vs: str | None) -> None:
    """Write a self-contained Markdown report (report.md + PNG figures) of a results folder."""
    from kdbench.report import write_report

    _collect(results)
    _writable_folder(out or str(Path(results) / "report"), "--out")
    path = write_report(results, out or str(Path(results) / "report"), metric=metric, reference=reference, vs=vs)
    console.print(f"-> {path} ({len(list(path.parent.glob('*.png')))} figures)")


@cli.command()
@click.argument("run", required=False)
@click.option(
    "--all",
    "all_runs",
    is_flag=True,
    help="Probe every finished run of --results (students and the teachers' own runs) not yet probed.",
)
@click.option(
    "--dataset", required=True, help="Probe data: tinyimagenet, stl10, cifar100 (any `kdbench list datasets`)."
)
@click.option(
    "--protocol",
    type=click.Choice(["paper", "fast", "smoke"]),
    default="paper",
    show_default=True,
    help="paper: 120 epochs, x0.1 at 30/60/90 (CRD); fast: 20 epochs; smoke: 2 epochs on a subset.",
)
@click.option("--data-root", default=None, type=click.Path(), help="Folder holding the probe data set.")
@click.option("--image-size", default=None, type=IMAGE_SIZE, help="Resize the probe images (default: the run's size).")
@click.option("--download", is_flag=True, help="Download the probe data when it is missing (needs internet).")
@click.option(
    "--results",
    default=None,
    type=click.Path(),
    help="Results folder (default: the one holding RUN's JSON, else ./results).",
)
@click.option("--seed", default=0, type=NON_NEGATIVE, show_default=True, help="Seed of the probe's head and batches.")
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N.")
@click.option("--force", is_flag=True, help="Train the probe again even when its JSON exists.")
def probe(run, all_runs, dataset, protocol, data_root, image_size, download, results, seed, device, force) -> None:
    """Linear probe of a finished run's frozen student on another data set (CRD transfer protocol).

    RUN is a run JSON file or a prefix of a run id in RESULTS/runs/; --all probes every finished run of RESULTS.
    Results go to RESULTS/probes/."""

    from kdbench.data import DATASETS
    from kdbench.probe import PROBE_PROTOCOLS, probe_label, resolve_run, run_probe
    from kdbench.results import ResultStore

    if dataset not in DATASETS:
        raise KdbenchError(f"unknown dataset {dataset!r}; datasets: {', '.join(DATASETS)}")
    if all_runs == (run is not None):
        raise KdbenchError("give one RUN (a run JSON or a run id prefix) or --all, not both or neither")
    if all_runs:
        _probe_all(results or "results", dataset, protocol, data_root, image_size, download, seed, device, force)
        return
    path, obj, root = resolve_run(run, results)
    target = ResultStore(root).probe_path(probe_label(path.stem, dataset, PROBE_PROTOCOLS[protocol].name, seed))
    if target.is_file() and not force:
        from kdbench.guard import is_number, read_json

        rec = read_json(target, root)
        if not isinstance(rec, dict) or not all(is_number(rec.get(k)) for k in ("top1_last", "top1_best")):
            raise KdbenchError(f"probe result {target} is malformed: --force to train the probe again")
        console.print(
            f"already probed: top-1 last {rec['top1_last']:.2f}, best {rec['top1_best']:.2f} -> {target} "
            "(--force to train it again)"
        )
        return
    rec = run_probe(
        obj,
        root,
        dataset,
        protocol=protocol,
        data_root=data_root,
        image_size=image_size,
        download=download,
        device=_device(device),
        seed=seed,
        run_file=path,
        log=lambda s: err_console.print(f"[dim]{s}[/dim]"),
    )
    paper = ""
    if rec.get("published") is not None:
        same = "" if rec.get("published_comparable") else ", another setting: see published_note"
        paper = f" (published: {rec['published']:.1f}{same})"
    console.print(
        f"{rec['method']} {rec['pair']} -> {dataset}: top-1 last {rec['top1_last']:.2f}, best "
        f"{rec['top1_best']:.2f} (epoch {rec['best_epoch']}){paper} -> {rec['path']}"
    )


SHOWN_SKIPS = 5  # skipped runs named one by one after `probe --all`; each was also named as it was reached


def _probe_all(results, dataset, protocol, data_root, image_size, download, seed, device, force) -> None:
    """`kdbench probe --all`: every finished run of a results folder, one after another; a run without weights
    (e.g. a folder whose weights/ was not kept) is skipped with its reason, the others go on."""
    from kdbench.probe import PROBE_PROTOCOLS, probe_label, run_probe
    from kdbench.results import ResultStore

    store = ResultStore(results)
    if not store.runs_dir.is_dir():
        raise KdbenchError(f"no runs in {store.root} (expected {store.runs_dir}); run `kdbench run` first")
    todo, skipped = [], []
    for path, obj, error in store.iter_runs():
        if obj is None:
            skipped.append(f"{path.name}: {error}")
        elif obj.get("status") != "done":
            continue
        elif store.probe_path(probe_label(path.stem, dataset, PROBE_PROTOCOLS[protocol].name, seed)).is_file() and (
            not force
        ):
            continue
        else:
            todo.append((path, obj))
    dev = _device(device)
    # the probe data, loaded once per image size before any probe: a bad --data-root is one line, not N skips
    from kdbench.data import load_dataset
    from kdbench.probe import MissingWeights, probe_image_size

    datasets = {}
    for size in sorted({probe_image_size(obj, image_size) for _p, obj in todo}):
        datasets[size] = load_dataset(dataset, data_root, image_size=size, download=download)
    done = 0
    for k, (path, obj) in enumerate(todo, 1):
        spec = obj["spec"]
        what = f"{spec['method']} {obj.get('pair', spec['student'])} seed {spec['seed']}"
        try:
            rec = run_probe(
                obj,
                store.root,
                dataset,
                protocol=protocol,
                data_root=data_root,
                image_size=image_size,
                download=download,
                device=dev,
                seed=seed,
                run_file=path,
                data=datasets[probe_image_size(obj, image_size)],
            )
        except MissingWeights as exc:
            skipped.append(f"{path.name}: {exc}")
            err_console.print(f"[{k}/{len(todo)}] {what}: skipped ({exc})", soft_wrap=True)
            continue
        done += 1
        console.print(f"[{k}/{len(todo)}] {what} -> {dataset}: top-1 last {rec['top1_last']:.2f} -> {rec['path']}")
    console.print(f"{done} runs probed, {len(skipped)} skipped" + (":" if skipped else ""))
    for line in skipped[:SHOWN_SKIPS]:
        console.print(f"  {line}", soft_wrap=True)
    if len(skipped) > SHOWN_SKIPS:
        console.print(f"  ... and {len(skipped) - SHOWN_SKIPS} more for the same kinds of reason", soft_wrap=True)


# ---------------------------------------------------------------------------------------------- bench


@cli.command()
@click.option("--pair", default="resnet32x4:resnet8x4", show_default=True, help="teacher:student.")
@click.option("--methods", "-m", default="kd,crd,rrd", show_default=True, help="Comma-separated method names.")
@click.option("--batch-size", default=64, type=int, show_default=True)
@click.option("--steps", default=50, type=int, show_default=True, help="Timed steps per configuration.")
@click.option("--warmup", default=10, type=int, show_default=True, help="Untimed steps before them (every round).")
@click.option(
    "--rounds",
    default=1,
    type=int,
    show_default=True,
    help="Interleave the configurations over this many rounds (a machine with a changing load).",
)
@click.option("--train-size", default=50000, type=int, show_default=True, help="Synthetic training images.")
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N.")
@click.option(
    "--workers",
    default=None,
    type=click.IntRange(min=0, max=64),
    help="Reference DataLoader workers (default min(8, cores)).",
)
@click.option("--cohort-sizes", default=None, help="Cohorts of the first k methods, e.g. 1,2,3 (default: all).")
@click.option(
    "--out",
    default=None,
    type=click.Path(),
    help="Folder of the JSON (default results/bench, the bench/ folder of the default results folder).",
)
@click.option(
    "--variants",
    default="eager-fp32",
    show_default=True,
    help="kdbench's loop in these variants, side by side: eager-fp32, eager-bf16, compile-fp32, "
    "compile-bf16 (comma-separated; the reference loop is eager fp32).",
)
@click.option(
    "--suite",
    type=click.Choice(["gpu"]),
    default=None,
    help="gpu: the one command of a first session on a CUDA machine (CUDA tests, every variant on "
    "resnet32x4:resnet8x4, one real epoch when CIFAR-100 is found; one JSON); see the README.",
)
@click.option("--dry-run", is_flag=True, help="With --suite gpu: check its plumbing on any device in about a minute.")
@click.option("--data-root", default=None, type=click.Path(), help="With --suite gpu: folder holding CIFAR-100.")
def bench(
    pair,
    methods,
    batch_size,
    steps,
    warmup,
    rounds,
    train_size,
    device,
    workers,
    cohort_sizes,
    out,
    variants,
    suite,
    dry_run,
    data_root,
) -> None:
    """Images/s and s per CIFAR-100 epoch: a reference-style DataLoader loop vs kdbench solo and cohorts."""
    from kdbench.bench import DEFAULT_OUT, bench_table, run_bench

    if dry_run and suite is None:
        raise KdbenchError("--dry-run goes with --suite gpu")
    if suite == "gpu":
        from kdbench.gpusuite import run_gpu_suite, summary_lines

        rec = run_gpu_suite(
            out=out, device=device, data_root=data_root, dry=dry_run, log=lambda s: err_console.print(f"[dim]{s}[/dim]")
        )
        for line in summary_lines(rec):
            console.print(line, soft_wrap=True)
        return

    record = run_bench(
        pair,
        methods,
        batch_size=batch_size,
        steps=steps,
        warmup=warmup,
        rounds=rounds,
        train_size=train_size,
        variants=variants,
        device=device,
        workers=workers,
        cohort_sizes=cohort_sizes,
        out=out or DEFAULT_OUT,
        log=lambda s: err_console.print(f"[dim]{s}[/dim]"),
    )
    console.print(bench_table(record))
    for name, reason in record["skipped"].items():
        err_console.print(f"[yellow]skipped[/yellow] {name}: {reason}")
    console.print(f"-> {record['path']}")


# ---------------------------------------------------------------------------------------------- teachers


@cli.group()
def teachers() -> None:
    """List, train or import teachers."""


@teachers.command("list")
@click.option("--results", default="results", type=click.Path())
def teachers_list(results: str) -> None:
    """Teachers stored in a results folder, with their cards."""
    from kdbench.results import ResultStore
    from kdbench.teachers import TeacherStore

    table = Table(title=f"teachers in {Path(results) / 'teachers'}")
    for col in ("arch", "dataset", "protocol", "seed", "top-1", "source", "file"):
        table.add_column(col)
    for c in TeacherStore(ResultStore(results)).list():
        if "error" in c:
            table.add_row(escape(c["label"]), "", "", "", "", f"[red]{escape(c['error'])}[/red]", "")
            continue
        top1 = c.get("top1")
        table.add_row(
            c["arch"],
            str(c.get("dataset")),
            str(c.get("protocol")),
            str(c.get("seed")),
            f"{top1:.2f}" if isinstance(top1, (int, float)) else "-",
            c.get("source", ""),
            c.get("weights", ""),
        )
    console.print(table)


@teachers.command("train")
@_with_options(_run_options)
def teachers_train(download, device, **selection) -> None:
    """Train (or reuse) the teachers that the given pairs need."""
    from kdbench.config import parse_sets
    from kdbench.sweep import Sweep

    method_keys = [k for k in parse_sets(selection["sets"]) if not k.startswith("protocol.")]
    if method_keys:  # a teacher is the vanilla ce run: no method setting applies to it
        raise KdbenchError(
            f"--set {method_keys[0]}: teachers train takes protocol.KEY=V settings only (teachers are trained by the "
            "vanilla ce run, no method)"
        )
    _, store, specs = _prepare(["kd"], **selection)
    store.ensure_writable()
    dev = _device(device)
    with _progress() as progress:
        sweep = Sweep(store, dev, download=download, progress=progress, log=lambda s: err_console.print(s))
        done = {}
        for s in specs:
            if s.teacher is not None and s.teacher.label not in done:
                _, card = sweep.teacher(s.teacher, sweep.data.get(s.data))
                done[s.teacher.label] = card
    for label, card in done.items():
        console.print(f"{label}: top-1 {card.get('top1')}")


@teachers.command("import")
@click.argument("file", type=click.Path())
@click.option("--arch", required=True, help="Architecture of the checkpoint (e.g. resnet32x4).")
@click.option("--dataset", required=True, help="Dataset it was trained on (e.g. cifar100).")
@click.option("--image-size", default=None, type=IMAGE_SIZE)
@click.option("--num-classes", default=100, type=click.IntRange(min=1))
@click.option("--results", default="results", type=click.Path())
@click.option(
    "--download", is_flag=True, help="With FILE = torchvision:WEIGHTS: fetch the weights when they are not cached."
)
def teachers_import(file, arch, dataset, image_size, num_classes, results, download) -> None:
    """Import a published RepDistiller / mdistiller checkpoint (a dict whose 'model' entry is the state dict),
    read without executing pickled code; later runs on that dataset use it as the teacher.

    FILE may be torchvision:WEIGHTS, torchvision's published weights by name (e.g. torchvision:
    ResNet34_Weights.IMAGENET1K_V1 for --arch tv_resnet34 --dataset imagenet --num-classes 1000), read from
    torch.hub's cache, or fetched there with --download."""
    from kdbench.config import DataSpec
    from kdbench.data import DATASETS
    from kdbench.models.base import check_model_name
    from kdbench.results import ResultStore
    from kdbench.teachers import TeacherStore

    check_model_name(arch)
    if dataset not in DATASETS:
        raise KdbenchError(f"unknown dataset {dataset!r}; datasets: {', '.join(DATASETS)}")
    store = ResultStore(results)
    path = Path(file)
    if file.startswith("torchvision:"):
        from kdbench.teachers import torchvision_weights

        path = torchvision_weights(file.removeprefix("torchvision:"), download)
    card = TeacherStore(store).import_checkpoint(path, arch, DataSpec(dataset, None, image_size), num_classes)
    console.print(f"imported {arch} for {dataset}: {card['weights']}")


def main() -> None:
    """Entry point: KdbenchError and usage errors -> one line on stderr, exit code 2, no traceback."""
    try:
        if any("\x00" in arg for arg in sys.argv[1:]):  # the OS cannot take it in a path or a name
            raise KdbenchError("an argument holds a NUL byte: no name, path or value may")
        cli.main(standalone_mode=False)
    except KdbenchError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort as exc:
        # click turns Ctrl-C (KeyboardInterrupt) into Abort: it is an interruption, not a refused prompt.
        if isinstance(exc.__context__, KeyboardInterrupt) or isinstance(exc.__cause__, KeyboardInterrupt):
            _interrupted()
        err_console.print("aborted")
        sys.exit(1)
    except click.ClickException as exc:
        # Usage errors too: one line, no usage block, exit code 2.
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        _interrupted()
    except OSError as exc:
        # The machine, not the input: a full disk, a file-size limit, a read-only or vanished folder.
        click.echo(f"error: {os_error_line(exc)}", err=True)
        sys.exit(2)


def _interrupted() -> None:
    err_console.print("interrupted: rerun the same command to resume where it stopped")
    sys.exit(130)


def os_error_line(exc: OSError) -> str:
    """One line for an operating-system error, saying plainly when the disk or a size limit is the cause."""
    import errno

    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    what = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full{where}: {what}; free space (or set a larger quota) and rerun the same command"
    if exc.errno == errno.EFBIG:
        return f"file-size limit reached{where}: {what}; raise it (ulimit -f) and rerun the same command"
    return f"{what}{where}"


if __name__ == "__main__":
    main()
