"""The backend registry (models/backends.py): a new propagator is one module and one registration, and
nothing else in the tree names a backend; the job engine's queue follows the model routed to the ROI."""
from __future__ import annotations

import ast
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from config.load import load_config, resolve_storage
from config.schema import PropagationConfig
from models import backends
from models.prompts import BoxPrompt

REPO = Path(__file__).resolve().parents[1]
FAKE = '''
import numpy as np
from models.result import PropagationResult

def propagate(image, spacing_zyx, prompts, modality, settings):
    """Fills each prompt's box on every slice: a propagator anyone can check by eye."""
    mask = np.zeros(image.shape, dtype=bool)
    for p in prompts:
        mask[:, p.y0:p.y1 + 1, p.x0:p.x1 + 1] = True
    return PropagationResult(mask=mask, confidence=np.ones(image.shape[0]), backend="boxfill")
'''


@pytest.fixture
def boxfill(tmp_path, monkeypatch):
    """A third propagator: one module on the path, one registration."""
    (tmp_path / "boxfill_backend.py").write_text(textwrap.dedent(FAKE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    return backends.register(backends.BackendSpec("boxfill", "boxfill_backend"))


def test_a_new_propagator_is_one_module_and_one_registration(boxfill):
    from models.propagate import propagate

    image = np.zeros((5, 20, 20), dtype=np.float32)
    result = propagate(image, (2.0, 1.0, 1.0), BoxPrompt(2, 4, 5, 9, 12), "CT", PropagationConfig(backend="boxfill"))
    assert result.backend == "boxfill" and result.mask.sum() == 5 * 8 * 6
    assert "boxfill" in backends.names()
    config = load_config(None, environ={}, overrides={"propagation": {"backend": "boxfill"}})
    assert backends.check_settings(config.propagation).backend == "boxfill"


def test_an_unknown_backend_is_refused_naming_the_key_and_the_registered_ones():
    config = load_config(None, environ={}, overrides={"propagation": {"backend": "sam3"}})
    with pytest.raises(backends.UnknownBackendError, match=r"propagation.backend: unknown backend 'sam3' "
                                                          r"\(registered: classic, sam2, or auto\)"):
        backends.check_settings(config.propagation)


def test_auto_takes_the_weights_backend_only_with_a_checkpoint(tmp_path):
    assert backends.choose(PropagationConfig()).name == "classic"
    assert backends.choose(PropagationConfig(checkpoint=tmp_path / "w.pt")).name == "sam2"
    assert backends.choose(PropagationConfig(backend="classic", checkpoint=tmp_path / "w.pt")).name == "classic"


# Where a backend's name may be spelled: the registry, the backends' own modules, the configuration's
# per-backend settings sections (propagation.sam2, propagation.classic), migration history.
ALLOWED = {"models/backends.py", "models/classic.py", "models/classic_points.py", "models/sam2_backend.py",
           "models/sam2_loader.py", "models/sam2_video.py", "models/finetune.py", "config/schema.py"}


def test_nothing_else_in_the_tree_names_a_backend():
    names = set(backends.names())
    found = []
    for package in ("cli", "config", "converters", "db", "dicom_node", "model_lifecycle", "models", "pipeline", "web"):
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel in ALLOWED or "migrations" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                    found.append(f"{rel}:{node.lineno} {node.value!r}")
    assert found == []


def test_the_engine_queue_follows_the_model_routed_to_each_roi(tmp_path):
    """Not the process's configuration: an active SAM2 model for GTVs puts GTV jobs on `gpu` on a node whose
    own configuration is weight-free, and an active weight-free model keeps its ROIs on `cpu` on a SAM2 node."""
    from db.engine import open_database, transaction
    from db.schema import Model, Series, utcnow
    from pipeline.model_routing import job_queue

    factory = open_database(tmp_path / "rtprop.sqlite")
    classic_node = resolve_storage(load_config(None, environ={}, overrides={"storage": {"root": str(tmp_path)}}))
    sam2_node = classic_node.model_copy(update={"propagation": classic_node.propagation.model_copy(
        update={"checkpoint": tmp_path / "w.pt"})})
    with transaction(factory) as session:
        session.add(Series(series_instance_uid="1.2.3", study_instance_uid="1.2", modality="CT", state="complete"))
        session.add(Model(name="gtv-sam2", backend="sam2", path="models/x.pt", sha256="x" * 64, model_cfg="tiny",
                          image_size=256, state="active", roi_regex="GTV.*", modality="CT", added_by="t",
                          activated_by="t", added_at=utcnow(), activated_at=utcnow()))
        session.execute(Model.__table__.update().where(Model.name == "classic").values(
            state="active", roi_regex="Bladder", modality=""))
    with factory() as session:
        assert job_queue(session, classic_node, ["GTVp"], "1.2.3") == "gpu"
        assert job_queue(session, classic_node, ["Liver"], "1.2.3") == "cpu"
        assert job_queue(session, classic_node, ["Liver", "GTV1"], "1.2.3") == "gpu"
        assert job_queue(session, sam2_node, ["Bladder"], "1.2.3") == "cpu"
        assert job_queue(session, sam2_node, ["Liver"], "1.2.3") == "gpu"
    factory.kw["bind"].dispose()
