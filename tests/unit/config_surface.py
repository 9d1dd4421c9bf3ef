"""What a user sees of the run config: every key, its default, and the error each bad input gets.

Restructuring where settings live (which module declares a key, which one checks a rule
across features) must not change any of this.  :func:`surface` computes it from the live
code; ``tests/unit/data/config_surface.json`` holds the copy taken before the last
restructuring, and ``tests/unit/test_config_surface.py`` compares the two.  Regenerate the
copy only for a deliberate change to what users see::

    .venv/bin/python -m tests.unit.config_surface --write

It runs in a fresh interpreter (``--print``) so that toy extensions the tests register do
not leak into the registries' choice lists.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

GOLDEN = Path(__file__).parent / "data" / "config_surface.json"

# Configs that break one rule spanning several settings or features each.
RULES: dict[str, dict[str, Any]] = {
    "min-train-clients above num-clients": {"num-clients": 2, "min-train-clients": 3},
    "failures with a long round-timeout": {"failures.hang-probability": 0.1},
    "failure probabilities over 1": {
        "failures.raise-probability": 0.6,
        "failures.drop-probability": 0.6,
        "round-timeout": 60.0,
    },
    "lora.ranks without lora": {"peft.method": "bias", "lora.ranks": "4,8"},
    "ffa-lora without lora": {"peft.method": "bias", "strategy.name": "ffa-lora"},
    "lora.ranks unreadable": {"lora.ranks": "four"},
    "lora.ranks mixed": {"lora.ranks": "4,8:0.5"},
    "lora.ranks not summing to 1": {"lora.ranks": "4:0.5,8:0.2"},
    "lora.ranks below 1": {"lora.ranks": "0"},
    "lora.target-modules empty": {"lora.target-modules": ""},
    "packing outside causal-lm": {"lm.packing": True},
    "packing with prompt tuning": {"lm.packing": True, "task.name": "causal-lm", "peft.method": "prompt"},
    "packing with local DP": {"lm.packing": True, "task.name": "causal-lm", "dp.mode": "local"},
    "central settings without central DP": {"dp.central-target-epsilon": 4.0},
    "tree with poisson sampling": {
        "dp.mode": "central",
        "dp.central-mechanism": "tree",
        "client-sampling": "poisson",
    },
    "tree with adaptive clipping": {
        "dp.mode": "central",
        "dp.central-mechanism": "tree",
        "dp.central-clipping": "adaptive",
    },
    "tree with another strategy": {
        "dp.mode": "central",
        "dp.central-mechanism": "tree",
        "strategy.name": "fedprox",
        "fraction-train": 0.2,
    },
    "tree with too few clients": {"dp.mode": "central", "dp.central-mechanism": "tree", "num-rounds": 5},
    "natural partitioner without a column": {"data.partitioner": "natural"},
    "step-search unreadable": {"server.step-search": "one,two"},
    "step-search not positive": {"server.step-search": "1,-2"},
    "device unknown": {"device": "tpu"},
    "strategy kwargs malformed": {"strategy.kwargs": "proximal_mu"},
    "unknown key": {"trian.learning-rate": 0.1},
    "unknown nested codec key": {"codec.compeft.dnsity": 0.1},
}


# Configs whose settings imply others (the flat config each one resolves to, where it differs).
IMPLIED: dict[str, dict[str, Any]] = {
    "ffa-lora freezes A": {"strategy.name": "ffa-lora"},
    "a codec's own setting": {"codec.name": "compeft", "codec.compeft.positions": "rice"},
}


def _bad_values(default: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """Inputs that one key's own checks refuse, by kind of check."""
    if isinstance(default, bool):
        return {"type": "yes"}
    if isinstance(default, tuple):
        return {"type": 3}
    if isinstance(default, (int, float)):
        out: dict[str, Any] = {"type": "many"}
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None:
            out["below"] = lo if meta.get("lo_open") else lo - 1
        if hi is not None:
            out["above"] = hi + 1
        return out
    if "choices" in meta or "registry" in meta:
        return {"type": 3, "choice": "not-a-choice"}
    return {"type": 3}


def _error(raw: dict[str, Any]) -> str:
    from fedpeft.config import ConfigError, RunConfig

    try:
        RunConfig.from_run_config(raw)
    except ConfigError as err:
        return str(err)
    return "<accepted>"


def surface() -> dict[str, Any]:
    """Every key with its default and its bad inputs' errors, and every cross-feature rule's error."""
    from fedpeft.config import RunConfig, config_schema

    defaults = RunConfig().to_run_config()
    keys: dict[str, Any] = {}
    for key, (_owner, fld) in sorted(config_schema().items()):
        bad = _bad_values(fld.default, dict(fld.metadata))
        keys[key] = {
            "default": defaults[key],
            "errors": {kind: _error({key: value}) for kind, value in bad.items()},
        }
    rules = {name: _error(raw) for name, raw in RULES.items()}
    implied = {}
    for name, raw in IMPLIED.items():
        resolved = RunConfig.from_run_config(raw).to_run_config()
        implied[name] = {k: v for k, v in resolved.items() if v != defaults[k]}
    return {"keys": keys, "rules": rules, "implied": implied}


def fresh_surface() -> dict[str, Any]:
    """:func:`surface` computed in a new interpreter (registries as the package alone fills them)."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.unit.config_surface", "--print"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def main(argv: list[str]) -> None:
    if "--print" in argv:
        print(json.dumps(surface(), default=str, sort_keys=True))
    elif "--write" in argv:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(fresh_surface(), indent=1, sort_keys=True) + "\n")
        print(f"wrote {GOLDEN}")
    else:
        raise SystemExit("usage: python -m tests.unit.config_surface --write | --print")


if __name__ == "__main__":
    main(sys.argv[1:])
