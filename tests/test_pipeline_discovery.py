"""Prompt discovery on the real sts-001 CT with prompt RTSTRUCTs built as a TPS writes them."""
from __future__ import annotations

import pytest

from config.schema import PipelineConfig, RTStructConfig
from converters.tps import output_style
from pipeline.prompt_rois import find_prompts
from pipeline_helpers import sts_prompt_case


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    from converters.rtstruct_read import read_rtstruct

    c = sts_prompt_case("CT", tmp_path_factory.mktemp("p"))
    c["ss"] = read_rtstruct(c["prompt_path"], c["volume"])
    return c


def test_rectangle_is_an_exact_box_and_points_group_by_marker(case):
    specs, notes = find_prompts(case["ss"], case["volume"], PipelineConfig())
    by = {s.structure: s for s in specs}
    assert set(by) == {"GTV", "GTVpt"}
    assert by["GTV"].kind == "box" and by["GTV"].box == list(case["box"]) and by["GTV"].slice == case["slice"]
    assert by["GTVpt"].kind == "point" and sorted(p[2] for p in by["GTVpt"].points) == [False, True]


def test_mask_mode_and_custom_markers(case):
    specs, _ = find_prompts(case["ss"], case["volume"], PipelineConfig(prompt_mode="mask"))
    assert {s.structure: s.kind for s in specs}["GTV"] == "mask"
    specs, notes = find_prompts(case["ss"], case["volume"], PipelineConfig(positive_point_marker="_pos",
                                                                          negative_point_marker="_neg"))
    assert [s.structure for s in specs] == ["GTV"] and any("no +/- marker" in n for n in notes)


def test_recontour_regex_on_the_reference_rtstruct(case):
    from converters.rtstruct_read import read_rtstruct
    from pipeline_helpers import STS_CT

    ref = read_rtstruct(next((STS_CT / "rtstruct").iterdir()), case["volume"])
    assert find_prompts(ref, case["volume"], PipelineConfig())[0] == []  # fully contoured: left alone
    specs, _ = find_prompts(ref, case["volume"], PipelineConfig(recontour_roi_regex="gtv_.*"))
    assert len(specs) == 1 and specs[0].mode == "recontour" and specs[0].kind == "box"


def test_tps_profiles():
    eclipse = output_style("GTV p/1", RTStructConfig(tps_profile="eclipse"))
    assert eclipse == {"name": "GTV p_1", "color": (255, 0, 0), "interpreted_type": "GTV"}
    generic = output_style("Liver", RTStructConfig())
    assert generic["interpreted_type"] == "ORGAN" and generic["color"] == (255, 128, 0)
    assert output_style("PTV_High", RTStructConfig(tps_profile="raystation"))["interpreted_type"] == "PTV"
