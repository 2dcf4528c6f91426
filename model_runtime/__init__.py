"""hotknob.model_runtime: apply live configuration inside a training or inference process.

``import hotknob.model_runtime`` is cheap: stdlib only. torch is imported when
a torch binding is first used (``LiveConfig.bind_optimizer``, ``.optim``,
``.sampling``), never before.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .binding import Binding, Handle, StatefulBinding
    from .client import LiveConfig
    from .errors import DaemonUnavailable, InvalidValue, LiveConfigError

# Loaded on first use: the daemon imports ``protocol`` from this package and needs
# nothing else of it (``LiveConfig`` brings the connection and state modules).
_HOMES = {
    "Binding": ".binding",
    "Handle": ".binding",
    "StatefulBinding": ".binding",
    "LiveConfig": ".client",
    "DaemonUnavailable": ".errors",
    "InvalidValue": ".errors",
    "LiveConfigError": ".errors",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(home, __name__), name)


def __dir__() -> list[str]:
    """The loaded names and the lazy ones: ``help()`` and tab completion list what
    ``dir()`` lists, and the lazy names are not in the module's namespace until used."""
    return sorted({*globals(), *_HOMES})


__all__ = [
    "Binding",
    "DaemonUnavailable",
    "Handle",
    "InvalidValue",
    "LiveConfig",
    "LiveConfigError",
    "StatefulBinding",
]
