"""Where a result goes: rules on the calling AE of the images it was made from.

First matching `node.routes` rule wins (calling_ae equal, or "*" for any); otherwise
`node.default_destination`. A rule with dry_run=True means: resolve, audit, do not send.

A job's route is decided once, when the job is created, by the node that received its prompt
(`route_for_job`), and stored on the job (`JobRoute`, the job's `route` column): a worker needs no
routes of its own, and a change of routes applies to jobs created after it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

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


@dataclass(frozen=True)
class JobRoute:
    """Where one job's result goes, decided when the job was created (stored on the job as JSON).

    `kind`: "dicom" (C-STORE to `ae_title@host:port`, the destination `name` of node.destinations),
    "dropin" (the drop-in outbox: the prompt came in by the drop-in folder), or "none" (no destination:
    `error` says why; delivery fails the job with it). `dry_run`: processed and audited, never sent.
    """

    kind: Literal["dicom", "dropin", "none"]
    name: str = ""
    ae_title: str = ""
    host: str = ""
    port: int = 0
    dry_run: bool = False
    error: str = ""

    @property
    def destination(self) -> Destination | None:
        return Destination(ae_title=self.ae_title, host=self.host, port=self.port) if self.kind == "dicom" else None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in ("", 0, False) or k == "kind"}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "JobRoute":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def describe(self) -> str:
        """One line for `rtprop jobs show` and the web app: where the result goes (or why nowhere)."""
        where = {"dicom": f"{self.ae_title}@{self.host}:{self.port} (destination {self.name!r})",
                 "dropin": "the drop-in outbox", "none": f"nowhere: {self.error}"}[self.kind]
        return f"dry run, never sent (would go to {where})" if self.dry_run else where


def route_for_job(config: Config, calling_ae: str, *, dropin: bool = False) -> JobRoute:
    """The route of a job whose prompt came from `calling_ae` (or by the drop-in folder), by `config`'s
    routes: the receiving node's, when the job is created. Shadow mode (pipeline.dry_run_aes, or a
    dry_run route rule) is decided here too."""
    ae = (calling_ae or "").strip()
    dry_run = ae in config.pipeline.dry_run_aes
    if dropin:
        return JobRoute("dropin", "dropin-outbox", dry_run=dry_run)
    try:
        route = resolve_destination(config, ae)
    except RoutingError as exc:
        return JobRoute("none", dry_run=dry_run, error=str(exc))
    if route.destination is None:  # a dry-run rule naming no configured destination
        return JobRoute("none", route.name, dry_run=True, error=f"route {route.name!r} is dry_run only")
    d = route.destination
    return JobRoute("dicom", route.name, d.ae_title, d.host, d.port, dry_run=dry_run or route.dry_run)
