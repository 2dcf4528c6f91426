"""The ``hotknob`` command line: parsing, dispatch, and turning errors into exit codes.

Exit codes: 0 ok, 1 invalid input or rejected change, 2 usage, 3 cannot reach
etcd or the daemon. Every error is one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from hotknob.config import DEFAULT_SCHEMA, HotknobError, UsageError
from hotknob.config.merge import DEFAULT_PRECEDENCE
from hotknob.config.sources import DEFAULT_ENV_PREFIX

Handler = Callable[[argparse.Namespace], int]

# gRPC's C core prints its own INFO lines (a failed TLS handshake, say) to stderr; the error
# that matters reaches the user as hotknob's one line. Set before grpc is first imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so usage errors share the one-line path."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # ``hotknob: set: ...`` (main prints the ``hotknob:``), not ``hotknob: hotknob set:``
        command = self.prog.partition(" ")[2]
        raise UsageError(f"{command}: {message}" if command else message)


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name) or default


def common_options() -> _Parser:
    p = _Parser(add_help=False)
    g = p.add_argument_group("common options")
    g.add_argument("--app", default=_env("HOTKNOB_APP", "default"), help="application name")
    g.add_argument("--schema", default=_env("HOTKNOB_SCHEMA", DEFAULT_SCHEMA), help="module:Class")
    g.add_argument(
        "--config", action="append", default=[], metavar="FILE", help="config file (repeatable)"
    )
    g.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="pin a value for the life of the process (repeatable; the cli layer)",
    )
    g.add_argument(
        "--etcd-endpoints",
        default=_env("HOTKNOB_ETCD_ENDPOINTS"),
        help="comma-separated host:port list (env HOTKNOB_ETCD_ENDPOINTS); none = no etcd layer",
    )
    g.add_argument("--etcd-user", default=_env("HOTKNOB_ETCD_USER"))
    g.add_argument(
        "--etcd-password",
        default=_env("HOTKNOB_ETCD_PASSWORD"),
        help="prefer the env var HOTKNOB_ETCD_PASSWORD",
    )
    g.add_argument("--etcd-ca", default=_env("HOTKNOB_ETCD_CA"), help="CA certificate (TLS)")
    g.add_argument("--etcd-cert", default=_env("HOTKNOB_ETCD_CERT"), help="client certificate")
    g.add_argument("--etcd-key", default=_env("HOTKNOB_ETCD_KEY"), help="client key")
    g.add_argument("--etcd-timeout", type=float, default=5.0, help="seconds per etcd call")
    g.add_argument("--env-prefix", default=DEFAULT_ENV_PREFIX)
    g.add_argument("--precedence", default=",".join(DEFAULT_PRECEDENCE))
    g.add_argument("--socket", default=_env("HOTKNOB_SOCKET"), help="daemon socket path")
    g.add_argument("--state-dir", default=_env("HOTKNOB_STATE_DIR"), help="last-known-good dir")
    g.add_argument("--metrics-addr", default=_env("HOTKNOB_METRICS_ADDR"), help="host:port")
    g.add_argument("--log-level", default="info")
    return p


def build_parser() -> argparse.ArgumentParser:
    from . import cmd_config, cmd_etcd, cmd_live

    common = common_options()
    parser = _Parser(
        prog="hotknob",
        description="Retune a running training or inference process without a restart.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    cmd_config.register(add)
    cmd_etcd.register(add)
    cmd_live.register(add)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        if not argv:
            parser.print_help()
            return 2
        args = parser.parse_args(argv)
        if not getattr(args, "handler", None):
            parser.print_help()
            return 2
        return int(args.handler(args))
    except HotknobError as exc:
        print(f"hotknob: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
