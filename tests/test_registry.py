"""The model registry without a model run: the promotion gate's arithmetic on stored evaluations, routing by
ROI name and modality (most specific scope wins), registration copies, and the sha256 check at load."""
from __future__ import annotations

import hashlib
import json

import pytest

from config.load import load_config, resolve_storage
from db.engine import open_database, transaction
from db.schema import Model, utcnow
from models.sam2_loader import CheckpointError
from pipeline.model_routing import settings_for, verified_settings
from model_lifecycle.registry import RegistryError, add_model, gate, list_models


@pytest.fixture(scope="module")
def sam2_checkpoint(tmp_path_factory):
    """A real SAM2.1 tiny checkpoint (seeded random weights, 256 px): loads as the configured model."""
    import torch

    from models.sam2_loader import load_model

    loaded = load_model("configs/sam2.1/sam2.1_hiera_t.yaml", None, 256, "cpu", 2, seed=0, cache=False)
    path = tmp_path_factory.mktemp("ckpt") / "weights.pt"
    torch.save({"model": loaded.model.state_dict()}, path)
    return path


@pytest.fixture
def node(tmp_path):
    config = resolve_storage(load_config(None, overrides={"storage": {"root": str(tmp_path)}}))
    factory = open_database(config.storage.database)
    yield config, factory
    factory.kw["bind"].dispose()


def item(roi: str, modality: str, candidate: float, active: float) -> dict:
    return {"roi": roi, "modality": modality, "candidate": {"dice": candidate}, "active": {"dice": active},
            "active_model": "classic", "active_sha256": ""}


def test_gate_passes_a_model_within_the_margins_and_refuses_one_worse_on_any_roi(node):
    config, _ = node
    config.models.gate_mean_dice_margin, config.models.gate_roi_dice_margin = 0.01, 0.05
    better = {"items": [item("GTV", "CT", 0.80, 0.75), item("GTV", "CT", 0.70, 0.72), item("CTV", "MR", 0.90, 0.88)]}
    decision = gate(better, config)
    assert decision.passed and decision.worse_rois == [] and decision.rois_compared == 3
    # better on average, but one ROI 0.08 worse: refused, naming it
    mixed = {"items": [item("GTV", "CT", 0.95, 0.75), item("CTV", "CT", 0.70, 0.78), item("CTV", "CT", 0.71, 0.79)]}
    decision = gate(mixed, config)
    assert not decision.passed and decision.worse_rois == ["CTV"] and "CTV" in " ".join(decision.reasons)
    # each ROI within 0.05, but the mean lower by 0.03 > 0.01
    slightly = {"items": [item("GTV", "CT", 0.72, 0.75), item("CTV", "CT", 0.75, 0.78)]}
    decision = gate(slightly, config)
    assert not decision.passed and decision.worse_rois == [] and "mean Dice" in decision.reasons[0]


def test_gate_judges_only_the_scope_asked_for(node):
    config, _ = node
    ev = {"items": [item("GTV_CT", "CT", 0.9, 0.7), item("GTV_MR", "MR", 0.2, 0.7), item("Bladder", "CT", 0.1, 0.9)]}
    assert gate(ev, config, "GTV.*", "CT").passed
    assert gate(ev, config, "gtv.*").worse_rois == ["GTV_MR"]  # case-insensitive full match, both modalities
    nothing = gate(ev, config, "PTV.*")
    assert not nothing.passed and "no evaluated validation ROI" in nothing.reasons[0]


def add_row(factory, name: str, roi_regex: str = "", modality: str = "", state: str = "active", path: str = "",
            sha256: str = "") -> None:
    with transaction(factory) as session:
        session.add(Model(name=name, backend="sam2", path=path or f"/models/{name}.pt", sha256=sha256 or name * 4,
                          model_cfg="configs/sam2.1/sam2.1_hiera_t.yaml", image_size=512, state=state,
                          roi_regex=roi_regex, modality=modality, added_by="test", activated_by="test",
                          added_at=utcnow(), activated_at=utcnow()))


def test_routing_takes_the_most_specific_active_scope_and_falls_back_to_the_configuration(node):
    config, factory = node
    assert settings_for(factory, config, "GTV", "CT").name == "classic"  # fresh node: the weight-free default
    add_row(factory, "everything")
    add_row(factory, "gtv", roi_regex="GTV.*")
    add_row(factory, "gtv-mr", roi_regex="gtv.*", modality="MR")
    add_row(factory, "old-gtv", roi_regex="GTV.*", modality="CT", state="registered")  # not active
    assert settings_for(factory, config, "GTVp", "MR").name == "gtv-mr"
    assert settings_for(factory, config, "GTVp", "CT").name == "gtv"
    assert settings_for(factory, config, "Bladder", "CT").name == "everything"
    routed = settings_for(factory, config, "GTV", "CT")
    assert routed.backend == "sam2" and str(routed.settings.checkpoint) == "/models/gtv.pt"
    assert routed.settings.sam2.image_size == 512 and routed.sha256 == "gtv" * 4


def test_registration_copies_with_the_sha256_and_a_changed_file_is_refused_at_load(node, tmp_path, sam2_checkpoint):
    config, factory = node
    ckpt = tmp_path / "weights.pt"
    ckpt.write_bytes(sam2_checkpoint.read_bytes())
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"checkpoint_sha256": "0" * 64}))
    with pytest.raises(RegistryError, match="not its card"):
        add_model(factory, config, ckpt, card_path=card)
    row, created = add_model(factory, config, ckpt, model_cfg="tiny", image_size=256)
    assert row.backend == "sam2" and row.model_cfg == "tiny" and row.image_size == 256
    assert created and row.name == f"weights-{digest[:8]}" and row.path == f"models/{digest}.pt"
    assert (config.storage.root / row.path).read_bytes() == ckpt.read_bytes()
    again, created = add_model(factory, config, ckpt)
    assert not created and again.name == row.name
    listed = {m["name"]: m for m in list_models(factory, config)}
    assert listed["classic"]["default"] and listed[row.name]["state"] == "registered"
    add_row(factory, "live", path=row.path, sha256=digest)
    routed = settings_for(factory, config, "GTV", "CT")
    assert verified_settings(routed).checkpoint == config.storage.root / row.path  # the registered file: accepted
    with open(config.storage.root / row.path, "ab") as fh:
        fh.write(b"!")
    with pytest.raises(CheckpointError, match="changed after registration"):
        verified_settings(routed)


def test_a_file_that_does_not_load_as_the_configured_model_is_not_registered(node, tmp_path, sam2_checkpoint):
    """`models add README.md` registered it, and after `activate --force` every job failed (issue 21, item 3)."""
    config, factory = node
    readme = tmp_path / "README.md"
    readme.write_text("# not weights\n")
    with pytest.raises(RegistryError, match=r"README.md in .* cannot be loaded as a sam2 model"):
        add_model(factory, config, readme)
    # real weights registered as another architecture (small, not tiny): refused too
    with pytest.raises(RegistryError, match="cannot be loaded"):
        add_model(factory, config, sam2_checkpoint, model_cfg="configs/sam2.1/sam2.1_hiera_s.yaml", image_size=256)
    with factory() as session:
        assert [m.name for m in session.query(Model).all()] == ["classic"]
    assert not list((config.storage.root / "models").glob("*.pt"))  # nothing copied either
