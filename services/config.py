"""The configuration tree: every service's config, reachable from here, each frozen, checked when it is built, and
built from the command line (and the environment variables its flags name) by one function.

    specrelay serve       ServeConfig
                            .verifier   VerifierConfig   services/verifier/config.py   from_args
                            .gateway    ServiceConfig    services/gateway/service.py   build_config(args, limits)
                            .drafter    DrafterConfig    services/drafter/service.py   from_args (None: no drafter)
    specrelay gateway     ServiceConfig                  services/gateway/service.py   build_config
    specrelay verifier    VerifierConfig                 services/verifier/cli.py      build_config
    specrelay drafter     DrafterConfig                  services/drafter/service.py   build_config
    specrelay kvstore     KeeperConfig                   services/kvstore/service.py   build_config
    specrelay toolcoord   ToolcoordConfig                services/toolcoord/service.py build_config

`build(command, args)` is the one entry; each command's own `main` calls the same builder.

Why the tree lives here and not in shared/: each dataclass stays beside the service it configures, and checks itself
with that service's own rules (tool-call formats and admission policies, relay methods, proposers), which shared/
cannot import: it sits below services/ in the import graph (tests/test_import_graph.py). This module sits above the
services, as serve.py does, so it can compose them; the services never import it.

Each flag is declared once: a service's `add_arguments` declares its own flags, and a flag two commands take is
declared by one function both call (--model: models/resolve.py add_model_argument; --draft and --proposer: the
drafter's add_draft_arguments; the verifier's: services/verifier/config.py add_arguments). serve's parser is the
union of the gateway's, the drafter's and the verifier's.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and aiohttp stay out of `specrelay --help`
    from specrelay.services.drafter.service import DrafterConfig
    from specrelay.services.gateway.service import ServiceConfig
    from specrelay.services.verifier.config import VerifierConfig


@dataclass(frozen=True)
class ServeConfig:
    """`specrelay serve`: the gateway, the verifier and the drafter in one process, over one bus."""

    verifier: VerifierConfig
    gateway: ServiceConfig  # its limits cut to the verifier's (VerifierLimits)
    drafter: DrafterConfig | None  # None: plain decoding (--proposer none, or no proposer fits)

    @property
    def speculate(self) -> bool:
        return self.drafter is not None


def build_serve(args: argparse.Namespace) -> ServeConfig:
    """The verifier first, then the gateway from the verifier's limits, then the drafter (none: plain decoding)."""
    from specrelay.models.resolve import resolve_model
    from specrelay.services.drafter import service as drafter
    from specrelay.services.gateway import service as gateway
    from specrelay.services.verifier.config import from_args
    from specrelay.shared.modeling.config import ModelConfig

    model_dir = resolve_model(args.model)  # a .gguf or built-in --model, imported once into the cache
    drafter_config = drafter.from_args(args)
    # A turn held across a server-side tool round must outlive the round: the verifier holds it at least that long.
    verifier = from_args(args, str(model_dir), redis=args.redis, speculate=drafter_config is not None,
                         report_kv=False, max_hold_s=max(300.0, args.tool_hold_s))
    limits = gateway.VerifierLimits(ModelConfig.from_dir(model_dir).max_model_len, verifier.max_batch)
    return ServeConfig(verifier, gateway.build_config(args, limits), drafter_config)


def _builders() -> dict[str, Callable[[argparse.Namespace], object]]:
    from specrelay.services.drafter import service as drafter
    from specrelay.services.gateway import service as gateway
    from specrelay.services.kvstore import service as kvstore
    from specrelay.services.toolcoord import service as toolcoord
    from specrelay.services.verifier import cli as verifier

    return {"serve": build_serve, "gateway": gateway.build_config, "verifier": verifier.build_config,
            "drafter": drafter.build_config, "kvstore": kvstore.build_config, "toolcoord": toolcoord.build_config}


COMMANDS = ("serve", "gateway", "verifier", "drafter", "kvstore", "toolcoord")


def build(command: str, args: argparse.Namespace) -> object:
    """The config of `specrelay COMMAND` from its parsed flags. Raises ConfigError on a bad value."""
    builders = _builders()
    if command not in builders:
        raise ValueError(f"no config for {command!r}: one of {', '.join(COMMANDS)}")
    return builders[command](args)
