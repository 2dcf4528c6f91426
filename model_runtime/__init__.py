"""hotknob.model_runtime: apply live configuration inside a training or inference process.

``import hotknob.model_runtime`` is cheap: stdlib only. torch is imported when
a torch binding is first used (``LiveConfig.bind_optimizer``, ``.optim``,
``.sampling``), never before.
"""

from .binding import Binding, Handle, StatefulBinding
from .client import LiveConfig
from .errors import DaemonUnavailable, LiveConfigError

__all__ = [
    "Binding",
    "DaemonUnavailable",
    "Handle",
    "LiveConfig",
    "LiveConfigError",
    "StatefulBinding",
]
