"""Where a result goes: rules on the calling AE of the images it was made from.

First matching `node.routes` rule wins (calling_ae equal, or "*" for any); otherwise
`node.default_destination`. A rule with dry_run=True means: resolve, audit, do not send.
"""
from __future__ import annotations

from dataclasses import dataclass

from config.errors import UserError
from config.schema import Config, Destination


class RoutingError(UserError):
    """No destination for a calling AE, or a rule names a destination that is not configured."""


@dataclass(frozen=True)
class Route:
    name: str                       # key in node.destinations
    destination: Destination | None  # None only when dry_run and the name is unknown
    dry_run: bool = False


def resolve_destination(config: Config, calling_ae: str) -> Route:
    """The destination for results of images sent by `calling_ae`; RoutingError if there is none."""
    node = config.node
    ae = (calling_ae or "").strip()
    for rule in node.routes:
        if rule.calling_ae.strip() in (ae, "*"):
            dest = node.destinations.get(rule.destination)
            if dest is None and not rule.dry_run:
                raise RoutingError(f"route for calling AE {ae!r} names destination {rule.destination!r}, "
                                   f"which is not in node.destinations ({sorted(node.destinations)})")
            return Route(rule.destination, dest, rule.dry_run)
    if node.default_destination:
        dest = node.destinations.get(node.default_destination)
        if dest is None:
            raise RoutingError(f"node.default_destination {node.default_destination!r} is not in "
                               f"node.destinations ({sorted(node.destinations)})")
        return Route(node.default_destination, dest, False)
    raise RoutingError(f"no route for calling AE {ae!r} and no node.default_destination")


def parse_destination(text: str) -> Destination:
    """`AE@HOST:PORT` -> a Destination (UserError naming the text otherwise)."""
    try:
        ae, rest = text.split("@", 1)
        host, port = rest.rsplit(":", 1)
        return Destination(ae_title=ae, host=host, port=int(port))
    except ValueError as exc:
        raise RoutingError(f"destination {text!r} must be AE@HOST:PORT (e.g. TPS@10.0.0.5:104)") from exc


def with_destination(config: Config, text: str) -> Config:
    """`--destination AE@HOST:PORT` beats the file: every result goes there; the file's sending routes are
    dropped (its dry-run rules stay: shadow mode is a safety setting)."""
    node = config.node
    config.node = node.model_copy(update={
        "destinations": {**node.destinations, "cli": parse_destination(text)}, "default_destination": "cli",
        "routes": [r for r in node.routes if r.dry_run]})
    return config
