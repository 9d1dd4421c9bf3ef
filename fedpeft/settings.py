"""The base of every settings dataclass: the error type, the per-field checks, ``Section``.

A feature's settings (a codec's ``codec.<name>.*``, a task's, a strategy's) are frozen
dataclasses that check themselves when built, whoever builds them: the run config
(:mod:`fedpeft.config`) or code.  This module holds what they share and nothing that names
a feature, so a feature imports it without importing the run config that assembles them all.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar, TypeVar

import tomllib

ConfigValue = bool | int | float | str
_S = TypeVar("_S", bound="Section")


class ConfigError(ValueError):
    """A run-config key or value is invalid; the message names the key."""


def choices(*values: str) -> dict[str, Any]:
    """Field metadata: the value must be one of ``values``."""
    return {"choices": values}


def value_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict[str, Any]:
    """Field metadata: the value must lie in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""
    return {"min": lo, "max": hi, "lo_open": lo_open}


def from_registry(registry: typing.Mapping[str, Any]) -> dict[str, Any]:
    """Field metadata: the value must be a name in ``registry`` (read when checked, so an
    entry registered later counts)."""
    return {"registry": lambda: tuple(registry)}


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


def toml_value(raw: str) -> object:
    """``raw`` read as a TOML value (``4``, ``0.5``, ``true``, ``"x"``, ``[1, 2]``), else ``raw`` itself.

    The one reader of command-line and ``strategy.kwargs`` values: an unquoted word stays text.
    """
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def parse_set(items: list[str]) -> dict[str, ConfigValue]:
    """``key=value`` pairs (``--set``); values parse as TOML scalars, else as plain strings."""
    out: dict[str, ConfigValue] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        value = toml_value(raw)
        if not isinstance(value, (bool, int, float, str)):
            raise ConfigError(f"--set {key}: only scalars are allowed, got {raw!r}")
        out[key.strip()] = value
    return out


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
    elif kind is str and isinstance(value, bool) and "true" in fld.metadata.get("choices", ()):
        value = "true" if value else "false"  # a switch with more settings than on and off
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
SECTIONS: dict[str, type[Section]] = {}
"""Every section of the run config, by name, in the order they were declared.

A feature declares its section by subclassing :class:`Section` with ``section="name"``;
the run config (:class:`fedpeft.config.RunConfig`) is assembled from this registry, so a
new feature adds its keys without an edit anywhere else."""


class Section:
    """Base of the config dataclasses: each checks its fields when it is built.

    ``section`` (a class keyword) is the prefix of its run-config keys (``"train"`` for
    ``train.learning-rate``; ``""`` for the top-level keys of :class:`RunConfig`), so an
    error names the key whichever way the object was built.  A named section registers
    itself in :data:`SECTIONS`, and so becomes part of every run config.

    Two hooks let a feature state how it relates to the others without any other module
    naming it: :meth:`check_run` (a rule across sections, phrased in the traits the other
    side declares) and :meth:`implies` (settings of other sections that this one's choice
    entails, such as FFA-LoRA's frozen A).
    """

    _section: ClassVar[str] = ""

    def __init_subclass__(cls, section: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._section = section
        if section:
            SECTIONS[section] = cls

    @classmethod
    def of(cls: type[_S], run: Any) -> _S:
        """This section of run config ``run`` (typed: ``LoraConfig.of(cfg).r``)."""
        found = run.section(cls._section)
        assert isinstance(found, cls)
        return found

    def check_run(self, run: Any) -> None:
        """Checks that involve other sections of the run ``run`` (none unless overridden).

        Called once the whole run config is built; raise :class:`ConfigError` naming the
        key.  Ask the other side for its declared traits rather than testing its name."""

    def client_view(self, partition_id: int, run: Any) -> Section:
        """This section as client ``partition_id`` builds its model (itself unless
        overridden: LoRA's rank may differ per client)."""
        return self

    def server_view(self, run: Any) -> Section:
        """This section as the server builds its template (itself unless overridden)."""
        return self

    def implies(self) -> dict[str, dict[str, Any]]:
        """Settings of other sections entailed by this one, ``{section: {field: value}}``.

        Applied when a run config is read, over what the user gave (none unless overridden)."""
        return {}

    def __post_init__(self) -> None:
        for name, value in check_fields(self, self._section).items():
            object.__setattr__(self, name, value)  # an int given for a float, a list for a tuple
        self._check()

    def _check(self) -> None:
        """Checks beyond one field's type, choices and range (none unless overridden)."""
