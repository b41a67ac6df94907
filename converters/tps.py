"""How results are named, typed and coloured for the planning system that receives them.

Eclipse limits structure IDs to 16 characters of a plain character set; RayStation appends "(1)"
when an ROI of the same name but another type arrives; every TPS compares names without case.
Profiles are documented in docs/pipeline.md (`rtstruct.tps_profile`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from config.schema import RTStructConfig

MAX_ROI_NAME = 16  # Eclipse structure ID limit


def roi_name_for_tps(name: str, suffix: str = "", max_len: int = MAX_ROI_NAME) -> str:
    """`name` + `suffix` (unless already there) cut to `max_len`, cutting the name, not the suffix."""
    name = name.strip()
    if suffix and name.endswith(suffix):
        name = name[: -len(suffix)]
    if len(suffix) >= max_len:
        suffix = suffix[:max_len - 1]
    return name[: max_len - len(suffix)].rstrip() + suffix


def unique_names(names: list[str], suffix: str = "", max_len: int = MAX_ROI_NAME) -> list[str]:
    """Make names unique (case-insensitive, as TPSs compare them) by a ~N tag before the suffix."""
    seen: set[str] = set()
    out = []
    for name in names:
        candidate, n = name, 1
        base = name[: len(name) - len(suffix)] if suffix and name.endswith(suffix) else name
        tail = suffix if base != name else ""
        while candidate.lower() in seen:
            n += 1
            tag = f"~{n}"
            candidate = base[: max_len - len(tag) - len(tail)] + tag + tail
        seen.add(candidate.lower())
        out.append(candidate)
    return out


@dataclass(frozen=True)
class TpsProfile:
    """How results are named and typed for one planning system (documented in docs/pipeline.md)."""

    name: str
    max_name_len: int = 16
    allowed_name_chars: str | None = None  # regex character class of allowed characters, None = any printable
    type_from_name: bool = True  # RTROIInterpretedType from the name's prefix (GTV*, CTV*, PTV*, else default)
    colors_by_type: bool = True
    flag_in_name: bool = False  # mark an implausible result in the ROI name (this TPS shows no ROI description)


PROFILES: dict[str, TpsProfile] = {
    # Eclipse: structure IDs of at most 16 characters; plain characters only.
    "eclipse": TpsProfile("eclipse", 16, r"A-Za-z0-9 _\-+.()~", flag_in_name=True),
    # RayStation appends "(1)" when a same-named ROI of another type arrives: our names carry the suffix,
    # and the type follows the name, so a re-sent result never collides with the planner's own ROI.
    "raystation": TpsProfile("raystation", 16, None),
    "monaco": TpsProfile("monaco", 16, r"A-Za-z0-9 _\-+.()~", flag_in_name=True),
    "generic": TpsProfile("generic", 16, None, type_from_name=False, colors_by_type=False),
}
TYPE_COLORS = {"GTV": (255, 0, 0), "CTV": (255, 165, 0), "PTV": (0, 128, 255), "ORGAN": (0, 200, 0),
               "OAR": (0, 200, 0), "EXTERNAL": (0, 255, 0)}
_TYPE_PREFIX = re.compile(r"^(GTV|CTV|ITV|PTV)", re.IGNORECASE)


def max_name_len(settings: RTStructConfig) -> int:
    """The longest ROI name the configured TPS takes (rtstruct.tps_profile)."""
    return PROFILES[settings.tps_profile].max_name_len


FLAG_SUFFIX = "_CHK"  # an implausible result, in the name for TPSs that show no ROI description


def output_style(structure: str, settings: RTStructConfig, *, implausible: bool = False) -> dict[str, Any]:
    """Name (before the writer's suffix), colour and RTROIInterpretedType of a result ROI.

    `implausible`: the guard flagged it; the reasons always go in the ROI description, and in the
    name (`_CHK`, the name cut to keep it) for profiles whose TPS does not show descriptions.
    """
    profile = PROFILES[settings.tps_profile]
    name = structure.strip()
    if implausible and profile.flag_in_name:
        name = name[: profile.max_name_len - len(FLAG_SUFFIX) - len(settings.roi_suffix)] + FLAG_SUFFIX
    if profile.allowed_name_chars:
        name = re.sub(f"[^{profile.allowed_name_chars}]", "_", name)
    itype = settings.roi_interpreted_type.upper()
    if profile.type_from_name:
        m = _TYPE_PREFIX.match(name)
        if m:
            itype = {"ITV": "CTV"}.get(m.group(1).upper(), m.group(1).upper())
    color = tuple(settings.roi_color)
    if profile.colors_by_type and itype in TYPE_COLORS:
        color = TYPE_COLORS[itype]
    return {"name": name, "color": color, "interpreted_type": itype}
