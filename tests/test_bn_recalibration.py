"""BatchNorm recalibration (``eval.bn_recalibration``): statistics re-estimated, weights untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from streamssl.evaluate.bn_recalibration import recalibrate_batchnorm


class _Scale(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / 255.0


def test_recalibration_re_estimates_the_statistics_and_nothing_else() -> None:
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten())
    bn = enc[1]
    bn.running_mean.fill_(5.0)  # stale statistics, as after a shift
    bn.running_var.fill_(9.0)
    images = np.random.default_rng(0).integers(0, 256, (40, 1, 8, 8), dtype=np.uint8)
    new, layers = recalibrate_batchnorm(enc, images, _Scale(), batch_size=64)  # one batch: exact stats
    assert layers == 1 and not new.training
    with torch.no_grad():
        pre = enc[0](torch.as_tensor(images).float() / 255.0)  # what the BatchNorm layer sees
    want_mean = pre.mean(dim=(0, 2, 3))
    want_var = pre.permute(1, 0, 2, 3).reshape(3, -1).var(dim=1, unbiased=True)
    assert torch.allclose(new[1].running_mean, want_mean, atol=1e-5)
    assert torch.allclose(new[1].running_var, want_var, atol=1e-5)
    for (k, a), b in zip(enc.state_dict().items(), new.state_dict().values()):
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(a, b), k  # weights untouched
    assert float(bn.running_mean[0]) == 5.0  # the caller's encoder is left as it was
    # several batches: a cumulative average of the batch statistics, not an exponential one
    multi, _ = recalibrate_batchnorm(enc, images, _Scale(), batch_size=10)
    assert torch.allclose(multi[1].running_mean, want_mean, atol=1e-5)


def test_an_encoder_without_batchnorm_has_nothing_to_recalibrate() -> None:
    _, layers = recalibrate_batchnorm(nn.Sequential(nn.Flatten()), np.zeros((4, 1, 4, 4), np.uint8), _Scale())
    assert layers == 0


def test_bn_recalibration_metrics_run_the_probes_again(ray_local, tmp_path) -> None:
    from benchmarks.make_digits_dataset import write_digits_folder
    from streamssl.config import load_config
    from streamssl.data.ingest import ingest
    from streamssl.evaluate.after_segment import bn_recalibration_metrics, evaluate_encoder_on_config
    from streamssl.ssl import build_method

    src = write_digits_folder(tmp_path / "src", per_class=12)
    ingest("folder", str(tmp_path / "ds"), src=str(src))
    cfg = load_config(None, [f"data.dataset_dir={tmp_path / 'ds'}", "data.source=folder", "data.val_fraction=0",
                             "eval.linear_epochs=20", "eval.fewshot_episodes=5", "ssl.width=8"])
    torch.manual_seed(0)
    model = build_method(cfg.ssl, in_channels=1).eval()
    assert bn_recalibration_metrics(cfg, model, None) == {}  # off by default
    on = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"bn_recalibration": True})})
    m = bn_recalibration_metrics(on, model, None)
    assert set(m) == {"eval/bn_recal_knn_acc", "eval/bn_recal_linear_acc"}
    assert all(0.0 <= v <= 1.0 for v in m.values())
    plain = evaluate_encoder_on_config(cfg, model, None)
    assert m["eval/bn_recal_knn_acc"] != pytest.approx(plain["eval/knn_acc"], abs=1e-9) or \
        m["eval/bn_recal_linear_acc"] != pytest.approx(plain["eval/linear_acc"], abs=1e-9)
