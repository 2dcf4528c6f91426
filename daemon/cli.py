"""The ``hotknob`` command line: parsing, dispatch, and turning errors into exit codes.

Exit codes: 0 ok, 1 invalid input or rejected change, 2 usage, 3 cannot reach
etcd or the daemon. Every error is one line on stderr, never a traceback (the last
line: ``run`` logging JSON lines also logs a failed start as ``daemon_start_failed``
just before it).

Each command is offered only the shared options it reads (``COMMAND_OPTIONS``):
one it does not take is a usage error, never silently ignored.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType


def _interrupted_while_loading(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C while the modules below load: exit 130, as once ``main`` runs."""
    raise SystemExit(130)


# Loading pydantic and the rest takes a third of a second or more, before ``main`` can
# catch anything: a Ctrl-C then printed a traceback from inside whichever import it landed
# in. Only while this module loads, and only in place of Python's own handler.
_QUIET_LOAD = (
    threading.current_thread() is threading.main_thread()
    and signal.getsignal(signal.SIGINT) is signal.default_int_handler
)
if _QUIET_LOAD:
    signal.signal(signal.SIGINT, _interrupted_while_loading)

try:
    import argparse
    import os
    import sys
    from collections.abc import Callable, Sequence
    from dataclasses import dataclass, field
    from typing import Any

    from hotknob.config import DEFAULT_SCHEMA, HotknobError, UsageError
    from hotknob.config.keys import UnaskedApp
    from hotknob.config.merge import DEFAULT_PRECEDENCE
    from hotknob.config.sources import DEFAULT_ENV_PREFIX

    from .etcd_types import timeout_problem
    from .guard_lang import escaped
finally:
    if _QUIET_LOAD:
        signal.signal(signal.SIGINT, signal.default_int_handler)

Handler = Callable[[argparse.Namespace], int]

# gRPC's C core prints its own INFO lines (a failed TLS handshake, say) to stderr; the error
# that matters reaches the user as hotknob's one line. Set before grpc is first imported.
# Not NONE: that also silences the line of a fatal check, and the process aborts unexplained.
# Its ERROR lines came from TLS files it could not load, which are refused before it sees
# them (``EtcdOptions.check_tls_files``).
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so usage errors share the one-line path."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # ``hotknob: set: ...`` (main prints the ``hotknob:``), not ``hotknob: hotknob set:``
        command = self.prog.partition(" ")[2]
        raise UsageError(f"{command}: {message}" if command else message)


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name) or default


def _seconds(text: str) -> float:
    """``--etcd-timeout``'s value: refused here, not as an etcd that cannot be reached."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    why = timeout_problem(seconds)
    if why is not None:
        raise argparse.ArgumentTypeError(why)
    return seconds


@dataclass(frozen=True)
class _Option:
    """A shared option: its heading in ``--help``, how argparse reads it, and the value a
    command that does not take it sees (so that shared code such as ``Context.from_args``
    reads one shape of namespace; it is never an environment variable's)."""

    flag: str
    section: str
    unused: Any
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def dest(self) -> str:
        return str(self.kwargs.get("dest") or self.flag.lstrip("-").replace("-", "_"))


APP = "application"
LAYERS = "schema and layer"
ETCD = "etcd"
DAEMON = "daemon"
SOCKET_DEFAULT = "$XDG_RUNTIME_DIR/hotknob/<app>.sock, else /tmp/hotknob-<uid>/<app>.sock"


def _options() -> list[_Option]:
    """Every shared option; defaults from the environment are read when the parser is built."""
    return [
        _Option("--app", APP, "default", dict(
            default=_env("HOTKNOB_APP") or UnaskedApp("default"), metavar="NAME",
            help="application name, 1 to 100 letters, digits, '.', '_' or '-' (starting "
            "with a letter or digit): the etcd prefix /hotknob/<app>/, the default socket "
            "path and the state file (env HOTKNOB_APP, else 'default')",
        )),
        _Option("--schema", LAYERS, DEFAULT_SCHEMA, dict(
            default=_env("HOTKNOB_SCHEMA", DEFAULT_SCHEMA), metavar="MODULE:CLASS",
            help=f"the pydantic model of the configuration (env HOTKNOB_SCHEMA, else "
            f"{DEFAULT_SCHEMA})",
        )),
        _Option("--config", LAYERS, [], dict(
            action="append", default=[], metavar="FILE",
            help="config file, YAML / TOML / JSON by extension: the files layer "
            "(repeatable; a later file wins)",
        )),
        _Option("--set", LAYERS, [], dict(
            dest="assignments", action="append", default=[], metavar="KEY=VALUE",
            help="pin a value for the life of the process: the cli layer (repeatable)",
        )),
        _Option("--env-prefix", LAYERS, DEFAULT_ENV_PREFIX, dict(
            default=DEFAULT_ENV_PREFIX, metavar="PREFIX",
            help="prefix of the env layer's variables, used as given, separator included "
            "(case does not matter): --env-prefix MY_ reads MY_TRAIN__LR, and --env-prefix "
            "MY reads MYTRAIN__LR and refuses MY_TRAIN__LR as naming no field (default: "
            "%(default)s)",
        )),
        _Option("--precedence", LAYERS, ",".join(DEFAULT_PRECEDENCE), dict(
            default=",".join(DEFAULT_PRECEDENCE), metavar="LAYERS",
            help="the layers, lowest first, each once (default: %(default)s)",
        )),
        _Option("--etcd-endpoints", ETCD, None, dict(
            default=_env("HOTKNOB_ETCD_ENDPOINTS"), metavar="HOST:PORT[,...]",
            help="etcd members, comma-separated (env HOTKNOB_ETCD_ENDPOINTS; none: no etcd)",
        )),
        _Option("--etcd-user", ETCD, None, dict(
            default=_env("HOTKNOB_ETCD_USER"), metavar="USER",
            help="etcd user (env HOTKNOB_ETCD_USER)",
        )),
        _Option("--etcd-password", ETCD, None, dict(
            default=_env("HOTKNOB_ETCD_PASSWORD"), metavar="PASSWORD",
            help="etcd password (env HOTKNOB_ETCD_PASSWORD: prefer it, since other users "
            "can read a flag in the process list)",
        )),
        _Option("--etcd-ca", ETCD, None, dict(
            default=_env("HOTKNOB_ETCD_CA"), metavar="FILE",
            help="CA certificate for TLS (env HOTKNOB_ETCD_CA)",
        )),
        _Option("--etcd-cert", ETCD, None, dict(
            default=_env("HOTKNOB_ETCD_CERT"), metavar="FILE",
            help="client certificate for TLS (env HOTKNOB_ETCD_CERT)",
        )),
        _Option("--etcd-key", ETCD, None, dict(
            default=_env("HOTKNOB_ETCD_KEY"), metavar="FILE",
            help="client key for TLS (env HOTKNOB_ETCD_KEY)",
        )),
        _Option("--etcd-timeout", ETCD, 5.0, dict(
            type=_seconds, default=5.0, metavar="SECONDS",
            help="seconds per etcd call, above 0 (default: %(default)s)",
        )),
        _Option("--socket", DAEMON, None, dict(
            default=_env("HOTKNOB_SOCKET"), metavar="PATH",
            help=f"the daemon's Unix socket (env HOTKNOB_SOCKET, else {SOCKET_DEFAULT})",
        )),
        _Option("--state-dir", DAEMON, None, dict(
            default=_env("HOTKNOB_STATE_DIR"), metavar="DIR",
            help="where the last-known-good snapshot and the version counter are kept "
            "(env HOTKNOB_STATE_DIR, else $XDG_STATE_HOME/hotknob, else "
            "~/.local/state/hotknob)",
        )),
        _Option("--metrics-addr", DAEMON, None, dict(
            default=_env("HOTKNOB_METRICS_ADDR"), metavar="HOST:PORT",
            help="serve Prometheus /metrics and /healthz there (env HOTKNOB_METRICS_ADDR; "
            "default: not served)",
        )),
        _Option("--log-level", DAEMON, "info", dict(
            default="info", type=str.lower, choices=LOG_LEVELS, metavar="LEVEL",
            help=f"{', '.join(LOG_LEVELS)} (default: %(default)s)",
        )),
    ]  # fmt: skip


_LAYERS = ("--schema", "--config", "--set", "--env-prefix", "--precedence")
_ETCD = tuple(f"--etcd-{name}" for name in ("endpoints", "user", "password", "ca", "cert", "key"))
_ETCD += ("--etcd-timeout",)

# The shared options each command reads (check the handler before adding one).
COMMAND_OPTIONS: dict[str, tuple[str, ...]] = {
    "run": ("--app", *_LAYERS, *_ETCD, "--socket", "--state-dir", "--metrics-addr", "--log-level"),
    "get": ("--app", *_LAYERS, *_ETCD),
    "explain": ("--app", *_LAYERS, *_ETCD),
    # each file alone over the defaults: no other layer, no etcd
    "validate": ("--schema", "--precedence"),
    "set": ("--app", *_LAYERS, *_ETCD),
    "unset": ("--app", *_LAYERS, *_ETCD),
    "rollback": ("--app", *_LAYERS, *_ETCD),
    # the schema only to mask secret values
    "history": ("--app", "--schema", *_ETCD),
    "status": ("--app", "--schema", *_ETCD),
    "watch": ("--app", "--socket"),
    # its own app, config, socket and state dir; only the etcd it uses is the caller's
    "demo": _ETCD,
}

# Where an option means something else for one command.
HELP_FOR: dict[tuple[str, str], str] = {
    ("demo", "--etcd-endpoints"): "the etcd to use (env HOTKNOB_ETCD_ENDPOINTS); none: start "
    "a throwaway one. The demo writes only under its own app, /hotknob/demo-<random>/, "
    "and deletes those keys at the end",
}
SHARED_FLAGS = frozenset(option.flag for option in _options())


def build_parser() -> argparse.ArgumentParser:
    from . import cmd_config, cmd_etcd, cmd_history, cmd_live

    options = {option.flag: option for option in _options()}
    parser = _Parser(
        prog="hotknob",
        description="Retune a running training or inference process without a restart.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        taken = COMMAND_OPTIONS[name]
        groups: dict[str, Any] = {}
        for flag in taken:
            option = options[flag]
            if option.section not in groups:
                groups[option.section] = p.add_argument_group(f"{option.section} options")
            kwargs = dict(option.kwargs)
            kwargs["help"] = HELP_FOR.get((name, flag), kwargs["help"])
            groups[option.section].add_argument(flag, **kwargs)
        p.set_defaults(
            handler=handler,
            **{o.dest: o.unused for o in options.values() if o.flag not in taken},
        )
        return p

    cmd_config.register(add)
    cmd_etcd.register(add)
    cmd_history.register(add)
    cmd_live.register(add)
    return parser


def _refuse(args: argparse.Namespace, extra: list[str]) -> None:
    """A usage error for arguments no parser took: one line, naming a shared option that
    this command does not take as such (argparse would only say "unrecognized")."""
    command = getattr(args, "command", None)
    for arg in extra:
        flag = arg.partition("=")[0]
        if command and flag in SHARED_FLAGS:
            raise UsageError(
                f"{command}: {flag} is not an option of this command (see hotknob {command} --help)"
            )
    raise UsageError(f"unrecognized arguments: {' '.join(extra)}")


def _check_names(args: argparse.Namespace) -> None:
    """Refuse, before a command does anything, an app name or an etcd endpoint that is
    malformed (a usage error: the app names the state file, the socket and the etcd
    keys; an endpoint that cannot be parsed must not read as an etcd that is down)."""
    from .context import check_app_name, etcd_options

    taken = COMMAND_OPTIONS.get(args.command, ())
    if "--app" in taken:
        check_app_name(args.app)
    if "--etcd-endpoints" in taken:
        etcd_options(args)


def _log_start_failed(exc: HotknobError, args: argparse.Namespace, handled: bool) -> None:
    """``hotknob run`` failed to start: say so as a log event too, when the daemon logs
    JSON lines (stderr not a terminal), since a collector of those drops the plain line
    (which still follows, as the last line on stderr).

    ``run`` configures its logging first thing (``logs.configure``); an error found before
    its handler ran (a malformed app name or endpoint) configures it here, as ``run``
    would have. With console logging (a terminal) the plain line is all there is."""
    import structlog

    from . import logs

    try:
        if not handled:
            logs.configure(level=args.log_level)
        if not isinstance(
            structlog.get_config()["processors"][-1], structlog.processors.JSONRenderer
        ):
            return
        structlog.get_logger("hotknob").critical(
            "daemon_start_failed", error=str(exc), exit_code=exc.exit_code
        )
    except Exception:  # a log that fails must not hide the plain line
        pass


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _open_standard_descriptors()
    args: argparse.Namespace | None = None
    handled = False  # whether the command's handler ran
    try:
        parser = build_parser()
        if not argv:
            parser.print_help()
            return 2
        args, extra = parser.parse_known_args(argv)
        if extra:
            _refuse(args, extra)
        if not getattr(args, "handler", None):
            parser.print_help()
            return 2
        _check_names(args)
        handled = True
        return int(args.handler(args))
    except HotknobError as exc:
        if args is not None and getattr(args, "command", None) == "run":
            _log_start_failed(exc, args, handled)  # before the plain line: that one is last
            from . import logs

            logs.drain()  # written by a thread of its own to a pipe: let it go out first
        print(f"hotknob: {_shown(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # a reader that stopped early (``| head``): not an error
        _drop_output()
        return 0
    except OSError as exc:  # stdout on a full disk, most likely: one line, as for any error
        try:
            sys.stdout.flush()
        except OSError:
            _drop_output()
        command = getattr(args, "command", None)
        written = handled and command in ("set", "unset", "rollback")
        hint = " (the change may be written: `hotknob history` shows it)" if written else ""
        print(f"hotknob: {exc}{hint}", file=sys.stderr)
        return 1


def _open_standard_descriptors() -> None:
    """Open ``/dev/null`` on each of descriptors 0, 1 and 2 that is closed (a supervisor
    that closed them, ``hotknob run 2>&-``), and give Python a stream for it.

    Else the first files the daemon opens take those numbers, and what is written to
    stderr (gRPC's own lines, written to descriptor 2 whatever ``sys.stderr`` is) lands
    in its socket or its state file; and with no ``sys.stderr`` the start failed, exit 1
    and not a word."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stdout is None:
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the process's
    if sys.stderr is None:
        sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)  # noqa: SIM115


def _shown(message: str) -> str:
    """``message`` with the control characters of each line escaped: a key or a value it
    quotes may come from etcd, written by anyone, and an escape sequence there would
    reach the terminal. Its line breaks stay (``demo`` ends one with the daemon's log)."""
    return "\n".join(escaped(line) for line in message.split("\n"))


def _drop_output() -> None:
    """Send what stdout still holds to /dev/null: at exit Python flushes it again, and
    would print that error too."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no stdout at all
        pass


if __name__ == "__main__":
    sys.exit(main())
