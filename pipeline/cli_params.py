"""Click parameter types shared by the `rtprop` subcommands (one definition of what a date is)."""
from __future__ import annotations

from datetime import datetime, timezone
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
