"""Where a segment's weights come from, and HPT's BatchNorm-only adaptation.

Segment 0 starts from the HPT initialization (``init.checkpoint``: an earlier streamssl run or a
torchvision state dict) or from random init; segment t > 0 from segment t-1's checkpoint.
``init.bn_only`` freezes the *pre-trained* backbone weights except BatchNorm, so the loaders
report which state-dict names the HPT init supplied: a layer it did not supply (a partial match)
starts random, and freezing it would leave a random layer in the encoder for good.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from torch import Tensor, nn

from streamssl.config import Config
from streamssl.run import checkpoint as ck
from streamssl.storage import Location

log = logging.getLogger(__name__)


def load_initial_weights(model: nn.Module, cfg: Config, init_checkpoint: str | None) -> tuple[str, set[str]]:
    """Load the weights a segment starts from; returns ``(description, pretrained)``.

    ``init_checkpoint`` is the previous segment's checkpoint (sequential training) or None for
    segment 0, where the HPT initialization (``cfg.init.checkpoint``) applies if configured.
    ``pretrained`` holds the model state-dict names whose values descend from the HPT init, the
    only ones ``init.bn_only`` may freeze; empty without one. After segment 0 that set does not
    change, so with ``init.bn_only`` it is recomputed from ``cfg.init.checkpoint`` (read, not
    loaded) and every segment freezes the same tensors.
    """
    if init_checkpoint:
        model.load_state_dict(ck.load_model_state(init_checkpoint))
        pretrained: set[str] = set()
        if cfg.init.checkpoint and cfg.init.bn_only:
            pretrained = set(hpt_init_state(model, cfg.init.checkpoint)[0])
        return f"segment checkpoint {init_checkpoint}", pretrained
    if cfg.init.checkpoint:
        return load_hpt_init(model, cfg.init.checkpoint)
    return "random init", set()


def hpt_init_state(model: nn.Module, path: str) -> tuple[dict[str, Tensor], str]:
    """The tensors an HPT init at ``path`` supplies to ``model`` (its state-dict names), and a description.

    Raises if nothing fits the backbone, or (torchvision) if the stems differ (``ssl.cifar_stem``).
    """
    from streamssl.ssl.backbones import torchvision_state_for

    p = Location(path)
    if p.is_dir():
        ckpt = ck.resolve_checkpoint(p)
        state = ck.load_model_state(ckpt)
        own = model.state_dict()
        compatible = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if not any(k.startswith("backbone.") for k in compatible):
            raise ValueError(f"init.checkpoint {path}: no backbone weights match this model's backbone")
        return compatible, f"HPT from streamssl checkpoint {ckpt} ({len(compatible)}/{len(own)} tensors)"
    if p.is_file():
        state = ck.load_tensors(p)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        try:
            to_load, missing, unexpected = torchvision_state_for(model.backbone, state)
        except ValueError as e:
            raise ValueError(f"init.checkpoint {path}: {e}") from e
        if not to_load:
            raise ValueError(f"init.checkpoint {path}: no tensor matched the backbone (unexpected: {unexpected[:5]})")
        if missing:
            log.warning("init.checkpoint %s: %d backbone tensors not in it stay random: %s", path, len(missing),
                        missing[:5])
        described = f"HPT from torchvision state dict {p} ({len(to_load)} tensors, {len(missing)} missing)"
        return {f"backbone.{k}": v for k, v in to_load.items()}, described
    raise FileNotFoundError(f"init.checkpoint {path} does not exist")


def load_hpt_init(model: nn.Module, path: str) -> tuple[str, set[str]]:
    """Hierarchical pre-training: start from an earlier streamssl model or a torchvision state dict.

    Returns ``(description, loaded)``, ``loaded`` being the model state-dict names it set.
    """
    state, described = hpt_init_state(model, path)
    model.load_state_dict(state, strict=False)
    # Momentum/target encoders start as copies of the online one in every method.
    if hasattr(model, "reset_target_networks"):
        model.reset_target_networks()
    return described, set(state)


def apply_bn_only(model: nn.Module, pretrained: Collection[str]) -> int:
    """HPT's cheap adaptation: freeze the pre-trained backbone weights except BatchNorm's.

    Only parameters named in ``pretrained`` (model state-dict names, from :func:`load_hpt_init`)
    are frozen: a backbone layer the init did not supply is random and must train. Heads stay
    trainable (they are new to this task). Returns the number of trainable tensors.
    """
    pretrained = set(pretrained)
    kept: list[str] = []
    for prefix, module in model.backbone.named_modules(prefix="backbone"):
        is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
        for name, p in module.named_parameters(prefix=prefix, recurse=False):
            p.requires_grad_(is_bn or name not in pretrained)
            if not is_bn and name not in pretrained:
                kept.append(name)
    if kept:
        log.warning("init.bn_only: %d backbone tensors were not loaded from init.checkpoint and stay trainable: %s",
                    len(kept), kept[:5])
    return sum(1 for p in model.parameters() if p.requires_grad)
