"""Click parameter types and options shared by the `rtprop` subcommands (one definition each)."""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click


class IsoDateTime(click.ParamType):
    """An ISO 8601 date or date-time (2026-11-30, 2026-11-30T18:00, 2026-11-30T18:00+01:00); UTC unless an
    offset is given."""

    name = "ISO-DATE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            when = datetime.fromisoformat(str(value).strip())
        except ValueError:
            self.fail(f"{value!r} is not an ISO 8601 date or date-time (e.g. 2026-11-30 or 2026-11-30T18:00; UTC "
                      "unless an offset such as +01:00 is given)", param, ctx)
        return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


ISO_DATE = IsoDateTime()


class Regex(click.ParamType):
    """A regular expression (ROI names are matched case-insensitively, in full); a bad one is the user's to fix."""

    name = "REGEX"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            re.compile(str(value))
        except re.error as exc:
            self.fail(f"{value!r} is not a valid regular expression: {exc}", param, ctx)
        return str(value)


REGEX = Regex()

config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                             help="YAML configuration file (see config/example.yaml).")
storage_option = click.option("--storage", type=click.Path(file_okay=False, path_type=Path),
                              help="Storage root of the node: archive, quarantine, database and registered "
                                   "models live under it.")


def emit(summary: dict[str, Any]) -> None:
    """A command's result: one JSON line on stdout (progress and tables go to stderr)."""
    click.echo(json.dumps(summary, sort_keys=True, default=str))
