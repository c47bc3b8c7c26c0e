"""Config validation: errors name the field and the allowed values."""

from pathlib import Path

import pytest

from streamssl.config import Config, ConfigError, apply_overrides, config_from_dict, load_config

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "configs" / "fashion_mnist_class_incremental.yaml"


def test_default_config_loads():
    cfg = load_config(DEFAULT)
    assert cfg.stream.protocol == "class_random" and cfg.stream.segments == 5
    assert cfg.ssl.method == "simclr" and cfg.data.val_fraction == 0.1 and cfg.scaling.num_workers == 2
    # 2-core safety (docs/stack-notes.md, 2-core deadlock): workers must leave CPU for Ray Data.
    assert cfg.scaling.cpus_per_worker * cfg.scaling.num_workers < 2


def test_overrides_apply_with_yaml_types():
    cfg = load_config(DEFAULT, ["optim.lr=0.1", "replay.size=500", "regularization.lambda=3",
                                "scaling.use_gpu=true", "stream.max_images_per_segment=null"])
    assert cfg.optim.lr == 0.1 and cfg.replay.size == 500
    assert cfg.regularization.lambda_ == 3.0 and cfg.scaling.use_gpu is True
    assert cfg.stream.max_images_per_segment is None


def test_unknown_key_names_field_and_allowed_keys():
    with pytest.raises(ConfigError) as e:
        load_config(DEFAULT, ["optim.lrr=0.1"])
    msg = str(e.value)
    assert "optim.lrr" in msg and "unknown key" in msg and "lr" in msg and "batch_size" in msg


def test_bad_literal_lists_allowed_values():
    with pytest.raises(ConfigError) as e:
        load_config(DEFAULT, ["ssl.method=swav"])
    msg = str(e.value)
    assert "ssl.method" in msg and "'swav'" in msg and "mocov2" in msg and "barlow_twins" in msg


def test_method_and_strategy_values_come_from_the_registries():
    from streamssl.registry import SSL_METHODS, STRATEGIES

    with pytest.raises(ConfigError) as e:
        load_config(DEFAULT, ["ssl.method=swav", "strategy=ewc"])
    lines = {line.split(":")[0].strip(): line for line in str(e.value).splitlines()[1:]}
    assert all(f"'{name}'" in lines["ssl.method"] for name in SSL_METHODS)
    assert all(f"'{name}'" in lines["strategy"] for name in STRATEGIES)
    for name in SSL_METHODS:
        assert load_config(DEFAULT, [f"ssl.method={name}"]).ssl.method == name
    with pytest.raises(ConfigError, match="replay.size"):
        load_config(DEFAULT, ["strategy=lump", "replay.size=0"])  # LUMP mixes with replayed rows: needs a buffer


def test_bad_number_names_field():
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        config_from_dict({}, ["optim.lr=-1"])
    with pytest.raises(ConfigError, match=r"replay\.ratio"):
        config_from_dict({}, ["replay.ratio=1.5"])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_joint_with_replay_is_rejected():
    with pytest.raises(ConfigError, match="joint"):
        config_from_dict({"strategy": "joint", "replay": {"size": 10}})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_round_trip_and_digest(tmp_path):
    cfg = load_config(DEFAULT, ["regularization.method=mas"])
    cfg.save(tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg and again.digest() == cfg.digest()
    assert again.digest() != Config().digest()


def test_cli_reports_config_error(capsys):
    from streamssl.cli import main

    rc = main(["train", str(DEFAULT), "ssl.backbone=vit"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "ssl.backbone" in err and "resnet18" in err


def test_cli_takes_overrides_after_an_option(capsys):
    from streamssl.cli import main

    # `train CONFIG --run-dir D k=v`: the override after the option still reaches the config
    # (here a bad one, so the run stops at validation, before anything starts).
    rc = main(["train", str(DEFAULT), "--run-dir", "/nonexistent/run", "ssl.backbone=vit"])
    assert rc == 2
    assert "ssl.backbone" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", str(DEFAULT), "--run-dir", "/nonexistent/run", "--bogus"])
