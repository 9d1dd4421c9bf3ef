"""The one typed, validated configuration of a fedpeft run, assembled from its features.

Flower hands every app a flat ``run_config`` (``[tool.flwr.app.config]`` in
``pyproject.toml``, nested tables flattened to ``section.key``, then overridden by
``flwr run -c`` or ``fedpeft run --set``).  :meth:`RunConfig.from_run_config` is the
only place in the code base that reads those raw keys: every other module receives
the frozen objects it builds.

:class:`RunConfig` holds the run's own keys (seed, rounds, clients, sampling, ...) and one
section per feature, taken from :data:`fedpeft.settings.SECTIONS`: each feature declares
its section (a frozen :class:`~fedpeft.settings.Section` next to its code, imported by
:mod:`fedpeft.features`), its choice lists are its registries, and its rules across
sections are its own (:meth:`~fedpeft.settings.Section.check_run`,
:meth:`~fedpeft.settings.Section.implies`).  Nothing here names a feature, so adding one
is never an edit to this module.

Validation happens before anything is trained: an unknown key names the key, suggests
the closest valid one and lists them all; a bad value names the key and the allowed
values or range.  Every section checks its own fields when it is built (through
:func:`~fedpeft.settings.check_fields`), so one built in code (in a benchmark or a notebook)
fails with the same message as the run config would.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import fedpeft.features  # noqa: F401  -- the built-in features declare their sections
from fedpeft.settings import SECTIONS, check_value, choices, did_you_mean, value_range

# The settings base, re-exported: code that builds a config imports it from here.
from fedpeft.settings import ConfigError as ConfigError
from fedpeft.settings import ConfigValue as ConfigValue
from fedpeft.settings import Section as Section
from fedpeft.settings import parse_set as parse_set
from fedpeft.settings import toml_value as toml_value

Schema = dict[str, tuple[type, dataclasses.Field[Any]]]


@dataclass(frozen=True, init=False)
class RunConfig(Section):
    """Everything a run needs, validated; built once by :meth:`from_run_config` (or in code:
    ``RunConfig(num_rounds=3, <section>=<its Section>(...))``, with the same checks, the
    sections' own and those across sections).

    A section is read as an attribute (``cfg.<section>.<field>``; typed:
    ``<its Section>.of(cfg).<field>``); ``dataclasses.replace(cfg, <section>=...)`` replaces one.
    """

    seed: int = 0
    num_rounds: int = field(default=5, metadata=value_range(1))
    num_clients: int = field(default=10, metadata=value_range(1))
    fraction_train: float = field(default=1.0, metadata=value_range(0.0, 1.0, lo_open=True))
    # "fixed": fraction-train x num-clients clients per round (at least min-train-clients),
    # drawn without replacement; "poisson": each client joins each round independently with
    # probability fraction-train (what amplified user-level DP accounting assumes).
    client_sampling: str = field(default="fixed", metadata=choices("fixed", "poisson"))
    min_train_clients: int = field(default=2, metadata=value_range(1))
    # A round with fewer usable replies than this keeps the global model as it was.
    min_replies: int = field(default=1, metadata=value_range(1))
    fraction_evaluate: float = field(default=0.0, metadata=value_range(0.0, 1.0))
    # The server evaluates the global model in round 0, every evaluate-every-th round and
    # the last; the rounds between are recorded as not evaluated (accuracy null).
    evaluate_every: int = field(default=1, metadata=value_range(1))
    # Evaluations before the last use only the first evaluate-examples test examples (the
    # test split is in a seeded shuffled order: a fixed random subsample); 0 = all.  The
    # last round always uses the whole test split.  Each record says how many it used.
    evaluate_examples: int = field(default=0, metadata=value_range(0))
    round_timeout: float = field(default=3600.0, metadata=value_range(0.0, lo_open=True))
    # "auto" picks cuda > mps > cpu; or name one ("cpu", "cuda", "cuda:1", "mps").
    device: str = "auto"
    # Parent folder of the per-run results folder; relative paths resolve against
    # the directory the launcher was started from.
    results_dir: str = "results"
    # Name of this run's folder under results_dir ("" = timestamp + config hash).
    run_name: str = ""
    # Continue the run in results-dir/run-name from its last checkpoint (`fedpeft run --resume`).
    resume: bool = False
    # Seconds the server waits for all clients to announce themselves.
    connect_timeout: float = field(default=600.0, metadata=value_range(0.0, lo_open=True))
    # Importable modules that declare extensions (a section, a registry entry), imported
    # before the rest of the run config is read: in the launcher, the ServerApp and every
    # ClientApp, so a Ray worker or a SuperNode knows the extension's keys and names too.
    extensions: tuple[str, ...] = ()
    # One (name, section) pair per registered section, in SECTIONS order.
    sections: tuple[tuple[str, Section], ...] = field(default_factory=tuple, repr=False)

    def __init__(self, **values: Any) -> None:
        given = dict(values.pop("sections", ()))  # dataclasses.replace passes the old ones
        given.update({name: values.pop(name) for name in list(values) if name in SECTIONS})
        for fld in _top_fields():
            object.__setattr__(self, fld.name, values.pop(fld.name, fld.default))
        if values:
            raise TypeError(f"RunConfig got unknown keys or sections: {', '.join(sorted(values))}")
        built = []
        for name, owner in SECTIONS.items():
            section = given.pop(name, None)
            if section is None:
                section = owner()
            elif not isinstance(section, owner):
                raise TypeError(f"RunConfig section {name!r} must be a {owner.__name__}, not {section!r}")
            built.append((name, section))
        if given:
            raise TypeError(f"RunConfig got sections no feature declares: {', '.join(sorted(given))}")
        object.__setattr__(self, "sections", tuple(built))
        self.__post_init__()

    def __getattr__(self, name: str) -> Any:
        # Only reached for what is not a field: a section.  Dunder lookups (pickle, copy)
        # must fail as usual, also before ``sections`` exists.
        if not name.startswith("__"):
            for key, section in self.__dict__.get("sections", ()):
                if key == name:
                    return section
        raise AttributeError(f"RunConfig has no key or section {name!r}")

    def section(self, name: str) -> Section:
        """The section ``name`` (an AttributeError names what is missing)."""
        found: Section = getattr(self, name)
        return found

    # ------------------------------------------------------------------ building
    @classmethod
    def from_run_config(cls, raw: Mapping[str, ConfigValue]) -> RunConfig:
        """Build and validate from Flower's flat run config (``section.key`` names).

        Keys not given keep their defaults; an unknown key or a bad value raises
        :class:`ConfigError` naming it.  Each value is checked as it is read (the first bad
        key in the given order is the one reported), with the function the sections' own
        checks use; then each section is built, what a section implies for the others is
        applied (:meth:`~fedpeft.settings.Section.implies`), and the rules across sections run.
        """
        load_extensions(raw.get("extensions", ""))  # first: they may declare keys of the rest
        schema = config_schema()
        top: dict[str, Any] = {}
        given: dict[str, dict[str, Any]] = {}
        nested: dict[str, dict[str, dict[str, Any]]] = {}
        for key, value in raw.items():
            if key not in schema:
                raise ConfigError(
                    f"unknown config key '{key}'{did_you_mean(key, schema)} "
                    f"(valid keys: {', '.join(sorted(schema))})"
                )
            owner, fld = schema[key]
            converted = _convert(key, fld, value)
            parts = key.split(".")
            if owner is cls:
                top[fld.name] = converted
            elif len(parts) == 3:  # <section>.<entry>.<key>: a registry entry's own settings
                nested.setdefault(parts[0], {}).setdefault(parts[1], {})[fld.name] = converted
            else:
                given.setdefault(parts[0], {})[fld.name] = converted
        for section, entries in nested.items():
            slot = _nested_field(SECTIONS[section])
            options = dict(getattr(SECTIONS[section](), slot.name))
            for name, values in entries.items():
                options[name] = dataclasses.replace(options[name], **values)
            given.setdefault(section, {})[slot.name] = tuple(options.items())
        built: dict[str, Any] = {name: owner(**given.get(name, {})) for name, owner in SECTIONS.items()}
        for implied in [section.implies() for section in built.values()]:
            for name, values in implied.items():
                built[name] = dataclasses.replace(built[name], **values)
        return cls(**top, **built)

    def _check(self) -> None:
        """Checks across sections (each section checked itself when it was built)."""
        if self.min_train_clients > self.num_clients:
            raise ConfigError(
                f"config key 'min-train-clients' ({self.min_train_clients}) must not exceed "
                f"'num-clients' ({self.num_clients})"
            )
        for _, section in self.sections:
            section.check_run(self)
        dev = self.device
        if not (dev in ("auto", "cpu", "mps", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ConfigError(
                f"config key 'device': unknown value {dev!r} (valid: auto, cpu, cuda, cuda:N, mps)"
            )

    def fixed_cohort(self) -> int:
        """Clients per round under fixed-size sampling (Flower's FedAvg rule)."""
        return max(int(self.num_clients * self.fraction_train), self.min_train_clients)

    def for_partition(self, partition_id: int) -> RunConfig:
        """This config as client ``partition_id`` builds its model (:meth:`~fedpeft.settings.Section.client_view`)."""
        return self._with(tuple((n, s.client_view(partition_id, self)) for n, s in self.sections))

    def for_server(self) -> RunConfig:
        """This config as the server builds its template (:meth:`~fedpeft.settings.Section.server_view`)."""
        return self._with(tuple((n, s.server_view(self)) for n, s in self.sections))

    def _with(self, sections: tuple[tuple[str, Section], ...]) -> RunConfig:
        same = all(new is old for (_, new), (_, old) in zip(sections, self.sections, strict=True))
        return self if same else dataclasses.replace(self, sections=sections)

    def to_run_config(self) -> dict[str, ConfigValue]:
        """The flat Flower run config that rebuilds this object (round trip)."""
        out: dict[str, ConfigValue] = {}
        for key, (owner, fld) in config_schema().items():
            parts = key.split(".")
            obj: Any = self if owner is RunConfig else self.section(parts[0])
            if len(parts) == 3:
                obj = dict(getattr(obj, _nested_field(type(obj)).name))[parts[1]]
            value = getattr(obj, fld.name)
            out[key] = ",".join(value) if isinstance(value, tuple) else value
        return out


def load_extensions(spec: object) -> None:
    """Import each module of ``extensions`` (comma-separated); importing one is its registration."""
    if not isinstance(spec, (str, tuple)):
        return  # not a list of modules: the key's own check names it
    modules = spec if isinstance(spec, tuple) else spec.split(",")
    for name in (m.strip() for m in modules):
        if name and name not in sys.modules:
            try:
                importlib.import_module(name)
            except ImportError as err:
                raise ConfigError(f"config key 'extensions': cannot import {name!r} ({err})") from err


def with_defaults(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A results folder's saved run config with every key it lacks at its default.

    A folder written before a key existed ran with that key's default (a new key never
    changes what the old runs did), so sweeps and reports compare it as such.
    """
    defaults = json.loads(json.dumps(RunConfig().to_run_config(), default=str))
    return defaults | dict(saved)


# ---------------------------------------------------------------------- schema
def _top_fields() -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(RunConfig) if f.name != "sections"]


def _key(name: str) -> str:
    return name.replace("_", "-")


def _nested_field(owner: type) -> dataclasses.Field[Any]:
    """The field of section ``owner`` that holds one settings object per registry entry
    (``<section>.<entry>.<key>``): its metadata names them, ``{"nested": () -> {name: class}}``."""
    return next(f for f in dataclasses.fields(owner) if "nested" in f.metadata)


def config_schema() -> Schema:
    """Every valid flat key -> (the class that owns it, its field); read from the sections
    registered now, so a section declared later is part of it."""
    schema: Schema = {_key(f.name): (RunConfig, f) for f in _top_fields()}
    entries: Schema = {}
    for section, owner in SECTIONS.items():
        for f in dataclasses.fields(owner):  # type: ignore[arg-type]  # every Section is a dataclass
            if "nested" not in f.metadata:
                schema[f"{section}.{_key(f.name)}"] = (owner, f)
                continue
            for name, sub in f.metadata["nested"]().items():
                for g in dataclasses.fields(sub):
                    entries[f"{section}.{name}.{_key(g.name)}"] = (sub, g)
    return schema | entries


def _convert(key: str, fld: dataclasses.Field[Any], value: object) -> Any:
    """Read one raw run-config value: a comma-separated string for a tuple field, then the
    checks every construction runs (:func:`check_value`)."""
    if isinstance(fld.default, tuple):
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' expects a comma-separated string, got {value!r}")
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return check_value(key, fld, value)


def __getattr__(name: str) -> Any:
    """A section class by its class name (``from fedpeft.config import <its class>``), as
    before each feature declared its own: new code imports it from the feature."""
    for owner in SECTIONS.values():
        if owner.__name__ == name:
            return owner
    raise AttributeError(f"module 'fedpeft.config' has no attribute {name!r}")
