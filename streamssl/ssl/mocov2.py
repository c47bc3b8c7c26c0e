"""MoCo v2 (Chen et al., 2020): InfoNCE against a momentum key encoder and a queue of past keys.

Why a queue in a streaming setting: the number of negatives is decoupled from the batch size, which
is small per CPU worker. Keys from *all* workers are enqueued (gathered without gradient), so every
rank holds the identical queue and the effective negative set grows with the worker count.
``queue_size=0`` drops the queue: the negatives are then the other keys of the whole global batch
(gathered from all workers). The CPU demo uses that: over its few hundred steps, negatives from
earlier steps' key encoders slowed learning (benchmarks/README.md, "Demo recipe").

Choices: the loss is symmetric (each view is once query, once key), as in solo-learn's MoCo v2+,
which trains faster per image; the projector is MoCo v2's Linear-ReLU-Linear, without BatchNorm unless
``ssl.moco_projector_bn`` adds one to the hidden layer (as SimCLR and MoCo v3 do).

Shuffle-BN (``ssl.shuffle_bn``, on by default), as in the MoCo paper: without it a query and its
positive key get their BatchNorm statistics from the same images, a signal the encoder can use to
find the positive without learning features. In training the key encoder therefore never sees the
batch its queries came from: with several workers each rank encodes a random chunk of the
gathered global batch (permutation shared by all ranks, then undone); with one worker the local
batch is shuffled and encoded in ``ssl.shuffle_bn_groups`` groups, the stand-in for that many
workers (see :func:`streamssl.ssl.distributed.shuffled_apply`). Queries keep plain per-worker BN.
The key encoder's BN running statistics are then updated once per group; they are never used
for evaluation (the online backbone is what gets evaluated and exported).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamssl.config import SSLConfig
from streamssl.ssl import distributed as D
from streamssl.ssl.base import SSLMethod, StepOutput, make_target
from streamssl.ssl.heads import MLPHead
from streamssl.ssl.losses import info_nce


class MoCoV2(SSLMethod):
    name = "mocov2"
    target_pairs = (("key_backbone", "backbone"), ("key_projector", "projector"))
    extra_state_buffers = ("queue", "queue_ptr")

    def __init__(
        self,
        backbone: nn.Module,
        proj_hidden_dim: int = 512,
        proj_dim: int = 128,
        temperature: float = 0.2,
        queue_size: int = 4096,
        momentum: float = 0.99,
        projector_bn: bool = False,
        shuffle_bn: bool = True,
        shuffle_bn_groups: int = 2,
    ) -> None:
        super().__init__(backbone)
        self.temperature = temperature
        self.momentum = momentum
        self.shuffle_bn = shuffle_bn
        self.shuffle_bn_groups = shuffle_bn_groups
        self.projector = MLPHead(self.feature_dim, proj_hidden_dim, proj_dim, num_layers=2, batch_norm=projector_bn)
        self.projection_dim = proj_dim
        self.key_backbone = make_target(self.backbone)
        self.key_projector = make_target(self.projector)
        # A fixed-seed generator makes the initial queue identical on every rank regardless of
        # the global RNG state, so ranks agree from step 0 (DeepSpeed broadcasts only parameters).
        gen = torch.Generator().manual_seed(0)
        queue = F.normalize(torch.randn(queue_size, proj_dim, generator=gen), dim=1)
        self.register_buffer("queue", queue)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_config(cls, backbone: nn.Module, cfg: SSLConfig) -> "MoCoV2":
        return cls(backbone, cfg.proj_hidden_dim, cfg.proj_dim, cfg.temperature, cfg.queue_size, cfg.momentum,
                   projector_bn=cfg.moco_projector_bn, shuffle_bn=cfg.shuffle_bn,
                   shuffle_bn_groups=cfg.shuffle_bn_groups)

    def _query(self, x: Tensor) -> Tensor:
        return F.normalize(self.projector(self.backbone(x)).float(), dim=1)

    def project(self, x: Tensor) -> Tensor:
        return self._query(x)

    def distill_loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        """InfoNCE with the target rows of the whole global batch as keys (no queue: the queue holds
        keys of the current key encoder, not of the frozen model the targets come from)."""
        sizes = D.all_gather_sizes(target.shape[0], target.device)
        k_all = D.gather_no_grad(target.detach().float(), sizes)
        return info_nce(prediction, target.detach(), None, self.temperature, k_all=k_all,
                        offset=sum(sizes[: D.rank()]))

    def _key(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            h = self.target_forward(self.key_backbone, x)
            return F.normalize(self.key_projector(h).float(), dim=1)

    def _keys(self, x: Tensor, sizes: list[int] | None) -> tuple[Tensor, Tensor | None]:
        """Keys of the local rows, and of the global batch when shuffle-BN already gathered them.

        Shuffle-BN only in training: in eval mode BN uses running statistics, nothing leaks.
        """
        if self.shuffle_bn and self.training:
            return D.shuffled_apply(self._key, x, self.shuffle_bn_groups, sizes)
        return self._key(x), None

    def forward(self, view1: Tensor, view2: Tensor) -> StepOutput:
        h1, h2 = self.backbone(view1), self.backbone(view2)
        q1 = F.normalize(self.projector(h1).float(), dim=1)
        q2 = F.normalize(self.projector(h2).float(), dim=1)
        queue = self.queue  # the losses normalize it into new tensors, so enqueueing later is safe
        # Every collective below runs on all ranks or none: an eval forward with a queue has none.
        sizes = D.all_gather_sizes(view1.shape[0], view1.device) if self.training or queue.shape[0] == 0 else None
        (k1, k1_all), (k2, k2_all) = self._keys(view1, sizes), self._keys(view2, sizes)
        if sizes is not None and queue.shape[0] == 0:
            # No queue: the negatives are the other keys of the whole global batch.
            offset = sum(sizes[: D.rank()])
            k1_all = k1_all if k1_all is not None else D.gather_no_grad(k1, sizes)
            k2_all = k2_all if k2_all is not None else D.gather_no_grad(k2, sizes)
            loss = 0.5 * (info_nce(q1, k2, None, self.temperature, k_all=k2_all, offset=offset)
                          + info_nce(q2, k1, None, self.temperature, k_all=k1_all, offset=offset))
        else:
            loss = 0.5 * (info_nce(q1, k2, queue, self.temperature) + info_nce(q2, k1, queue, self.temperature))
        out = StepOutput(loss, {"pos_sim": self.pos_sim(q1, k2), "z_std": self.embedding_std(q1)},
                         features=(h1, h2), projections=(q1, q2))
        if queue.shape[0] > 0:
            out.logs["neg_sim"] = (q1.detach() @ queue.T).mean()  # before the enqueue overwrites it
            if self.training:
                # One key per image (view 2's) keeps "queue_size" = that many past images.
                self.enqueue(k2_all if k2_all is not None else D.gather_no_grad(k2, sizes))
        return out

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write ``keys`` at the pointer, wrapping around; keep only the newest if they overflow."""
        size = self.queue.shape[0]
        if size == 0:
            return
        keys = keys.detach().to(self.queue.dtype)[-size:]
        n = keys.shape[0]
        # Pointer arithmetic stays on the device: no host sync per step on GPU.
        idx = (torch.arange(n, device=self.queue.device) + self.queue_ptr) % size
        self.queue.index_copy_(0, idx, keys)
        self.queue_ptr.copy_((self.queue_ptr + n) % size)
