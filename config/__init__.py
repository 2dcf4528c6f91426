"""hotknob.config: the schema, the layer sources, and the precedence merge with provenance."""

from .changes import changed_keys
from .environ import env_layer
from .errors import (
    HotknobError,
    InvalidChange,
    InvalidInput,
    LayerError,
    Problem,
    SchemaLoadError,
    Unavailable,
    UsageError,
)
from .files import read_config_file
from .merge import DEFAULT_PRECEDENCE, Snapshot, merge_layers, parse_precedence
from .schema import DEFAULT_SCHEMA, MLParams, iter_leaves, load_schema, restart_only_keys
from .sources import (
    LAYERS,
    Layer,
    cli_layer,
    defaults_layer,
    etcd_layer,
    files_layer,
    read_files_layer,
)

__all__ = [
    "DEFAULT_PRECEDENCE",
    "DEFAULT_SCHEMA",
    "LAYERS",
    "HotknobError",
    "InvalidChange",
    "InvalidInput",
    "Layer",
    "LayerError",
    "MLParams",
    "Problem",
    "SchemaLoadError",
    "Snapshot",
    "Unavailable",
    "UsageError",
    "changed_keys",
    "cli_layer",
    "defaults_layer",
    "env_layer",
    "etcd_layer",
    "files_layer",
    "iter_leaves",
    "load_schema",
    "merge_layers",
    "parse_precedence",
    "read_config_file",
    "read_files_layer",
    "restart_only_keys",
]
