"""DINO (Caron et al., ICCV 2021): self-distillation with no labels.

A student (backbone + head) is trained to match, on every crop, the output distribution a
teacher (an EMA of the student) gives on the *other* global crops; no negatives, no predictor.
As in the paper:

* **multi-crop**: two global crops (area ``ssl.dino_global_crop_scale``, full size) seen by
  teacher and student, plus ``ssl.dino_local_crops`` small crops (area
  ``ssl.dino_local_crop_scale``, 96/224 of the side unless ``ssl.dino_local_crop_size``) seen by
  the student only. The method declares them in ``view_specs``; the worker's augmentation makes them;
* **head**: an MLP to a bottleneck (``proj_hidden_dim`` wide, ``proj_dim`` out), L2-normalized,
  then a weight-normalized linear layer to ``ssl.dino_out_dim`` prototypes with the norm fixed
  to 1 (the paper's ``norm_last_layer``), so logits are cosine similarities;
* **centering and sharpening**: teacher logits minus a center (EMA over global batches, momentum
  ``ssl.dino_center_momentum``), softmax at the teacher temperature, which warms up linearly from
  ``ssl.dino_warmup_teacher_temp`` to ``ssl.dino_teacher_temp``; the student's temperature is
  ``ssl.dino_student_temp``;
* **teacher momentum**: cosine schedule from ``ssl.dino_momentum`` to 1.

Where a stream differs from a fixed-length run: a stream has no total step count, so the teacher
momentum's cosine runs over each *segment* (from ``dino_momentum`` at its first step to 1 at its
last, then anew), and the temperature warm-up counts the stream's global optimizer steps
(``ssl.dino_teacher_temp_warmup_steps``; the paper warms up over 30 epochs). The head's hidden
layers use ReLU (the shared MLP head) where the paper uses GELU, and no BatchNorm, as the paper's
default. Schedules are read from the step clock in :meth:`DINO.on_after_step`; the teacher
temperature of the next step and the center are buffers, so a resumed run continues them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamssl.config import SSLConfig
from streamssl.ssl import distributed as D
from streamssl.ssl.augment import ViewSpec
from streamssl.ssl.base import SSLMethod, StepClock, StepOutput, ema_update, make_target
from streamssl.ssl.heads import MLPHead
from streamssl.ssl.losses import dino_cross_entropy

#: Local crops' side relative to the global crops' in the paper (96 px vs 224 px).
LOCAL_RELATIVE_SIZE = 96 / 224


class DINOHead(nn.Module):
    """MLP -> L2-normalize -> cosine similarity to ``out_dim`` unit-norm prototypes."""

    def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = MLPHead(in_dim, hidden_dim, bottleneck_dim, num_layers=3, batch_norm=False)
        self.prototypes = nn.Parameter(torch.randn(out_dim, bottleneck_dim) / math.sqrt(bottleneck_dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.normalize(self.mlp(x), dim=-1), F.normalize(self.prototypes, dim=-1))


def teacher_momentum(base: float, clock: StepClock) -> float:
    """Cosine from ``base`` (a segment's first step) to 1 (its last step)."""
    done = clock.step / max(clock.steps_in_segment - 1, 1)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(done, 1.0)) + 1.0) / 2.0


def teacher_temperature(warmup_temp: float, temp: float, warmup_steps: int, global_step: int) -> float:
    """Linear from ``warmup_temp`` at global step 0 to ``temp`` at ``warmup_steps``, then constant."""
    if warmup_steps <= 0 or global_step >= warmup_steps:
        return temp
    return warmup_temp + (temp - warmup_temp) * global_step / warmup_steps


class DINO(SSLMethod):
    name = "dino"
    target_pairs = (("teacher_backbone", "backbone"), ("teacher_head", "head"))
    extra_state_buffers = ("center", "teacher_temp")

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 512, proj_dim: int = 128, out_dim: int = 4096,
                 student_temp: float = 0.1, warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.07,
                 teacher_temp_warmup_steps: int = 500, momentum: float = 0.996, center_momentum: float = 0.9,
                 global_crop_scale: tuple[float, float] = (0.4, 1.0), local_crops: int = 6,
                 local_crop_scale: tuple[float, float] = (0.05, 0.4), local_crop_size: int | None = None) -> None:
        super().__init__(backbone)
        self.head = DINOHead(self.feature_dim, proj_hidden_dim, proj_dim, out_dim)
        self.teacher_backbone = make_target(self.backbone)
        self.teacher_head = make_target(self.head)
        self.projection_dim = out_dim
        self.momentum = momentum
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.temp_schedule = (warmup_teacher_temp, teacher_temp, teacher_temp_warmup_steps)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("teacher_temp", torch.tensor(teacher_temperature(*self.temp_schedule, 0)))
        local = ViewSpec(size=local_crop_size, scale=tuple(local_crop_scale), relative_size=LOCAL_RELATIVE_SIZE)
        self.view_specs = (ViewSpec(scale=tuple(global_crop_scale)),) * 2 + (local,) * local_crops

    @classmethod
    def from_config(cls, backbone: nn.Module, cfg: SSLConfig) -> "DINO":
        return cls(backbone, cfg.proj_hidden_dim, cfg.proj_dim, cfg.dino_out_dim, cfg.dino_student_temp,
                   cfg.dino_warmup_teacher_temp, cfg.dino_teacher_temp, cfg.dino_teacher_temp_warmup_steps,
                   cfg.dino_momentum, cfg.dino_center_momentum, cfg.dino_global_crop_scale, cfg.dino_local_crops,
                   cfg.dino_local_crop_scale, cfg.dino_local_crop_size)

    def project(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x)).float()

    def distill_loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy from the target's sharpened distribution to the prediction's (no centering:
        the target is a frozen model's output, not a moving teacher's)."""
        return dino_cross_entropy([prediction], [target], self.student_temp, float(self.teacher_temp),
                                  same_view=True)

    def _student(self, views: tuple[Tensor, ...]) -> tuple[list[Tensor], list[Tensor]]:
        """(features, logits) per view; views of one size go through the network as one batch."""
        feats: list[Tensor] = []
        i = 0
        while i < len(views):
            j = i
            while j < len(views) and views[j].shape == views[i].shape:
                j += 1
            feats += list(self.backbone(torch.cat(views[i:j])).chunk(j - i))
            i = j
        logits = self.head(torch.cat(feats)).float().chunk(len(views))
        return feats, list(logits)

    def forward(self, *views: Tensor) -> StepOutput:
        if len(views) < 2:
            raise ValueError(f"DINO needs at least the two global crops, got {len(views)} views")
        feats, student = self._student(views)
        with torch.no_grad():
            h = self.target_forward(self.teacher_backbone, torch.cat(views[:2]))
            teacher = list(self.target_forward(self.teacher_head, h).float().chunk(2))
        temp = float(self.teacher_temp)
        loss = dino_cross_entropy(student, teacher, self.student_temp, temp, self.center)
        logs = {"teacher_temp": self.teacher_temp.detach().clone(),
                "teacher_entropy": self._entropy(teacher[0], temp),
                "z_std": self.embedding_std(student[0])}
        if self.training:
            self._update_center(torch.cat(teacher))
        return StepOutput(loss, logs, features=tuple(feats), projections=tuple(student))

    def _entropy(self, t: Tensor, temp: float) -> Tensor:
        """Mean entropy of the teacher's centered distribution: ~log(out_dim) uniform, ~0 collapsed."""
        p = F.softmax((t.detach() - self.center) / temp, dim=-1)
        return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=-1).mean()

    @torch.no_grad()
    def _update_center(self, teacher: Tensor) -> None:
        """``center <- m·center + (1-m)·mean of the global batch's teacher outputs``."""
        total = teacher.sum(dim=0, keepdim=True)
        count = torch.tensor(float(teacher.shape[0]), device=teacher.device)
        if D.world_size() > 1:
            both = torch.cat([total.flatten(), count.view(1)])
            both = D.all_reduce_sum_with_grad(both)
            total, count = both[:-1].view_as(total), both[-1]
        self.center.mul_(self.center_momentum).add_(total / count, alpha=1 - self.center_momentum)

    def on_after_step(self, clock: StepClock | None = None) -> None:
        """EMA-update the teacher at this step's momentum; set the next step's teacher temperature."""
        m = self.momentum if clock is None else teacher_momentum(self.momentum, clock)
        for target, online in self.target_pairs:
            ema_update(getattr(self, target), getattr(self, online), m)
        if clock is not None:
            self.teacher_temp.fill_(teacher_temperature(*self.temp_schedule, clock.global_step + 1))
