"""``kdbench bench --suite gpu``: everything a first session on a CUDA machine has to run, in one command.

1. the CUDA-marked tests (``pytest -m cuda``; they are skipped on a machine without a GPU);
2. ``kdbench bench`` on resnet32x4:resnet8x4 at batch 64 (synthetic data already on the device): the reference-style
   loop against kdbench solo and a cohort of KD, CRD and RRD, in eager fp32, eager bf16, compiled fp32 and compiled
   bf16;
3. one real training epoch of that cohort (eager fp32 and compiled bf16) when CIFAR-100 is found (``--data-root``,
   else the default data folder); skipped, and said so, when it is not;
4. one JSON under ``results/bench/`` with the device's name, each part's outcome and the wall time of each part.

Parts are run in this order and a part that would start after ``budget_s`` seconds is skipped (recorded as such),
so the whole stays within the budget (8 minutes by default). ``dry=True`` checks the plumbing on any machine in
about a minute: the same parts on a tiny pair, tiny synthetic data and a few steps, torch.compile with its
"eager" backend (graph capture without code generation), and the CPU allowed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kdbench.errors import KdbenchError

SUITE_SCHEMA = 1
PAIR = "resnet32x4:resnet8x4"
METHODS = ("kd", "crd", "rrd")
VARIANTS = ("eager-fp32", "eager-bf16", "compile-fp32", "compile-bf16")
BUDGET_S = 480.0


def _tests(dry: bool, say: Callable[[str], None]) -> dict[str, Any]:
    root = Path(__file__).resolve().parents[1]
    if not (root / "tests").is_dir():
        return {"status": "skipped", "reason": f"no tests/ folder beside the package ({root})"}
    # Only the files that carry the marker: collecting the whole suite would import every test module.
    files = sorted(
        str(f.relative_to(root))
        for f in (root / "tests").glob("test_*.py")
        if "mark.cuda" in f.read_text(errors="replace")
    )
    if not files:
        return {"status": "none selected", "reason": "no test file carries the cuda marker"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *files]
    say("running " + " ".join(cmd[2:]))
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    summary = lines[-1] if lines else ""
    # pytest exits 5 when nothing was selected; 0 when the selected tests passed or were skipped (no GPU)
    status = "passed" if proc.returncode == 0 else "none selected" if proc.returncode == 5 else "failed"
    return {
        "status": status,
        "returncode": proc.returncode,
        "summary": summary,
        "command": " ".join(cmd[2:]),
        **({"output_tail": proc.stdout[-4000:] + proc.stderr[-2000:]} if status == "failed" else {}),
    }


def _real_epoch(
    device: torch.device,
    data_root: str | None,
    dry: bool,
    compile_backend: bool | str,
    variants: list[str],
    say: Callable[[str], None],
) -> dict[str, Any]:
    from kdbench.bench import _specs
    from kdbench.data import load_dataset
    from kdbench.models import create_model
    from kdbench.train import build_member, prepare_model, train_cohort

    if dry:
        data = load_dataset("synthetic", num_classes=10, image_size=16, train_size=128, test_size=64, seed=0)
        pair, label = "resnet8:resnet8", "synthetic (dry run)"
    else:
        try:
            data = load_dataset("cifar100", data_root)
        except KdbenchError as exc:
            return {"status": "skipped", "reason": f"CIFAR-100 not found: {exc}"}
        pair, label = PAIR, "cifar100"
    out: dict[str, Any] = {
        "status": "done",
        "data": label,
        "train_images": len(data.train_labels),
        "pair": pair,
        "methods": list(METHODS),
        "epochs": {},
    }
    specs = {s.method: s for s in _specs(pair, list(METHODS), 64)}
    for variant in variants:
        import copy
        import dataclasses

        compiled, precision = variant.startswith("compile"), variant.split("-")[1]
        with torch.random.fork_rng(devices=[]):  # a random teacher with the data's classes: speed only
            torch.manual_seed(0)
            teacher = create_model(pair.split(":")[0], num_classes=data.num_classes)
        teacher.to(device).eval().requires_grad_(False)
        if compiled:
            teacher = prepare_model(copy.deepcopy(teacher), compile=compile_backend)
        members = []
        for name in METHODS:
            spec = dataclasses.replace(
                specs[name], precision=precision, protocol=dataclasses.replace(specs[name].protocol, epochs=1)
            )
            members.append(build_member(spec, data, teacher, device, compile=compile_backend if compiled else False))
        say(f"one epoch of a {len(members)}-method cohort on {label} ({variant})")
        t0 = time.perf_counter()
        train_cohort(members, data, teacher, device, save=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
        out["epochs"][variant] = {
            "wall_seconds": wall,
            "epoch_seconds": members[0].epoch_seconds[0],
            "note": "wall_seconds includes the evaluation of every member and, compiled, the compilation",
            "top1": {m.spec.method: m.last_eval.get("top1") for m in members},
            "failed": {m.spec.method: m.failed for m in members if m.failed},
        }
    return out


def run_gpu_suite(
    *,
    out: str | Path = "results/bench",
    device: str = "auto",
    data_root: str | None = None,
    dry: bool = False,
    budget_s: float = BUDGET_S,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the suite and write its JSON; return the record (its path under "path")."""
    from kdbench.bench import run_bench
    from kdbench.files import atomic_write_json
    from kdbench.system import device_name, environment, resolve_device

    say = log or (lambda s: None)
    dev = resolve_device(device)
    if dev.type != "cuda" and not dry:
        raise KdbenchError(f"the gpu suite needs a CUDA device (got {dev}); --dry-run checks its plumbing on the CPU")
    start = time.perf_counter()
    parts: dict[str, Any] = {}
    timings: dict[str, float] = {}
    backend: bool | str = "eager" if dry else True

    def part(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        if time.perf_counter() - start > budget_s:
            parts[name] = {"status": "skipped", "reason": f"time budget of {budget_s:.0f} s spent"}
            return
        t0 = time.perf_counter()
        try:
            parts[name] = fn()
        except Exception as exc:  # one broken part must not lose the others' results
            parts[name] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
        timings[name] = time.perf_counter() - t0

    part("tests", lambda: _tests(dry, say))
    bench_args: dict[str, Any] = (
        {"pair": "resnet8:resnet8", "batch_size": 8, "steps": 2, "warmup": 1, "train_size": 64, "workers": 0}
        if dry
        else {"pair": PAIR, "batch_size": 64, "steps": 50, "warmup": 10, "train_size": 50_000}
    )
    part(
        "speed",
        lambda: {
            "status": "done",
            **run_bench(
                bench_args.pop("pair"),
                METHODS,
                device=dev,
                out=None,
                variants=VARIANTS,
                compile_backend=backend,
                cohort_sizes=str(len(METHODS)),
                log=say,
                **bench_args,
            ),
        },
    )
    part("real_epoch", lambda: _real_epoch(dev, data_root, dry, backend, ["eager-fp32", "compile-bf16"], say))

    record = {
        "kind": "kdbench.gpu_suite",
        "schema": SUITE_SCHEMA,
        "dry_run": dry,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device_name": device_name(dev),
        "environment": environment(dev),
        "budget_seconds": budget_s,
        "total_seconds": time.perf_counter() - start,
        "part_seconds": timings,
        "parts": parts,
    }
    folder = Path(out)
    tag = "".join(c if c.isalnum() or c in ".+-" else "-" for c in f"{dev.type}-{device_name(dev)}").strip("-")
    path = folder / f"gpu-suite-{'dry-' if dry else ''}{tag}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    record["path"] = str(path)
    try:
        atomic_write_json(path, record)
    except OSError as exc:
        raise KdbenchError(f"cannot write {path}: {exc.strerror or exc}") from None
    return record


def summary_lines(record: dict[str, Any]) -> list[str]:
    """A few lines for the terminal."""
    lines = [
        f"gpu suite on {record['device_name']}{' (dry run)' if record['dry_run'] else ''}: "
        f"{record['total_seconds']:.0f} s"
    ]
    for name, p in record["parts"].items():
        extra = p.get("summary") or p.get("reason") or p.get("error") or ""
        lines.append(f"  {name}: {p['status']}{' - ' + extra if extra else ''}")
    speed = record["parts"].get("speed", {})
    for row in speed.get("results", []):
        if row.get("measured"):
            lines.append(
                f"    {row['config']:9s} {row.get('variant', ''):12s} {','.join(row['methods']):12s} "
                f"{row['images_per_s']:10,.0f} img/s  {row['epoch_seconds']:8.1f} s/epoch*"
            )
    for variant, e in record["parts"].get("real_epoch", {}).get("epochs", {}).items():
        lines.append(f"    real epoch {variant}: {e['epoch_seconds']:.1f} s")
    lines.append(f"-> {record['path']}")
    return lines


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run_gpu_suite(dry="--dry-run" in sys.argv), indent=1)[:2000])
