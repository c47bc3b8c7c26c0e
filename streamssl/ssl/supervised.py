"""Supervised sequential training: the baseline self-supervised streams are compared against.

Hu et al. (ICLR 2022) find that sequential self-supervised pre-training forgets less than
*supervised* sequential training on the same stream. This method is that supervised side: the
same backbone, trained segment after segment on the same rows with cross-entropy on their labels,
and evaluated like every other method (the linear / kNN / few-shot probes on
``backbone`` features; the classifier head is never evaluated or exported).

Choices, and why:

* **Head**: one linear layer over the backbone's pooled features, the usual supervised classifier;
  nothing between backbone and logits, so all representation learning happens in the backbone the
  probes read.
* **Single head over all classes** (``ssl.num_classes``, by default the dataset's class count from
  ``dataset.json``): under class-incremental protocols each segment trains the same head on its
  own classes only, the standard single-head class-incremental setting (no task identity, no
  masking of absent classes' logits), which is what "supervised sequential" means in the
  continual-learning literature.
* **One view** per image (``view_specs``), drawn with the same augmentation preset the SSL methods
  use (``ssl.augment``): supervised training with augmentation sees one augmented image per
  example, and sharing the SSL preset keeps the objective the only difference between this row and
  the SSL rows. (Supervised recipes usually use a lighter crop + flip; with ``grayscale_small`` the
  extra ops are a mild brightness/contrast jitter and a little blur.)
* **Labels** come with the batch (``forward(view, labels=...)``): the training loop passes them to
  methods listed in :data:`streamssl.registry.LABELLED_METHODS` only, so no SSL method ever sees a
  label. Rows must all be labelled; an unlabelled row (label -1) is an error, not a silent skip.
* **Across workers**: each worker's cross-entropy is the mean over its own rows, and DeepSpeed
  averages the gradients of equal-sized worker batches, i.e. the gradient of the global batch mean.

It has no projection space, so CaSSLe's distillation (``project`` / ``distill_loss``) does not
apply; the config refuses that pairing and the other ones that need an SSL loss (config.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamssl.config import SSLConfig
from streamssl.ssl.augment import ViewSpec
from streamssl.ssl.base import SSLMethod, StepOutput


class Supervised(SSLMethod):
    name = "supervised"
    view_specs = (ViewSpec(),)

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__(backbone)
        if num_classes < 2:
            raise ValueError(f"supervised training needs ssl.num_classes >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    @classmethod
    def from_config(cls, backbone: nn.Module, cfg: SSLConfig) -> "Supervised":
        if cfg.num_classes is None:
            raise ValueError("ssl.method 'supervised' needs ssl.num_classes: set it, or train through the stream "
                             "driver, which takes it from the dataset's metadata (dataset.json num_classes)")
        return cls(backbone, cfg.num_classes)

    def forward(self, view: Tensor, labels: Tensor | None = None) -> StepOutput:
        """Cross-entropy of the classifier on one augmented view against the rows' labels."""
        if labels is None:
            raise ValueError("ssl.method 'supervised' trains on labels: call it as method(view, labels=...) "
                             "with one class index per row")
        if labels.shape != view.shape[:1]:
            raise ValueError(f"labels must hold one class index per row: shape {tuple(labels.shape)} "
                             f"for {view.shape[0]} rows")
        labels = labels.to(device=view.device, dtype=torch.long)
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes}) (ssl.num_classes); got [{lo}, {hi}] "
                             "(-1 marks an unlabelled row)")
        h = self.backbone(view)
        logits = self.classifier(h).float()
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        return StepOutput(loss, {"train_acc": accuracy}, features=(h,))
