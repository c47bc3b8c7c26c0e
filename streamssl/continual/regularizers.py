"""Weight regularizers toward earlier segments: MAS, EWC (online), L2-SP.

All three share the penalty ``λ/2 · Σ Ω (θ − θ*)²`` (see :class:`~streamssl.continual.base.Regularizer`)
and differ in the importance Ω:

* :class:`MAS` (Aljundi et al., 2018): sensitivity of the encoder's output to each weight, from
  unlabeled images only, which is why it suits self-supervised streams.
* :class:`EWC` (Kirkpatrick et al., 2017), online form (Schwarz et al., 2018): empirical Fisher of
  the SSL loss, decayed across segments.
* :class:`L2SP` (Li et al., 2018): Ω ≡ 1, anchored at the previous segment's weights.

The anchor θ* is always the weights at the end of the most recent segment.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from streamssl.continual.base import Batches, LossFn, Regularizer, take


class MAS(Regularizer):
    """Memory Aware Synapses: ``Ω = mean_x |∂ ||f(x)||²₂ / ∂θ|`` with ``f = module.backbone``.

    * Per-sample gradients, as in the paper: the absolute value is taken per image, so opposite
      signed sensitivities of different images do not cancel (|mean grad| would underestimate Ω).
      They come from ``torch.func.vmap`` over chunks sized to keep ~256 MB of per-sample gradients.
    * The samples are the first view of every pair: the second view of the same image adds little
      information at twice the cost (per-sample gradients are the expensive part: on CPU the
      per-sample conv backward runs ~20x slower than a batched one; on GPU it is cheap).
    * The backbone is evaluated in eval mode (BatchNorm with running statistics): that makes f a
      per-image function (batch statistics would couple the images of a batch and defeat vmap),
      and it is the function evaluation and export actually use (frozen features).
    * Computed in float32 on a float32 copy of the weights, whatever the training precision.
    * Only backbone parameters get an Ω (heads do not influence f, their Ω would be 0), so heads
      are left free; they are not part of the encoder we keep.
    * Accumulation across segments follows the paper: a sum, ``Ω_t = Ω_{t−1} + Ω_new``
      (Aljundi et al., 2018: importance is accumulated over the tasks learned so far). The
      penalty's scale therefore grows roughly linearly with the number of finished segments, so a
      λ tuned on a K-segment stream is tuned *for K*: on a longer stream the same λ pulls harder
      on late segments and can eventually freeze the encoder. ``accumulate="mean"`` opts into the
      running mean ``Ω_t = (t·Ω_{t−1} + Ω_new) / (t + 1)`` instead, whose scale stays that of one
      segment's importance (a λ that transfers across stream lengths), at the price of deviating
      from the paper: each old segment's weight shrinks as 1/t.
    """

    name = "mas"
    #: upper bound on floats held by one chunk of per-sample gradients (2**26 floats = 256 MB).
    max_chunk_floats: int = 2**26
    #: how :meth:`accumulate` folds segments together (see the class docstring).
    ACCUMULATE: ClassVar[tuple[str, ...]] = ("sum", "mean")

    def __init__(self, lambda_: float = 1.0, accumulate: str = "sum") -> None:
        super().__init__(lambda_)
        if accumulate not in self.ACCUMULATE:
            raise ValueError(f"MAS accumulate must be one of {', '.join(map(repr, self.ACCUMULATE))}, "
                             f"got {accumulate!r}")
        self.accumulate_mode = accumulate

    def compute_importance(self, module: nn.Module, batches: Batches, loss_fn: LossFn,
                           max_batches: int) -> dict[str, Tensor]:
        backbone = getattr(module, "backbone", None)
        if not isinstance(backbone, nn.Module):
            raise TypeError("MAS needs the module's encoder as `module.backbone`")
        full_name = {id(p): n for n, p in module.named_parameters()}
        trainable = {n: p for n, p in backbone.named_parameters() if p.requires_grad}
        if not trainable:  # same on every rank (replicated model), so no collective is skipped unevenly
            return {}
        device = next(iter(trainable.values())).device
        weights = {n: p.detach().float() for n, p in trainable.items()}
        frozen = {n: p.detach().float() for n, p in backbone.named_parameters() if not p.requires_grad}
        buffers = {n: (b.float() if b.is_floating_point() else b) for n, b in backbone.named_buffers()}

        def sq_norm(w: dict[str, Tensor], x: Tensor) -> Tensor:
            out = functional_call(backbone, (w, frozen, buffers), (x.unsqueeze(0),))
            return out.float().pow(2).sum()

        per_sample_grad = vmap(grad(sq_norm), in_dims=(None, 0))
        chunk = max(1, self.max_chunk_floats // sum(w.numel() for w in weights.values()))
        sums = {n: torch.zeros_like(w) for n, w in weights.items()}
        count = 0
        was_training = backbone.training
        backbone.eval()
        try:
            for views in take(batches, max_batches):
                x = views[0].to(device=device, dtype=torch.float32)
                for xc in x.split(chunk):
                    g = per_sample_grad(weights, xc)
                    for n in sums:
                        sums[n] += g[n].abs().sum(0)
                count += x.shape[0]
        finally:
            backbone.train(was_training)
        mean = self._mean_over_workers(sums, count, "samples")
        return {full_name[id(trainable[n])]: v for n, v in mean.items()}

    def accumulate(self, old: dict[str, Tensor], new: dict[str, Tensor]) -> dict[str, Tensor]:
        """``old + new`` (the paper), or the running mean with ``accumulate="mean"``.

        A parameter missing on one side (a new layer, a layer no longer trained) counts as 0 there.
        """
        t = self.segments
        out: dict[str, Tensor] = {}
        for n in old.keys() | new.keys():
            prev = old.get(n)
            cur = new.get(n)
            if prev is None:
                prev = torch.zeros_like(cur)  # type: ignore[arg-type]
            if cur is None:
                cur = torch.zeros_like(prev)
            out[n] = prev + cur if self.accumulate_mode == "sum" else (t * prev + cur) / (t + 1)
        return out

    def describe(self) -> str:
        extra = "" if self.accumulate_mode == "sum" else f",accumulate={self.accumulate_mode}"
        return f"{self.name}(lambda={self.lambda_:g}{extra})"


class EWC(Regularizer):
    """Online EWC for SSL: Ω = empirical Fisher of the SSL loss, ``mean_batches (∂L/∂θ)²``.

    * SSL losses are defined per *batch* (contrastive negatives, Barlow Twins' cross-correlation
      couple the images), so there is no per-sample gradient; the Fisher is estimated from the
      squared gradient of each batch's loss, averaged over batches. Its scale differs from the
      per-sample Fisher by roughly the batch size; λ absorbs that.
    * Gradients are taken with ``torch.autograd.grad`` (never ``.backward()``), so ``.grad`` and
      DeepSpeed's gradient-accumulation hooks are untouched.
    * Across segments: ``Ω_t = γ·Ω_{t−1} + F_t`` with anchor θ*_t (Schwarz et al., 2018): one
      Fisher and one anchor instead of one per segment, old segments fading with γ. With γ<1 the
      penalty's scale stays bounded (≤ max F / (1−γ)) on an unbounded stream.
    """

    name = "ewc"

    def __init__(self, lambda_: float = 1.0, gamma: float = 0.9) -> None:
        super().__init__(lambda_)
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"EWC gamma must be in [0, 1], got {gamma}")
        self.gamma = float(gamma)

    def compute_importance(self, module: nn.Module, batches: Batches, loss_fn: LossFn,
                           max_batches: int) -> dict[str, Tensor]:
        named = self.regularized_parameters(module)
        names, params = list(named), list(named.values())
        sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named.items()}
        count = 0
        with torch.enable_grad():
            for views in take(batches, max_batches):
                loss = loss_fn(*views)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for n, g in zip(names, grads, strict=True):
                    if g is not None:
                        sums[n] += g.detach().float().pow(2)
                count += 1
        return self._mean_over_workers(sums, count, "batches")

    def accumulate(self, old: dict[str, Tensor], new: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {n: self.gamma * v for n, v in old.items()}
        for n, v in new.items():
            out[n] = out[n] + v if n in out else v.clone()
        return out

    def describe(self) -> str:
        return f"{self.name}(lambda={self.lambda_:g},gamma={self.gamma:g})"


class L2SP(Regularizer):
    """L2 toward the previous segment's weights: Ω ≡ 1 for every trainable parameter.

    The original L2-SP anchors at the pre-trained starting point of fine-tuning; in a stream the
    natural "starting point" of segment t is the end of segment t−1. Needs no data.
    """

    name = "l2sp"
    uses_importance = False

    def accumulate(self, old: dict[str, Tensor], new: dict[str, Tensor]) -> dict[str, Tensor]:
        return {}


REGULARIZERS: dict[str, type[Regularizer]] = {cls.name: cls for cls in (MAS, EWC, L2SP)}
