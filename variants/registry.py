"""The variant registry: names -> (typed config dataclass, module class).

A variant registers itself with a decorator that names its config dataclass::

    @dataclass
    class MyConfig(AttentionConfig):
        window: int = 128

    @register("my_attention", config=MyConfig)
    class MyAttention(nn.Module):
        def __init__(self, config: MyConfig): ...

`build("my_attention", d_model=256, window=64)` validates the parameters against the
dataclass (unknown names and wrong types raise `ValueError` listing what is allowed) and
returns the module. Third-party packages add variants through the entry-point group
`reformer_harness.variants`: each entry point names a module that registers on import. Modules
named in the environment variable `REFORMER_HARNESS_PLUGINS` (comma-separated, importable from
`sys.path`) are imported the same way, without installing anything.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import types
import typing
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, TypeVar

import torch.nn as nn

ENTRY_POINT_GROUP = "reformer_harness.variants"
PLUGINS_ENV = "REFORMER_HARNESS_PLUGINS"  # comma-separated module names imported like entry points


class PluginError(ImportError):
    """A plugin module (entry point or $REFORMER_HARNESS_PLUGINS) that cannot be imported, or raised
    while imported; the message names the module (the CLI exits 2)."""


class VariantUnavailable(RuntimeError):
    """A variant that cannot run here: an optional package is missing, or the device / dtype has no
    kernel for it (e.g. `sdpa_flash` in float32 on CUDA). Raised when the variant is built or called;
    the harness records such a cell as `skipped` with this message rather than as an `error`."""


@dataclass(frozen=True)
class VariantSpec:
    """One registered variant: its name, kind ("attention", ...), config class and module class."""

    name: str
    kind: str
    config_cls: type
    module_cls: type[nn.Module]
    doc: str

    def parameters(self) -> dict[str, dataclasses.Field]:
        """The config's fields by name (name -> dataclasses.Field, with type and default)."""
        return {f.name: f for f in dataclasses.fields(self.config_cls)}


_REGISTRY: dict[str, VariantSpec] = {}
_entry_points_loaded = False
M = TypeVar("M", bound=type[nn.Module])


def register(name: str, *, config: type, kind: str = "attention") -> Callable[[M], M]:
    """Class decorator registering `module_cls(config_instance)` under `name`."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"variant {name!r}: config must be a dataclass, got {config!r}")

    def decorate(module_cls: M) -> M:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.module_cls is not module_cls:
            raise ValueError(f"variant {name!r} is already registered by {existing.module_cls!r}")
        doc = (module_cls.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = VariantSpec(name, kind, config, module_cls, doc[0] if doc else "")
        module_cls.variant_name = name
        return module_cls

    return decorate


_BACKENDS: dict[str, Callable[[], str]] = {}


def register_backend(name: str, describe: Callable[[], str]) -> None:
    """Register a code path that depends on the machine (a compiled kernel, say): describe() says which
    one runs here and why. The harness records `backends()` in every run's environment."""
    _BACKENDS[name] = describe


def backends() -> dict[str, str]:
    """name -> description of each registered backend, as it resolves on this machine (may build it)."""
    return {name: describe() for name, describe in sorted(_BACKENDS.items())}


def _load_entry_points() -> None:
    """Import the entry-point modules (once) and the modules named in $REFORMER_HARNESS_PLUGINS."""
    global _entry_points_loaded
    if not _entry_points_loaded:
        _entry_points_loaded = True
        for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                entry_point.load()  # importing the module runs its @register decorators
            except Exception as error:  # noqa: BLE001 - any failure of a third-party import, named
                raise PluginError(
                    f"{ENTRY_POINT_GROUP} entry point {entry_point.value!r}: import failed ({type(error).__name__}: {error})"
                ) from error
    # Read on every call: the variable is inherited by the spawned cell processes, so variants
    # registered this way exist there too (a registration made in the parent alone would not).
    for module in filter(None, (name.strip() for name in os.environ.get(PLUGINS_ENV, "").split(","))):
        if module not in sys.modules:
            try:
                importlib.import_module(module)
            except Exception as error:  # noqa: BLE001 - ImportError, or anything the module raises on import
                raise PluginError(f"{PLUGINS_ENV}: cannot import {module!r} ({type(error).__name__}: {error})") from error


def available(kind: str | None = None) -> list[str]:
    """Sorted names of the registered variants, optionally of one kind ("attention", ...)."""
    _load_entry_points()
    return sorted(n for n, s in _REGISTRY.items() if kind is None or s.kind == kind)


def spec(name: str) -> VariantSpec:
    """The registered spec of `name`; ValueError listing the registered names if unknown."""
    _load_entry_points()
    if name not in _REGISTRY:
        raise ValueError(f"unknown variant {name!r}; registered variants: {', '.join(available())}")
    return _REGISTRY[name]


def type_matches(value: Any, annotation: Any) -> bool:
    """Whether `value` fits a config field annotation (int, float, bool, str, X | None, tuple, list)."""
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(type_matches(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (tuple, list):
        inner = typing.get_args(annotation)
        if not isinstance(value, (tuple, list)):
            return False
        item_type = inner[0] if inner else Any
        return all(type_matches(v, item_type) for v in value)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def make_config(name: str, **params: Any) -> Any:
    """The validated config dataclass instance of variant `name` built from `params`."""
    variant = spec(name)
    fields = variant.parameters()
    hints = typing.get_type_hints(variant.config_cls)
    unknown = sorted(set(params) - set(fields))
    if unknown:
        allowed = ", ".join(f"{f} ({type_name(hints[f])})" for f in fields)
        raise ValueError(f"variant {name!r} does not take {', '.join(map(repr, unknown))}; allowed: {allowed}")
    for key, value in params.items():
        if not type_matches(value, hints[key]):
            raise ValueError(f"variant {name!r}: parameter {key!r} must be {type_name(hints[key])}, got {value!r}")
    tuple_fields = {k for k, h in hints.items() if typing.get_origin(h) is tuple or tuple in typing.get_args(h)}
    params = {k: tuple(v) if k in tuple_fields and isinstance(v, list) else v for k, v in params.items()}
    config = variant.config_cls(**params)
    check = getattr(config, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as error:
            raise ValueError(f"variant {name!r}: {error}") from None
    return config


def build(name: str, **params: Any) -> nn.Module:
    """Build the registered variant `name` with config parameters `params` (see `describe`)."""
    return spec(name).module_cls(make_config(name, **params))


def describe(name: str) -> dict[str, tuple[str, Any]]:
    """Parameter name -> (type name, default) of variant `name`."""
    variant = spec(name)
    hints = typing.get_type_hints(variant.config_cls)
    out = {}
    for field in dataclasses.fields(variant.config_cls):
        default = field.default
        if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = field.default_factory()  # type: ignore[misc]
        out[field.name] = (type_name(hints[field.name]), default)
    return out
