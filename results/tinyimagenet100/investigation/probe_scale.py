"""Is a low transfer number the features or their scale? For every probed student that still has its weights: the
committed SGD linear probe's top-1 (`kdbench probe`, CRD's protocol: raw pooled features, lr 0.05, weight decay
5e-4, here 20 epochs) beside a closed-form ridge classifier on the same frozen pooled features standardised per
unit (mean 0, std 1 on the probe's training split, no augmentation, lambda 0.01 per sample), which does not depend
on the features' scale; and the features' scale (root mean square of the pooled features).

    OMP_NUM_THREADS=1 python results/tinyimagenet100/investigation/probe_scale.py RESULTS PROBE_DATA_ROOT

RESULTS is a results folder whose weights/ still holds the students (weights are not committed), e.g. the folder
the sweep trained into; PROBE_DATA_ROOT the probe data (../shared/data/tiny-imagenet-100b).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from kdbench.data import load_dataset
from kdbench.probe import MissingWeights, load_student


def pooled(model: torch.nn.Module, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(images), 1000):
            x = images[i : i + 1000].float() / 255.0
            out.append(model((x - mean) / std).pooled.float())
    return torch.cat(out)


def ridge_top1(f_train, y_train, f_test, y_test, classes: int, lam: float = 1e-2) -> float:
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    a = torch.cat([(f_train - mu) / sd, torch.ones(len(f_train), 1)], 1).double()
    b = torch.cat([(f_test - mu) / sd, torch.ones(len(f_test), 1)], 1).double()
    y = torch.nn.functional.one_hot(y_train.long(), classes).double()
    w = torch.linalg.solve(a.T @ a + lam * len(a) * torch.eye(a.shape[1], dtype=a.dtype), a.T @ y)
    return (b @ w).argmax(1).eq(y_test.long()).double().mean().item() * 100


def main(results: str, data_root: str) -> str:
    root = Path(results)
    data = load_dataset("tinyimagenet", data_root, image_size=16)
    assert data.train_images.dtype == torch.uint8
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    lines = [
        "| run | SGD probe top-1 (committed) | ridge on standardised features | feature RMS |",
        "|---|---:|---:|---:|",
    ]
    for probe_file in sorted((root / "probes").glob("*.json")):
        probe = json.loads(probe_file.read_text())
        if probe["dataset"]["checksum"] != data.checksum or probe["dataset"]["image_size"] != 16:
            continue  # a probe of other data (or another size): not comparable with the ridge probe here
        run_file = next((root / "runs").glob(f"*__{probe['run_id']}.json"), None)
        if run_file is None:
            continue
        run = json.loads(run_file.read_text())
        try:
            model = load_student(run, root, torch.device("cpu"))
        except MissingWeights:
            continue
        f_train = pooled(model, data.train_images, mean, std)
        f_test = pooled(model, data.test_images, mean, std)
        ridge = ridge_top1(f_train, data.train_labels, f_test, data.test_labels, len(data.classes))
        rms = f_train.pow(2).mean().sqrt().item()
        spec = run["spec"]
        # a run without a teacher is a vanilla model: resnet8 is the vanilla student, resnet20 the teacher
        name = (
            f"{spec['method']} s{spec['seed']}" if spec.get("teacher") else f"vanilla {spec['student']} s{spec['seed']}"
        )
        lines.append(f"| {name} | {probe['top1_last']:.2f} | {ridge:.2f} | {rms:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python results/tinyimagenet100/investigation/probe_scale.py RESULTS PROBE_DATA_ROOT")
    torch.manual_seed(0)
    print(main(sys.argv[1], sys.argv[2]), end="")
