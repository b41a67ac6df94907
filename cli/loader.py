"""The one configuration-and-database loader of every `rtprop` command.

`load` reads the YAML file, the RTPROP__* variables and the command's flags, resolves the storage
paths and checks the propagation backend against the registry (models/backends.py). `open_node`
opens the node's database as every process does (db/engine.py `open_configured`): the SQLite file
under the storage root, or PostgreSQL at `database.url`. Only the commands that start a node
(`serve`; `dropin` where its inbox already is; `users add` before the first start) may create one;
every other command refuses a storage root that holds no node, so a mistyped `--storage` never
quietly makes a new, empty node.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from config.errors import UserError
from config.load import load_config, resolve_storage
from config.schema import Config


def load(config_path: Path | None, storage: Path | None = None, **overrides: Any) -> Config:
    """The configuration: `config_path`, RTPROP__* variables, then the flags (`overrides`: dotted key ->
    value; None, () and [] are flags not given) and `--storage`; storage paths resolved; backend checked."""
    from models import backends

    tree: dict[str, Any] = {}
    if storage is not None:
        tree["storage"] = {"root": str(storage)}
    for dotted, value in overrides.items():
        if value is None or value == () or value == []:
            continue
        node = tree
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    config = resolve_storage(load_config(config_path, overrides=tree))
    backends.check_settings(config.propagation)
    return config


def has_node(config: Config) -> bool:
    """Does the storage root (and database) hold a node: its SQLite file, or with database.url, the root
    that keeps the audit head anchor?"""
    if config.database.url:
        return Path(config.storage.root).is_dir()
    return Path(config.storage.database).is_file()


def open_node(config: Config, *, create: bool = False) -> sessionmaker[Session]:
    """The node's database (migrated, the audit anchor attached). `create`: a new node may be made here
    (`serve`, `users add`); otherwise a storage root without one is a UserError naming it."""
    from db.engine import open_configured

    if not create and not has_node(config):
        where = (f"no storage root {config.storage.root} (the node's archive and audit anchor live there)"
                 if config.database.url else f"no rtprop database at {config.storage.database}")
        raise UserError(f"{where}: --storage names the node's storage root, the folder `rtprop serve` was "
                        "started with")
    Path(config.storage.root).mkdir(parents=True, exist_ok=True)
    return open_configured(config)
