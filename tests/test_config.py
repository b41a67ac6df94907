"""Configuration: the example validates, bad keys are named, environment overrides apply."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from config.load import ConfigError, load_config, resolve_storage
from config.schema import Config

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "example.yaml"


def _leaf_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys |= _leaf_keys(ann, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def test_example_file_validates_and_documents_every_key():
    config = load_config(EXAMPLE, environ={})
    # out of the box nothing is routed to a placeholder TPS (a trial once sent results to 127.0.0.1:104)
    assert config.node.destinations == {} and config.node.routes == [] and config.node.default_destination is None
    text = EXAMPLE.read_text()
    missing = [k for k in _leaf_keys(Config) if f"{k.rsplit('.', 1)[-1]}:" not in text]
    assert not missing, f"keys not documented in config/example.yaml: {missing}"


def test_unknown_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("node:\n  prot: 104\n")
    with pytest.raises(ConfigError, match=r"node\.prot"):
        load_config(bad, environ={})


def test_wrong_type_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("node:\n  port: not-a-number\n")
    with pytest.raises(ConfigError, match=r"node\.port"):
        load_config(bad, environ={})


def test_ae_title_longer_than_16_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("node:\n  ae_title: ABCDEFGHIJKLMNOPQ\n")
    with pytest.raises(ConfigError, match=r"node\.ae_title"):
        load_config(bad, environ={})


def test_environment_overrides_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("node:\n  port: 2000\n")
    config = load_config(path, environ={"RTPROP__NODE__PORT": "3000",
                                        "RTPROP__NODE__ALLOWED_CALLING_AES": "[TPS, ECLIPSE]",
                                        "UNRELATED": "x"})
    assert config.node.port == 3000
    assert config.node.allowed_calling_aes == ["TPS", "ECLIPSE"]


def test_bad_environment_override_is_named():
    with pytest.raises(ConfigError, match=r"node\.port"):
        load_config(None, environ={"RTPROP__NODE__PORT": "abc"})


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", environ={})


def test_storage_paths_resolve_under_root(tmp_path):
    config = resolve_storage(load_config(None, environ={}, overrides={"storage": {"root": str(tmp_path)}}))
    assert config.storage.database == tmp_path / "rtprop.sqlite"
    assert config.storage.archive == tmp_path / "archive"
    assert config.dropin.inbox == tmp_path / "inbox"
    assert config.dropin.quarantine == tmp_path / "dropin-quarantine"
    assert config.batch.out == tmp_path / "batch"


def test_an_environment_variable_error_names_the_variable():
    with pytest.raises(ConfigError, match="RTPROP__NODE__PORT") as err:
        load_config(None, environ={"RTPROP__NODE__PORT": "eleven"})
    assert "defaults" not in str(err.value)


def test_old_flat_propagation_keys_still_work_with_a_warning_naming_the_new_key(tmp_path):
    from config.schema import ConfigDeprecationWarning

    old = tmp_path / "old.yaml"
    old.write_text("propagation:\n  classic_method: intensity\n  image_size: 1024\n  cine_roi_margin_mm: 20\n")
    with pytest.warns(ConfigDeprecationWarning, match=r"propagation\.classic\.method"):
        config = load_config(old, environ={})
    p = config.propagation
    assert (p.classic.method, p.sam2.image_size, p.cine.roi_margin_mm) == ("intensity", 1024, 20)
    both = tmp_path / "both.yaml"
    both.write_text("propagation:\n  mode: video\n  sam2: {mode: image_chain}\n")
    with pytest.raises(ConfigError, match=r"sam2\.mode"):
        load_config(both, environ={})


def test_self_check_min_dice_is_read_as_the_file_check_s_threshold_with_a_warning(tmp_path):
    # It checks the written file against its masks, not the contour: the key carries that name now.
    from config.schema import ConfigDeprecationWarning

    old = tmp_path / "old.yaml"
    old.write_text("pipeline:\n  self_check_min_dice: 0.95\n")
    with pytest.warns(ConfigDeprecationWarning, match=r"pipeline\.file_check_min_dice"):
        assert load_config(old, environ={}).pipeline.file_check_min_dice == 0.95
    both = tmp_path / "both.yaml"
    both.write_text("pipeline:\n  self_check_min_dice: 0.95\n  file_check_min_dice: 0.9\n")
    with pytest.raises(ConfigError, match=r"file_check_min_dice"):
        load_config(both, environ={})
