"""The base of every settings dataclass: the error type, the per-field checks, ``Section``.

A feature's settings (a codec's ``codec.<name>.*``, a task's, a strategy's) are frozen
dataclasses that check themselves when built, whoever builds them: the run config
(:mod:`fedpeft.config`) or code.  This module holds what they share and nothing that names
a feature, so a feature imports it without importing the run config that assembles them all.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar

ConfigValue = bool | int | float | str


class ConfigError(ValueError):
    """A run-config key or value is invalid; the message names the key."""


def choices(*values: str) -> dict[str, Any]:
    """Field metadata: the value must be one of ``values``."""
    return {"choices": values}


def value_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict[str, Any]:
    """Field metadata: the value must lie in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""
    return {"min": lo, "max": hi, "lo_open": lo_open}


def did_you_mean(word: str, options: typing.Iterable[str]) -> str:
    """:func:`strategies.hints.did_you_mean`, imported when first needed: importing the
    ``strategies`` package loads Flower, which this module (and the CLI's start) does not need."""
    from strategies.hints import did_you_mean as hint

    return hint(word, options)


def unknown_choice(key: str, value: object, options: typing.Iterable[str]) -> ConfigError:
    """The error for a value outside a fixed or registered set of names."""
    opts = sorted(options)
    return ConfigError(
        f"config key '{key}': unknown value {value!r}{did_you_mean(str(value), opts)} "
        f"(valid: {', '.join(opts)})"
    )


# ---------------------------------------------------------------------- checks
def _is_value_field(fld: dataclasses.Field[Any]) -> bool:
    """A plain setting (not a section, nor a field built by a factory such as codec options)."""
    return fld.default is not dataclasses.MISSING and not dataclasses.is_dataclass(fld.default)


def check_fields(obj: Any, section: str) -> dict[str, Any]:
    """Check every setting of config dataclass ``obj`` against its type and metadata.

    ``section`` prefixes the keys errors name (``""`` for top-level keys).  Returns the
    fields whose value must be stored normalised (an int given for a float, a list for a
    tuple); raises :class:`ConfigError` on the first bad one.
    """
    changed: dict[str, Any] = {}
    for fld in dataclasses.fields(obj):
        if not _is_value_field(fld):
            continue
        value = getattr(obj, fld.name)
        name = fld.name.replace("_", "-")
        checked = check_value(f"{section}.{name}" if section else name, fld, value)
        if checked is not value:
            changed[fld.name] = checked
    return changed


def check_value(key: str, fld: dataclasses.Field[Any], value: object) -> Any:
    """Check one value of field ``fld`` (type, choices, registry, range); return it normalised."""
    kind = type(fld.default)
    if kind is tuple:
        if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config key '{key}' expects a tuple of strings, got {value!r}")
        return value if isinstance(value, tuple) else tuple(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
        value = float(value)
    elif kind is str and not isinstance(value, str):
        raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
    meta = fld.metadata
    if "choices" in meta and value not in meta["choices"]:
        raise unknown_choice(key, value, meta["choices"])
    if "registry" in meta and value not in meta["registry"]():
        raise unknown_choice(key, value, meta["registry"]())
    lo, hi = meta.get("min"), meta.get("max")
    assert isinstance(value, (int, float, str))
    if (
        lo is not None
        and isinstance(value, (int, float))
        and (value < lo or (meta.get("lo_open") and value == lo))
    ):
        op = ">" if meta.get("lo_open") else ">="
        raise ConfigError(f"config key '{key}' must be {op} {lo}, got {value!r}")
    if hi is not None and isinstance(value, (int, float)) and value > hi:
        raise ConfigError(f"config key '{key}' must be <= {hi}, got {value!r}")
    return value


# ---------------------------------------------------------------------- sections
class Section:
    """Base of the config dataclasses: each checks its fields when it is built.

    ``section`` (a class keyword) is the prefix of its run-config keys (``"train"`` for
    ``train.learning-rate``; ``""`` for the top-level keys of :class:`RunConfig`), so an
    error names the key whichever way the object was built.
    """

    _section: ClassVar[str] = ""

    def __init_subclass__(cls, section: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._section = section

    def __post_init__(self) -> None:
        for name, value in check_fields(self, self._section).items():
            object.__setattr__(self, name, value)  # an int given for a float, a list for a tuple
        self._check()

    def _check(self) -> None:
        """Checks beyond one field's type, choices and range (none unless overridden)."""
