"""Teachers: weights-only files (safetensors) with a JSON card, trained by the same loop or imported.

A trained teacher of architecture A on data D under protocol P with seed s *is* the vanilla (``ce``) run of A
on D under P with seed s: its weights are copied to ``teachers/<label>.safetensors`` with a card beside them.
An imported teacher (a published RepDistiller / mdistiller checkpoint) takes precedence for its (A, D).
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from kdbench.config import DataSpec, TeacherSpec
from kdbench.errors import KdbenchError
from kdbench.files import atomic_path, atomic_write_json
from kdbench.guard import check_card, read_json
from kdbench.models import create_model, freeze
from kdbench.results import ResultStore


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Atomic safetensors write of a state dict (weights only: nothing executable)."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp)


def load_weights_into(model: nn.Module, path: Path, what: str, prefix: str = "") -> None:
    """Load a safetensors file into a model, with one clear error for a corrupt file or a wrong architecture.

    ``prefix``: load only the keys under it, without it (the student inside a saved composite model, e.g. SimKD's
    student + projector + teacher classifier, whose run JSON names the prefix under model.student_prefix)."""
    try:
        state = load_file(str(path))
    except OSError as exc:  # the file is there but cannot be read (permissions, I/O): not a reason to delete it
        raise KdbenchError(
            f"{what} {path} is unreadable ({exc.strerror or exc}); check its permissions and the disk"
        ) from None
    except (SafetensorError, ValueError) as exc:
        raise KdbenchError(
            f"{what} {path} is corrupt or truncated ({exc}); delete it and train or import it again"
        ) from None
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    check_state_dict(model, state, what, path)
    model.load_state_dict(state, strict=True)


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], what: str, path: Path | str) -> None:
    ours = model.state_dict()
    missing = [k for k in ours if k not in state]
    extra = [k for k in state if k not in ours]
    shapes = [k for k in ours if k in state and tuple(state[k].shape) != tuple(ours[k].shape)]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected keys (e.g. {extra[0]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[0]})")
        raise KdbenchError(f"{what} {path} does not match architecture {type(model).__name__}: {'; '.join(parts)}")


def _recorded_accuracy(obj: Any) -> float | None:
    """The accuracy a published checkpoint records (a number or a one-element tensor), when it is a finite number in
    [0, 100]; anything else (NaN, a string, a vector) is not an accuracy and is left out of the card."""
    acc = obj.get("accuracy") if isinstance(obj, dict) else None
    if isinstance(acc, torch.Tensor) and acc.numel() == 1:
        acc = acc.item()
    if isinstance(acc, (int, float)) and not isinstance(acc, bool) and math.isfinite(acc) and 0 <= acc <= 100:
        return float(acc)
    return None


class TeacherStore:
    def __init__(self, store: ResultStore):
        self.store = store
        self.dir = store.teachers_dir

    def card_path(self, label: str) -> Path:
        return self.store.own(self.dir / f"{label}.json", "teacher card")

    def weights_path(self, label: str) -> Path:
        return self.store.own(self.dir / f"{label}.safetensors", "teacher weights")

    @staticmethod
    def imported_label(arch: str, data: DataSpec) -> str:
        return TeacherSpec(arch, data, None, 0, imported="x").label  # type: ignore[arg-type]

    def imported_card(self, arch: str, data: DataSpec) -> dict[str, Any] | None:
        path = self.card_path(self.imported_label(arch, data))
        return self._read_card(path) if path.is_file() else None

    def card(self, spec: TeacherSpec) -> dict[str, Any] | None:
        path = self.card_path(spec.label)
        if not path.is_file() or not self.weights_path(spec.label).is_file():
            return None
        return self._read_card(path)

    def _read_card(self, path: Path) -> dict[str, Any]:
        """A card read with a size cap and checked field by field: a card of the wrong types is refused here,
        never carried into the students' JSON."""
        try:
            card = read_json(path, self.dir)
        except KdbenchError as exc:
            raise KdbenchError(f"teacher card {exc}; delete it and train or import again") from None
        return check_card(card, path)

    def verify(self, label: str, card: dict[str, Any], arch: str) -> None:
        """Before a teacher is used: its weights file is the one its card names (weights_sha256) and holds only
        finite numbers. Each problem is one line saying which file to delete or re-import."""
        weights = self.weights_path(label)
        try:
            digest = sha256_file(weights)
        except OSError as exc:
            raise KdbenchError(
                f"teacher weights {weights} are unreadable ({exc.strerror or exc}); check its permissions and the disk"
            ) from None
        try:
            state = load_file(str(weights))
        except OSError as exc:
            raise KdbenchError(f"teacher weights {weights} are unreadable ({exc.strerror or exc})") from None
        except (SafetensorError, ValueError) as exc:
            raise KdbenchError(
                f"teacher weights {weights} are corrupt or truncated ({exc}); delete them and their card "
                f"{self.card_path(label).name}, then train or import the teacher again"
            ) from None
        if card.get("weights_sha256") != digest:
            redo = "import it again" if card.get("source") == "imported" else "train it again (kdbench teachers train)"
            raise KdbenchError(
                f"teacher weights {weights} do not match weights_sha256 of their card {self.card_path(label).name} "
                f"(the file was replaced or damaged): delete both and {redo}"
            )
        broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if broken:
            raise KdbenchError(
                f"teacher {arch} ({weights}) holds NaN or infinite values in {len(broken)} tensors (e.g. {broken[0]}): "
                "delete its weights and card and train or import it again"
            )

    def save(self, spec: TeacherSpec, model: nn.Module, card: dict[str, Any]) -> dict[str, Any]:
        weights = self.weights_path(spec.label)
        save_weights(weights, model.state_dict())
        card = {**card, "weights": weights.name, "weights_sha256": sha256_file(weights), "teacher_id": spec.teacher_id}
        atomic_write_json(self.card_path(spec.label), card)
        return card

    def load(self, spec: TeacherSpec, num_classes: int, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
        card = self.card(spec)
        if card is None:
            raise KdbenchError(f"no teacher {spec.arch} for {spec.data.name} in {self.dir}")
        self.verify(spec.label, card, spec.arch)
        return self._frozen(spec.arch, spec.label, num_classes, device), card

    def _frozen(self, arch: str, label: str, num_classes: int, device: torch.device) -> nn.Module:
        """A teacher from its weights file: eval mode, no gradients."""
        model = create_model(arch, num_classes=num_classes)
        load_weights_into(model, self.weights_path(label), "teacher file")
        return freeze(model, device)

    def list(self) -> list[dict[str, Any]]:
        out = []
        for path in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []:
            try:
                card = self._read_card(path)
            except KdbenchError as exc:
                card = {"label": path.stem, "error": str(exc)}
            out.append({**card, "label": path.stem})
        return out

    def import_checkpoint(self, file: Path, arch: str, data: DataSpec, num_classes: int) -> dict[str, Any]:
        """Import a published checkpoint (a dict whose 'model' entry is the state dict, or a bare state dict)
        without executing pickled code (torch.load with weights_only=True)."""
        file = Path(file)
        if not file.is_file():
            raise KdbenchError(f"teacher checkpoint {file} not found")
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise KdbenchError(
                f"{file} cannot be read as a weights-only checkpoint (refused or corrupt: {first})"
            ) from None
        state = obj.get("model", obj) if isinstance(obj, dict) else None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise KdbenchError(f"{file}: expected a state dict or a dict with a 'model' state dict")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if broken:  # a teacher with NaN weights would make every student's loss NaN
            raise KdbenchError(f"{file}: {len(broken)} tensors hold NaN or infinite values (e.g. {broken[0]})")
        model = create_model(arch, num_classes=num_classes)
        check_state_dict(model, state, "teacher checkpoint", file)
        model.load_state_dict(state, strict=True)
        self.store.ensure_writable()  # only now that the checkpoint is known to be good
        label = self.imported_label(arch, data)
        weights = self.weights_path(label)
        save_weights(weights, model.state_dict())
        card = {
            "arch": arch,
            "dataset": data.name,
            "image_size": data.image_size,
            "source": "imported",
            "original_file": file.name,
            "original_sha256": sha256_file(file),
            "protocol": None,
            "seed": None,
            "top1": _recorded_accuracy(obj),
            "weights": weights.name,
            "weights_sha256": sha256_file(weights),
            "created": time.time(),
        }
        atomic_write_json(self.card_path(label), card)
        return card

    def load_imported(self, arch: str, data: DataSpec, num_classes: int, device: torch.device):
        card = self.imported_card(arch, data)
        if card is None:
            raise KdbenchError(f"no imported teacher {arch} for {data.name} in {self.dir}")
        self.verify(self.imported_label(arch, data), card, arch)
        return self._frozen(arch, self.imported_label(arch, data), num_classes, device), card


def torchvision_weights(name: str, download: bool = False) -> Path:
    """The local file of torchvision's published weights ``name`` (e.g. ``ResNet34_Weights.IMAGENET1K_V1``), in
    torch.hub's checkpoint folder ($TORCH_HOME/hub/checkpoints). Fetched only with ``download`` (and then checked
    against the hash prefix of its file name); the caller imports it with ``weights_only`` loading, so no pickled
    code runs whichever way the file came."""
    import torch.hub
    from torchvision.models import get_weight

    try:
        weights = get_weight(name)
    except (ValueError, KeyError, AttributeError):
        raise KdbenchError(
            f"unknown torchvision weights {name!r}: use an enum value such as ResNet34_Weights.IMAGENET1K_V1"
        ) from None
    url = weights.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if path.is_file():
        return path
    if not download:
        raise KdbenchError(f"torchvision weights {name} are not in {path.parent}: pass --download to fetch {url}")
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = path.stem.rsplit("-", 1)[-1] if "-" in path.stem else None
    try:
        torch.hub.download_url_to_file(url, str(path), hash_prefix=digest, progress=False)
    except Exception as exc:  # no network, a proxy, a truncated file: one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KdbenchError(f"could not download {url}: {first}") from None
    return path
