"""Visual prompt tuning and the vision-transformer plumbing, on the packaged DINOv2-S/14 and a
tiny ViT saved from a config (the same code path as any hub ViT / DeiT)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

from fedpeft.config import RunConfig
from fedpeft.models import build_model
from fedpeft.models.vision import vision_parts
from fedpeft.tasks import build_task
from fedpeft.training import train_local
from tests.conftest import TINY_VISION

TASK = build_task("image-classification")


def _cfg(**overrides) -> RunConfig:
    return RunConfig.from_run_config(TINY_VISION | overrides)


@pytest.fixture(scope="module")
def images() -> dict[str, torch.Tensor]:
    cfg = _cfg()
    batch = next(iter(TASK.client_train_set(cfg, 0, 3).batches(torch.arange(3), 3, torch.device("cpu"))))
    return batch[0]


def _original(module: torch.nn.Module):
    """The forward of the class a VPT subclass wraps (its second base)."""
    cls = type(module)
    return cls.__bases__[1].forward if len(cls.__bases__) == 2 else cls.forward


def _by_hand(model, pixel_values: torch.Tensor, deep: bool) -> torch.Tensor:
    """VPT written out step by step over the model's own parts (Jia et al., 2022, eq. 1-2)."""
    parts = vision_parts(model)
    h = parts.embeddings(pixel_values)
    batch = h.shape[0]
    for i, layer in enumerate(parts.layers):
        if i == 0 or deep:
            prompts = layer.vpt.weight.unsqueeze(0).expand(batch, -1, -1)
            tokens = prompts.shape[1]
            h = torch.cat([h[:, :1], prompts, h[:, 1:] if i == 0 else h[:, 1 + tokens :]], dim=1)
        h = _original(layer)(layer, h)
    h = _original(parts.final_norm)(parts.final_norm, h)
    h = torch.cat([h[:, :1], h[:, 1 + tokens :]], dim=1)
    return model.classifier(torch.cat([h[:, 0], h[:, 1:].mean(dim=1)], dim=1))


@pytest.mark.parametrize("depth", ["shallow", "deep"])
def test_vpt_is_prompts_after_the_class_token_dropped_before_the_head(depth, images):
    model = build_model(
        _cfg(**{"peft.method": "vpt", "vpt.depth": depth, "vpt.num-tokens": 3}), 10, kind=TASK.model_kind
    )
    layers = 12 if depth == "deep" else 1
    assert model.num_trainable == layers * 3 * 384 + 768 * 10 + 10
    assert sorted(k for k in model.params if "vpt" in k) == sorted(
        f"dinov2.encoder.layer.{i}.vpt.weight" for i in range(layers)
    )
    seen: list[int] = []
    parts = vision_parts(model.module)
    hook = parts.layers[5].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    model.module.eval()
    with torch.no_grad():
        out = model.module(**images).logits
        expected = _by_hand(model.module, images["pixel_values"], deep=depth == "deep")
    hook.remove()
    assert seen == [1 + 3 + 4]  # class token, 3 prompts, a 2 x 2 patch grid
    assert torch.allclose(out, expected, atol=1e-5)
    # The prompts do reach the output: other prompts, other logits.  (Not a constant shift:
    # the blocks' layer norms remove that.)
    with torch.no_grad():
        shift = torch.randn(parts.layers[0].vpt.weight.shape, generator=torch.Generator().manual_seed(0))
        parts.layers[0].vpt.weight.add_(shift)
        assert not torch.allclose(model.module(**images).logits, out, atol=1e-3)
        parts.layers[0].vpt.weight.sub_(shift)


def test_prompts_are_looked_up_once_per_example(images):
    """One lookup row per example: what Opacus' embedding hooks need for per-sample gradients."""
    model = build_model(_cfg(**{"peft.method": "vpt"}), 10, kind=TASK.model_kind)
    table = vision_parts(model.module).layers[0].vpt
    ids: list[torch.Tensor] = []
    hook = table.register_forward_pre_hook(lambda m, args: ids.append(args[0]))
    with torch.no_grad():
        model.module(**images)
    hook.remove()
    assert ids[0].shape == (3, 10) and ids[0].is_contiguous()


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> str:
    """A ViT saved as a hub model would be: config, weights, image processor (32 px, patch 8)."""
    path = tmp_path_factory.mktemp("vit")
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize(
    ("method", "extra"),
    [("lora", {}), ("adapter", {}), ("bitfit", {}), ("vpt", {"vpt.depth": "deep"}), ("full", {})],
)
def test_any_vit_from_a_folder_trains_at_another_image_size(tiny_vit, method, extra):
    """A ViT pretrained at 32 px runs at 16 px (its position embeddings interpolated) with
    every vision method; only the method's tensors and the head train."""
    cfg = _cfg(**{"model.name": tiny_vit, "model.image-size": 16, "peft.method": method} | extra)
    model = build_model(cfg, 10, kind=TASK.model_kind)
    data = TASK.client_train_set(cfg, 0, 3)
    assert data.images.shape[-2:] == (16, 16)
    before = model.exchange_state()
    result = train_local(model, data, dataclasses.replace(cfg.train, max_steps=2), seed=0, task=TASK)
    assert result.steps == 2
    after = model.exchange_state()
    assert {"classifier.weight", "classifier.bias"} <= set(after)
    assert any(not torch.equal(torch.as_tensor(before[k]), torch.as_tensor(after[k])) for k in before)
    if method == "lora":
        assert all(("q_proj" in k or "v_proj" in k) for k in model.params if "lora_" in k)
