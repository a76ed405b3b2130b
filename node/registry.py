"""Which modulars a node runs, built from what, and in which order.

The default set names only modulars that exist (a modular not built yet is absent, never
faked). A config may replace any implementation by dotted path
(``[modulars.implementations] approver = "pkg.mod:Class"``), disable one
(``[modulars] disabled = [...]``), and third-party packages add modulars through the
``gfsp.modulars`` entry-point group. Start order is a topological sort over each modular's
``requires``, ties broken by the canonical order below.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable, Mapping
from typing import Any

from node.config import Config
from node.errors import ConfigError
from node.modular import Modular, ModularFactory, NodeContext

ENTRY_POINT_GROUP = "gfsp.modulars"

# Canonical start order (dependencies first, the front door last).
CANONICAL_ORDER: tuple[str, ...] = (
    "signer", "metadata", "authorizer", "approver", "p2p", "manager", "receiver",
    "uploader", "downloader", "executor", "gater",
)

# The modulars built so far, by name.
DEFAULT_MODULARS: dict[str, str] = {
    "approver": "modulars.approver:Approver",
    "authorizer": "modulars.authorizer:Authorizer",
    "metadata": "modulars.metadata:Metadata",
    "gater": "modulars.gater:Gater",
    "manager": "modulars.manager:Manager",
    "uploader": "modulars.uploader:Uploader",
    "downloader": "modulars.downloader:Downloader",
    "receiver": "modulars.receiver:Receiver",
    "executor": "modulars.executor:TaskExecutor",
    "p2p": "p2p.modular:P2PModular",
    "signer": "modulars.signer:Signer",
}


def load_object(path: str) -> Any:
    """Import ``"package.module:attr"``; errors become :class:`ConfigError` naming the path."""
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load modular implementation {path!r}: {exc}") from None
    return obj


def _entry_points() -> dict[str, Callable[[], Any]]:
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return {ep.name: ep.load for ep in eps}


def resolve_factories(config: Config, *, defaults: Mapping[str, str] = DEFAULT_MODULARS,
                      entry_points: Mapping[str, Callable[[], Any]] | None = None
                      ) -> dict[str, ModularFactory]:
    """The factories of every modular this node will run, by name."""
    eps = _entry_points() if entry_points is None else entry_points
    where = str(config.source) if config.source else "<config>"
    known = set(defaults) | set(eps) | set(CANONICAL_ORDER)
    for section, names in (("modulars", [*config.modulars.disabled,
                                         *config.modulars.implementations]),
                           ("limits.services", list(config.limits.services))):
        for name in names:
            if name not in known:
                raise ConfigError(f"{where}: {section}: unknown modular {name!r} "
                                  f"(known: {', '.join(sorted(known))})")
    factories: dict[str, ModularFactory] = {}
    for name, path in defaults.items():
        factories[name] = load_object(path)
    for name, loader in eps.items():
        try:
            factories[name] = loader()
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"entry point {ENTRY_POINT_GROUP}:{name} failed to load: {exc}"
                              ) from None
    for name, path in config.modulars.implementations.items():
        factories[name] = load_object(path)
    for name in config.modulars.disabled:
        factories.pop(name, None)
    return factories


def start_order(modulars: Mapping[str, Modular]) -> list[str]:
    """Names in dependency order; a missing requirement or a cycle is a :class:`ConfigError`."""
    rank = {name: i for i, name in enumerate(CANONICAL_ORDER)}
    pending = sorted(modulars, key=lambda n: (rank.get(n, len(rank)), n))
    requires = {n: tuple(getattr(modulars[n], "requires", ())) for n in pending}
    for name, reqs in requires.items():
        for req in reqs:
            if req not in modulars:
                raise ConfigError(f"modular {name!r} requires {req!r}, which is not enabled")
    order: list[str] = []
    while pending:
        ready = [n for n in pending if all(r in order for r in requires[n])]
        if not ready:
            raise ConfigError(f"modulars have a dependency cycle: {', '.join(pending)}")
        order.append(ready[0])
        pending.remove(ready[0])
    return order


def build_modulars(ctx: NodeContext, factories: Mapping[str, ModularFactory]
                   ) -> dict[str, Modular]:
    """Instantiate each factory with the context; check it is a Modular named as registered."""
    built: dict[str, Modular] = {}
    for name, factory in factories.items():
        modular = factory(ctx)
        if not isinstance(modular, Modular):
            raise ConfigError(f"modular {name!r} ({factory!r}) lacks name/description/serve")
        if modular.name != name:
            raise ConfigError(f"modular registered as {name!r} calls itself {modular.name!r}")
        built[name] = modular
    return built
