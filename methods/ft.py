"""Factor transfer (Kim et al. 2018): a teacher-side autoencoder (paraphraser) extracts "factors" from the
teacher's last map; a student-side translator learns to produce matching factors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.losses import match_spatial
from kdbench.method import Batch, InitStage, Method, MethodConfig, MethodContext, Progress
from kdbench.models.base import ModelOutput

FACTOR_MODES = ("attention", "flatten")


@dataclass
class FTConfig(MethodConfig):
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    weight: float = 200.0
    factor_rate: float = 0.5
    factor_mode: str = "attention"
    factor_power: float = 2.0
    paraphraser_lr: float = 0.01  # init-stage lr for CIFAR ResNet / WRN students (RepDistiller helper/pretrain.py)

    RANGES = {
        **MethodConfig.RANGES,
        "factor_rate": ">0",
        "factor_mode": ("attention", "flatten"),
        "factor_power": ">0",
        "paraphraser_lr": ">0",
    }


def _conv(cin: int, cout: int, bn: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.LeakyReLU(0.1))
    return layers


def _deconv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.ConvTranspose2d(cin, cout, kernel_size=3, padding=1), nn.LeakyReLU(0.1)]


class Paraphraser(nn.Module):
    """Teacher-side autoencoder, no BN (the reference's default): C -> C -> kC -> kC -> kC -> C -> C channels.

    Every layer is a 3x3 (transposed) conv of stride 1, padding 1 followed by LeakyReLU(0.1), so the spatial
    size never changes; ``encode`` gives the factor, ``forward`` the reconstruction.
    """

    def __init__(self, channels: int, factor_channels: int):
        super().__init__()
        c, k = channels, factor_channels
        self.encoder = nn.Sequential(*_conv(c, c, False), *_conv(c, k, False), *_conv(k, k, False))
        self.decoder = nn.Sequential(*_deconv(k, k), *_deconv(k, c), *_deconv(c, c))

    def encode(self, f: torch.Tensor) -> torch.Tensor:
        return self.encoder(f)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(f))


class Translator(nn.Module):
    """Student-side encoder with BN: C_s -> C_s -> kC_t -> kC_t channels (3x3 convs, BN, LeakyReLU(0.1))."""

    def __init__(self, channels: int, factor_channels: int):
        super().__init__()
        c, k = channels, factor_channels
        self.encoder = nn.Sequential(*_conv(c, c, True), *_conv(c, k, True), *_conv(k, k, True))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.encoder(f)


def factor_vector(f: torch.Tensor, mode: str, power: float) -> torch.Tensor:
    """(B, K, H, W) factor -> (B, D) L2-normalised vector.

    ``attention`` (reference): the channel mean of f**power, flattened (D = H*W). ``flatten`` (paper): the
    whole factor flattened (D = K*H*W).
    """
    v = f.pow(power).mean(dim=1).flatten(1) if mode == "attention" else f.flatten(1)
    return F.normalize(v, dim=1)


def factor_transfer_loss(
    f_s: torch.Tensor, f_t: torch.Tensor, mode: str = "attention", power: float = 2.0
) -> torch.Tensor:
    """Mean absolute difference of the two normalised factor vectors (the larger map pooled to the smaller)."""
    f_s, f_t = match_spatial(f_s, f_t)
    return (factor_vector(f_s, mode, power) - factor_vector(f_t, mode, power)).abs().mean()


class FT(Method):
    """Init stage: L = MSE(P(f_t), f_t); main: L = gamma CE + beta * mean |phi(T(f_s)) - phi(P_enc(f_t))|.

    Taps: ``feats[-1]`` of both networks (the last map before pooling; the reference's ``feat[-2]``). P:
    ``self.paraphraser`` (teacher side, ``Paraphraser``: 3 convs to k = int(factor_rate * C_t) channels and 3
    transposed convs back, no BN), P_enc its encoder; T: ``self.translator`` (student side, ``Translator``: 3
    convs with BN to k channels). phi (``factor_vector``): ``factor_mode="attention"`` (default, the reference
    code) the channel mean of factor^p, flattened and L2-normalised; ``"flatten"`` (the paper) the whole factor
    flattened and L2-normalised. The init stage (the protocol's ``init_epochs``; the student is not run) trains
    the paraphraser alone on the reconstruction MSE, unscaled by beta, at lr 0.01 when the student is a CIFAR
    ResNet or WRN (``paraphraser_lr``, as RepDistiller's ``helper/pretrain.py``), else the run's learning rate;
    the paraphraser is frozen afterwards (``requires_grad`` False, eval mode).
    Defaults: gamma 1, alpha 0, beta 200, factor_rate 0.5, factor_mode "attention", factor_power 2.

    Departures: ``factor_mode`` is FT's code/paper switch ("attention" = the reference code's form, which the CRD
    table's numbers come from; "flatten" = the paper's, still with the mean rather than the sum of absolute
    differences so that beta keeps its scale); it keeps its name because the ids of recorded runs hash it. A
    larger factor map is adaptively average-pooled to the smaller size (the reference pools the factors). The
    translator's convs have no bias (redundant before BN); the paraphraser's, without BN, do.
    """

    name = "ft"
    paper = "Kim, Park & Kwak. Paraphrasing Complex Network: Network Compression via Factor Transfer. NeurIPS 2018"
    Config = FTConfig
    needs = frozenset({"feats"})

    def __init__(self, cfg: FTConfig, ctx: MethodContext):
        super().__init__(cfg, ctx)
        if cfg.factor_mode not in FACTOR_MODES:
            raise KdbenchError(
                f"methods.ft.factor_mode must be one of {', '.join(FACTOR_MODES)}, got {cfg.factor_mode!r}"
            )
        t_channels = ctx.teacher.channels[-1]
        factor_channels = int(t_channels * cfg.factor_rate)
        if factor_channels < 1:
            raise KdbenchError(
                f"methods.ft.factor_rate {cfg.factor_rate} leaves no factor channel (teacher has {t_channels})"
            )
        self.paraphraser = Paraphraser(t_channels, factor_channels)
        self.translator = Translator(ctx.student.channels[-1], factor_channels)
        # Trained only in the init stage (the harness turns their gradients on for it), frozen afterwards.
        self.paraphraser.requires_grad_(False)

    def train(self, mode: bool = True) -> FT:
        super().train(mode)
        trainable = any(p.requires_grad for p in self.paraphraser.parameters())
        self.paraphraser.train(mode and trainable)
        return self

    def reconstruction_loss(self, teacher: ModelOutput) -> torch.Tensor:
        f_t = teacher.feats[-1]
        rec = self.paraphraser(f_t).float()
        with torch.autocast(device_type=rec.device.type, enabled=False):
            return F.mse_loss(rec, f_t.float())

    def init_stage(self, student: nn.Module) -> InitStage:
        def stage_loss(s_out: ModelOutput | None, t_out: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
            return {"ft_rec": self.reconstruction_loss(t_out)}

        # RepDistiller pre-trains the paraphraser at lr 0.01 when the student is a CIFAR ResNet or WRN, at the
        # run's learning rate otherwise (helper/pretrain.py); the student is not needed for this stage.
        lr = (
            self.cfg.paraphraser_lr
            if self.ctx.student_arch.startswith(("resnet", "wrn")) and self.ctx.student_arch != "resnet50"
            else None
        )
        return InitStage(
            parameters=list(self.paraphraser.parameters()), loss=stage_loss, epochs=None, lr=lr, needs_student=False
        )

    def loss(
        self, student: ModelOutput, teacher: ModelOutput, batch: Batch, progress: Progress
    ) -> dict[str, torch.Tensor]:
        factor_s = self.translator(student.feats[-1]).float()
        with torch.no_grad():
            factor_t = self.paraphraser.encode(teacher.feats[-1]).float()
        with torch.autocast(device_type=factor_s.device.type, enabled=False):
            ft = factor_transfer_loss(factor_s, factor_t, self.cfg.factor_mode, self.cfg.factor_power)
        return {"ft": self.cfg.weight * ft}
