"""`rtprop web` and `rtprop users add|token|password|disable`: registered on the CLI group in cli/main.py.

Only click, the configuration and the shared options are imported here at module level; the app itself is imported
when a command runs, so `rtprop --help` stays fast.
"""
from __future__ import annotations

import getpass
import sys
from pathlib import Path
from typing import Any

import click

from cli.loader import load, open_node
from cli.params import config_option, storage_option
from config.errors import UserError
from config.schema import Config


def process_name(kind: str) -> str:
    from dicom_node.scu import process_name as name

    return name(kind)


def start_web_and_heartbeats(factory, config: Config, stop, workers: list, node: bool = True) -> list:  # type: ignore[no-untyped-def]
    """For `rtprop serve` (node=True) and `rtprop worker`: the worker heartbeat row for /health and the
    dashboard (while its worker threads live; the node's own is written by dicom_node/service.py), and the
    web app in a thread of the node when web.port is set. Returns the threads to join at shutdown (the
    heartbeats then mark their rows stopped: a cleanly stopped process is not shown, nor counted, as running)."""
    from db.heartbeat import start_heartbeat

    every = config.web.heartbeat_interval_s
    threads = []
    workers = [t for t in workers if t.name.startswith("rtprop-worker")]
    if workers:
        threads.append(start_heartbeat(factory, process_name("worker"), "worker", stop, interval_s=every,
                                       details={"threads": len(workers)},
                                       alive=lambda: all(t.is_alive() for t in workers)))
    if node and config.web.port:
        from web.server import start_web

        threads.append(start_web(config, factory, stop, process_name("web")))
    return threads


@click.command("web")
@config_option
@storage_option
@click.option("--http-port", type=click.IntRange(1, 65535), help="Port (default: web.port).")
@click.option("--host", help="Listen address (default: web.host, 127.0.0.1).")
def web(config_path: Path | None, storage: Path | None, http_port: int | None, host: str | None) -> None:
    """Serve the review and operations web app alone, over the node's storage and database."""
    from web.server import serve_web

    config = load(config_path, storage, **{"web.port": http_port, "web.host": host})
    if not config.web.port:
        raise click.UsageError("no port: give --http-port N or set web.port")
    serve_web(config, open_node(config), process_name("web"))


@click.group()
def users() -> None:
    """Web app users (in the node's database): add, API token, new password, disable."""


def _audit(factory, event: str, **details: Any) -> None:  # type: ignore[no-untyped-def]
    from db.audit import record
    from db.engine import transaction

    with transaction(factory) as session:
        record(session, event, component="web", by=getpass.getuser(), **details)


@users.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(["viewer", "reviewer", "admin"]), required=True)
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input (else prompted).")
@config_option
@storage_option
def users_add(name: str, role: str, password_stdin: bool, config_path: Path | None, storage: Path | None) -> None:
    """Add user NAME with ROLE (viewer: look; reviewer: accept/reject; admin: also retry, re-send, cancel)."""
    from db.engine import transaction
    from web.auth import AuthError, add_user

    if not password_stdin and not sys.stdin.isatty():
        raise UserError(f"users add {name}: no terminal to ask for the password on: give --password-stdin and "
                        "write the password to standard input")
    password = sys.stdin.readline().rstrip("\r\n") if password_stdin else \
        click.prompt("password", hide_input=True, confirmation_prompt=True)
    factory = open_node(load(config_path, storage), create=True)
    try:
        with transaction(factory) as session:
            add_user(session, name, role, password)
    except AuthError as exc:
        raise click.UsageError(str(exc)) from exc
    _audit(factory, "user.added", user=name, role=role)
    click.echo(f"user {name} added ({role})")


@users.command("token")
@click.argument("name")
@config_option
@storage_option
def users_token(name: str, config_path: Path | None, storage: Path | None) -> None:
    """Make an API token for NAME (Authorization: Bearer TOKEN); printed once, alone on the last line."""
    from db.engine import transaction
    from web.auth import AuthError, get_user, new_token

    factory = open_node(load(config_path, storage))
    try:
        with transaction(factory) as session:
            user = get_user(session, name)
            if user.disabled:
                raise AuthError(f"user {name!r} is disabled")
            token = new_token(session, user)
            role = user.role
    except AuthError as exc:
        raise click.UsageError(str(exc)) from exc
    _audit(factory, "user.token", user=name)
    click.echo(f"API token for {name} ({role}); only its hash is stored, so keep it now:")
    click.echo(token)


@users.command("disable")
@click.argument("name")
@config_option
@storage_option
def users_disable(name: str, config_path: Path | None, storage: Path | None) -> None:
    """Disable NAME: no more logins, its API tokens revoked, its open sessions refused."""
    from db.engine import transaction
    from web.auth import AuthError, disable_user

    factory = open_node(load(config_path, storage))
    try:
        with transaction(factory) as session:
            revoked, ended = disable_user(session, name)
    except AuthError as exc:
        raise click.UsageError(str(exc)) from exc
    _audit(factory, "user.disabled", user=name, tokens_revoked=revoked, sessions_ended=ended)
    click.echo(f"user {name} disabled ({revoked} token(s) revoked, {ended} session(s) ended)")


@users.command("password")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input (else prompted).")
@config_option
@storage_option
def users_password(name: str, password_stdin: bool, config_path: Path | None, storage: Path | None) -> None:
    """Give NAME a new password (12 characters or more, not a common one); its open sessions end."""
    from db.engine import transaction
    from web.auth import AuthError, set_password

    password = sys.stdin.readline().rstrip("\r\n") if password_stdin else \
        click.prompt("new password", hide_input=True, confirmation_prompt=True)
    factory = open_node(load(config_path, storage))
    try:
        with transaction(factory) as session:
            ended = set_password(session, name, password)
    except AuthError as exc:
        raise click.UsageError(str(exc)) from exc
    _audit(factory, "user.password_changed", user=name, sessions_ended=ended)
    click.echo(f"user {name}: new password set ({ended} session(s) ended)")
