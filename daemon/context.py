"""What a command needs from its options: the schema, the static layers, and etcd.

Reading the layers is kept here so that ``run``, ``get``, ``explain`` and
``set`` see the same configuration the same way.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from hotknob.config import (
    Layer,
    Snapshot,
    UsageError,
    cli_layer,
    defaults_layer,
    env_layer,
    etcd_layer,
    load_schema,
    parse_precedence,
    read_files_layer,
)
from hotknob.config.dropping_invalid import merge_dropping_invalid
from hotknob.config.errors import Problem
from hotknob.config.keys import config_prefix
from hotknob.config.merge import files_alone
from hotknob.model_runtime.protocol import APP_NAME, APP_NAME_RULE

from .etcd_checks import shadowed_by_files
from .etcd_store import EtcdOptions, EtcdStore
from .guard_lang import escaped


def check_app_name(name: str) -> str:
    """``name`` if it is a valid app name, else ``UsageError`` saying what is allowed."""
    if not APP_NAME.fullmatch(name):
        shown = repr(name if len(name) <= 60 else name[:60] + "...")
        raise UsageError(f"invalid app name {shown} (--app or HOTKNOB_APP): {APP_NAME_RULE}")
    return name


@dataclass(frozen=True)
class Context:
    app: str
    schema: type[BaseModel]
    precedence: tuple[str, ...]
    config_files: tuple[Path, ...]
    etcd: EtcdOptions | None

    def __post_init__(self) -> None:
        check_app_name(self.app)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Context:
        if getattr(args, "env_prefix", None) == "":
            raise UsageError(
                "--env-prefix is empty: every variable of the environment would be read as "
                "a key (give one such as MY_)"
            )
        return cls(
            app=args.app,
            schema=load_schema(args.schema),
            precedence=parse_precedence(args.precedence),
            config_files=tuple(Path(p) for p in args.config),
            etcd=etcd_options(args),
        )

    def require_etcd(self) -> EtcdOptions:
        """The etcd options; ``UsageError`` if no etcd endpoints were given."""
        if self.etcd is None:
            raise UsageError("no etcd endpoints: pass --etcd-endpoints or HOTKNOB_ETCD_ENDPOINTS")
        return self.etcd

    @contextmanager
    def store(self) -> Iterator[EtcdStore]:
        """An etcd client for one command; ``UsageError`` if no endpoints were given."""
        store = EtcdStore(self.require_etcd())
        try:
            yield store
        finally:
            store.close()

    @property
    def prefix(self) -> str:
        return config_prefix(self.app)


def etcd_options(args: argparse.Namespace) -> EtcdOptions | None:
    """The etcd options given, ``None`` without endpoints; ``UsageError`` for options
    that cannot work, TLS files that cannot be loaded included (before any command,
    ``run`` too, has done anything: such files do not mend by waiting)."""
    if not args.etcd_endpoints:
        # No etcd to use them on, but the user, password and TLS files given are checked
        # all the same: a certificate without its key, or a file that does not load, is a
        # usage error with or without endpoints (else it surfaced only once they were set).
        given = (args.etcd_user, args.etcd_password, args.etcd_ca, args.etcd_cert, args.etcd_key)
        if any(given):
            _options(args, endpoints=_CHECK_ONLY_ENDPOINT).check_tls_files()
        return None
    options = _options(args, endpoints=args.etcd_endpoints)
    options.check_tls_files()
    return options


_CHECK_ONLY_ENDPOINT = "127.0.0.1:2379"  # stands for the missing endpoints in a check only


def _options(args: argparse.Namespace, *, endpoints: str) -> EtcdOptions:
    return EtcdOptions.from_strings(
        endpoints,
        user=args.etcd_user,
        password=args.etcd_password,
        ca_cert=args.etcd_ca,
        cert_cert=args.etcd_cert,
        cert_key=args.etcd_key,
        timeout=args.etcd_timeout,
    )


def static_layers(ctx: Context, args: argparse.Namespace) -> list[Layer]:
    """The layers that do not change while a daemon runs: defaults, env and cli."""
    return [
        defaults_layer(ctx.schema),
        env_layer(ctx.schema, prefix=args.env_prefix),
        cli_layer(args.assignments),
    ]


def read_all_layers(
    ctx: Context, args: argparse.Namespace
) -> tuple[list[Layer], Mapping[str, bytes], int]:
    """Every layer as it stands now; etcd is read once, at one revision. Raises
    ``InvalidChange`` if the config files are invalid over the defaults alone, which a
    daemon refuses even where a higher layer shadows the value (``files_alone``)."""
    layers = static_layers(ctx, args)
    layers.append(read_files_layer(ctx.schema, ctx.config_files))
    files_alone(ctx.schema, layers, ctx.precedence)
    kvs: Mapping[str, bytes] = {}
    revision = 0
    if ctx.etcd is not None:
        with ctx.store() as store:
            kvs, revision = store.read_prefix(ctx.prefix)
    layers.append(etcd_layer(ctx.app, kvs))
    return layers, kvs, revision


def current_snapshot(ctx: Context, args: argparse.Namespace) -> tuple[Snapshot, int]:
    """The configuration a daemon started now with no state of its own would serve; etcd
    keys it would reject are left out, each with a warning line on stderr, and a line
    more saying that a daemon that ran those keys keeps what it ran (``Engine``'s
    ``_merge_sanitized``), which this command cannot see."""
    layers, _, revision = read_all_layers(ctx, args)
    # An etcd value the config files shadow from above (``--precedence`` with the files
    # over etcd) and would refuse once they drop its key: the daemon refuses it too.
    under = shadowed_by_files(ctx.schema, ctx.precedence, layers)
    if under:
        keys = [p.key for p in under]
        layers = [layer.without(keys) if layer.name == "etcd" else layer for layer in layers]
    snapshot, dropped = merge_dropping_invalid(ctx.schema, layers, ctx.precedence)
    dropped = [*under, *dropped]
    warn_dropped(dropped)
    if dropped:
        print(
            "hotknob: warning: shown without those values; a daemon keeps running what it "
            "ran for them (`hotknob status` shows each process's revision)",
            file=sys.stderr,
        )
    return snapshot, revision


def warn_dropped(dropped: list[Problem]) -> None:
    """A warning line per etcd value left out. The key is an etcd path's, written by
    anyone: a newline or an escape sequence in it is shown escaped, not sent to the
    terminal (``escaped``)."""
    for problem in dropped:
        print(
            f"hotknob: warning: ignoring etcd value of {escaped(problem.key)}: "
            f"{escaped(problem.reason)}",
            file=sys.stderr,
        )
