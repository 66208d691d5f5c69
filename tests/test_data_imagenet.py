"""The ImageNet folder dataset: layout checks, batches decoded in DataLoader workers, the eval transform, the pair
set, the reference numbers and the multi-GPU SLURM job of --dry-run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kdbench.cli import cli
from kdbench.data import load_dataset
from kdbench.data.imagenet import IMAGENET_MEAN, IMAGENET_STD, random_resized_crop_box
from kdbench.errors import KdbenchError
from kdbench.tables import load_reference
from tests.imagefolder import make_imagefolder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("inet"))


def test_the_folder_reads_as_imagenet(folder: Path) -> None:
    data = load_dataset("imagenet", folder, image_size=24, num_workers=0)
    assert (data.num_classes, data.num_train, data.num_test, data.image_size) == (4, 32, 8, 24)
    assert data.classes == [f"n{c:08d}" for c in range(4)]
    assert data.train_labels.tolist() == [c for c in range(4) for _ in range(8)]
    assert data.resize_size == round(24 * 256 / 224)
    assert load_dataset("imagenet", folder, image_size=24).checksum == data.checksum  # the files, not the options


def test_training_batches_are_the_same_from_worker_processes(folder: Path) -> None:
    """Each sample's crop and flip come from its own (seed, epoch, index) generator: decoded in a worker process
    or in the main one, the batches are identical; another epoch gives other crops and another order."""
    main = load_dataset("imagenet", folder, image_size=24, num_workers=0).train_loader(8, seed=3)
    workers = load_dataset("imagenet", folder, image_size=24, num_workers=2).train_loader(8, seed=3)
    a, b = list(main.epoch(1)), list(workers.epoch(1))
    assert len(a) == len(main) == 4
    for x, y in zip(a, b):
        assert x.images.shape == (8, 3, 24, 24) and x.images.dtype == torch.float32
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels) and torch.equal(x.index, y.index)
    assert sorted(torch.cat([x.index for x in a]).tolist()) == list(range(32))
    data = main.split
    assert all(int(x.labels[i]) == data.samples[int(x.index[i])][1] for x in a for i in range(8))
    other = list(main.epoch(2))
    assert not torch.equal(torch.cat([x.index for x in a]), torch.cat([x.index for x in other]))


def test_evaluation_is_resize_then_center_crop(folder: Path) -> None:
    import torchvision.transforms as T
    from PIL import Image

    data = load_dataset("imagenet", folder, image_size=24, num_workers=0)
    (batch,) = list(data.test_loader(64))
    assert batch.index.tolist() == list(range(8))
    reference = T.Compose([T.Resize(27), T.CenterCrop(24), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    with Image.open(data.test_split.samples[5][0]) as im:
        expected = reference(im.convert("RGB"))
    torch.testing.assert_close(batch.images[5], expected, rtol=0, atol=1e-6)


def test_random_resized_crop_box_stays_in_its_ranges() -> None:
    g = torch.Generator().manual_seed(0)
    for h, w in [(32, 36), (375, 500), (500, 120), (7, 300)]:
        for _ in range(200):
            top, left, ch, cw = random_resized_crop_box(h, w, g)
            assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0
    # a reasonable image: the area fraction and the aspect ratio follow the recipe's ranges (rounding aside)
    for _ in range(200):
        _, _, ch, cw = random_resized_crop_box(375, 500, g)
        assert 0.07 <= ch * cw / (375 * 500) <= 1.0
        assert math.log(3 / 4) - 0.05 <= math.log(cw / ch) <= math.log(4 / 3) + 0.05


def test_bad_folders_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(KdbenchError, match="train not found"):
        load_dataset("imagenet", tmp_path)
    root = make_imagefolder(tmp_path / "x", classes=2, train_per_class=1, val_per_class=1)
    (root / "val" / "n00000001").rename(root / "val" / "flat")
    with pytest.raises(KdbenchError, match="same class folders"):
        load_dataset("imagenet", root)
    with pytest.raises(KdbenchError, match="cannot be downloaded"):
        load_dataset("imagenet", root, download=True)
    result = CliRunner().invoke(
        cli, ["run", "-m", "kd", "-p", "imagenet", "--data-root", str(tmp_path / "nowhere"), "--device", "cpu"]
    )
    # KdbenchError: kdbench's main() prints it as one line and exits with 2
    assert isinstance(result.exception, KdbenchError) and str(result.exception).startswith("imagenet: ")


def test_pair_set_protocol_and_reference() -> None:
    result = CliRunner().invoke(cli, ["list", "pairs"])
    assert result.exit_code == 0 and "imagenet" in result.output and "tv_resnet34:tv_resnet18" in result.output
    from kdbench.config import load_bench

    bench = load_bench()
    proto = bench.protocols["imagenet"]
    assert (proto.epochs, proto.batch_size, proto.lr, proto.weight_decay, proto.milestones) == (
        100,
        256,
        0.1,
        1e-4,
        (30, 60, 90),
    )
    ref, _ = load_reference("mdistiller-imagenet")
    assert ref[("tv_resnet34", "tv_resnet18", "DKD")] == 71.70
    assert ref[("tv_resnet50", "mobilenetv1", "KD")] == 70.50
    assert len(ref) == 4 and not set(ref) & set(load_reference("crd2020,dkd2022")[0])


def test_slurm_dry_run_prints_the_multi_gpu_job(tmp_path: Path) -> None:
    pytest.importorskip("submitit")
    args = ["run", "-m", "kd", "-p", "smoke", "--executor", "slurm", "--dry-run", "--results", str(tmp_path)]
    result = CliRunner().invoke(cli, [*args, "--nproc-per-node", "8", "--slurm-nodes", "2"])
    assert result.exit_code == 0, result.output
    assert "#SBATCH --nodes=2" in result.output
    assert "#SBATCH --ntasks-per-node=8" in result.output
    assert "#SBATCH --gpus-per-node=8" in result.output
    single = CliRunner().invoke(cli, args)
    assert "--ntasks-per-node=1" in single.output and "--nodes=1" in single.output
    bad = CliRunner().invoke(cli, ["run", "-m", "kd", "-p", "smoke", "--slurm-nodes", "2", "--dry-run"])
    assert isinstance(bad.exception, KdbenchError) and "--executor slurm" in str(bad.exception)


def test_torchvision_teacher_by_name_only_with_download_or_cached(tmp_path: Path, monkeypatch) -> None:
    """torchvision's weights by name: refused without --download when not cached; a cached file (made here
    locally, no network) is imported with weights-only loading and becomes the imagenet pair's teacher."""
    import torchvision

    from kdbench.config import DataSpec
    from kdbench.results import ResultStore
    from kdbench.teachers import TeacherStore

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    results = tmp_path / "res"
    args = ["teachers", "import", "torchvision:ResNet18_Weights.IMAGENET1K_V1", "--arch", "tv_resnet18"]
    args += ["--dataset", "imagenet", "--num-classes", "1000", "--results", str(results)]
    refused = CliRunner().invoke(cli, args)
    assert isinstance(refused.exception, KdbenchError) and "--download" in str(refused.exception)
    bad = CliRunner().invoke(cli, ["torchvision:NoSuch_Weights.X" if a.startswith("torchvision:") else a for a in args])
    assert isinstance(bad.exception, KdbenchError) and "unknown torchvision weights" in str(bad.exception)

    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cached = tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, cached)
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 0, done.output
    model, card = TeacherStore(ResultStore(results)).load_imported(
        "tv_resnet18", DataSpec("imagenet", None, None), 1000, torch.device("cpu")
    )
    assert torch.equal(model.state_dict()["fc.weight"], state["fc.weight"])
    assert card["arch"] == "tv_resnet18"


def test_ranks_share_an_epoch_without_repeating_a_sample(folder: Path, monkeypatch) -> None:
    """32 images in global batches of 12 over 3 ranks: torch's DistributedSampler(drop_last=False) would pad the
    epoch to 33 by repeating a sample; kdbench's order is its permutation unpadded, every sample once, and the
    last batch's 8 rows split 3 / 3 / 2 (each batch says how many rows its global batch has)."""
    from torch.utils.data.distributed import DistributedSampler

    from kdbench import distributed

    data = load_dataset("imagenet", str(folder), image_size=16, num_workers=0)
    one = data.train_loader(12, seed=5)
    reference = DistributedSampler(data.train_split, num_replicas=1, rank=0, shuffle=True, seed=5)
    reference.set_epoch(2)
    assert list(one._sampler(2)) == list(reference)  # one process: DistributedSampler's order, bitwise as before
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    shards, rows = [], []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        loader = data.train_loader(12, seed=5)
        shards.append(list(loader._sampler(2)))
        batches = list(loader.epoch(2))
        assert len(batches) == len(loader) == 3
        rows.append([(b.labels.numel(), getattr(b, "global_rows", None)) for b in batches])
    assert sorted(i for s in shards for i in s) == list(range(32))
    order = list(reference)
    assert [order[r::3] for r in range(3)] == shards
    assert rows == [[(4, 12), (4, 12), (3, 8)], [(4, 12), (4, 12), (3, 8)], [(4, 12), (4, 12), (2, 8)]]
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    with pytest.raises(KdbenchError, match="batch size 8 does not split evenly over 3 processes"):
        data.train_loader(8)
    cut = data.train_loader(12, seed=5, drop_last=True)  # whole global batches only: 24 samples, 8 per rank
    assert len(cut) == 2 and len(list(cut._sampler(2))) == 8
