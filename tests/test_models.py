"""Built-in models, inits, freezing and user models by import path."""

from __future__ import annotations

import pytest
import torch

from shoal.config import ModelConfig
from shoal.data.spec import DataSpec
from shoal.errors import ConfigError
from shoal.models import apply_freeze, build_model

IMAGE = DataSpec(task="classification", input_shape=(1, 8, 8), num_classes=10)
LM = DataSpec(task="lm", input_shape=(16,), vocab_size=32, seq_len=16)


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet"])
@pytest.mark.parametrize("norm", ["none", "batch", "layer"])
def test_image_models_give_one_logit_per_class(name, norm):
    model = build_model(ModelConfig(name=name, width=8, depth=2, norm=norm), IMAGE, 10)
    out = model(torch.randn(5, 1, 8, 8))
    assert out.shape == (5, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_transformer_lm_gives_next_token_logits():
    model = build_model(ModelConfig(name="transformer_lm", width=16, depth=2, heads=4), LM, 32)
    out = model(torch.randint(0, 32, (3, 16)))
    assert out.shape == (3, 16, 32)


def test_transformer_is_causal():
    model = build_model(ModelConfig(name="transformer_lm", width=16, depth=1, heads=2), LM, 32).eval()
    x = torch.randint(0, 32, (1, 16))
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % 32
    assert torch.allclose(model(x)[0, :-1], model(y)[0, :-1], atol=1e-6)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "gelu", "tanh", "sigmoid"])
def test_mlp_activations_and_residual(activation):
    model = build_model(ModelConfig(width=16, depth=3, activation=activation, residual=True, dropout=0.1), IMAGE, 10)
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    assert model.layers[1].residual and not model.layers[0].residual  # 64 -> 16 cannot skip


def test_inits_set_the_documented_scale():
    torch.manual_seed(0)
    normal = build_model(ModelConfig(width=256, depth=2, init="normal", init_std=0.01), IMAGE, 10)
    he = build_model(ModelConfig(width=256, depth=2, init="he"), IMAGE, 10)
    w = normal.layers[1].linear.weight
    assert w.std().item() == pytest.approx(0.01, rel=0.05)
    assert he.layers[1].linear.weight.std().item() == pytest.approx((2 / 256) ** 0.5, rel=0.05)
    assert torch.count_nonzero(he.layers[1].linear.bias) == 0


def test_freeze_globs_and_errors():
    model = build_model(ModelConfig(width=8, depth=2), IMAGE, 10)
    assert apply_freeze(model, ["layers.0.*"]) == ["layers.0.linear.weight", "layers.0.linear.bias"]
    with pytest.raises(ConfigError, match="model.freeze: pattern 'nothing.*' matches no parameter"):
        apply_freeze(model, ["nothing.*"])
    with pytest.raises(ConfigError, match="every parameter is frozen"):
        apply_freeze(build_model(ModelConfig(width=8, depth=1), IMAGE, 10), ["*"])


def test_cnn_on_flat_data_is_a_config_error():
    with pytest.raises(ConfigError, match="model.name: cnn needs image-shaped samples"):
        build_model(ModelConfig(name="cnn"), DataSpec(task="classification", input_shape=(32,), num_classes=3), 3)


def test_user_model_by_import_path():
    model = build_model(ModelConfig(target="helpers:failing_mlp", kwargs={"fail_rank": 5}), IMAGE, 10)
    assert model.fail_rank == 5
