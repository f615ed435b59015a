"""int8 quantisation through torchao, PyTorch's maintained quantisation library (torch.ao.quantization is
deprecated in its favour): `dynamic` quantises Linear weights to int8 and each batch's activations on the
fly; `weight_only` keeps activations in float. Both need no calibration data."""

from __future__ import annotations

from torch import nn

from shoal.errors import ShoalError

KINDS = ("dynamic", "weight_only")


def quantize(model: nn.Module, kind: str) -> nn.Module:
    """Quantise the model's Linear layers in place (and return it)."""
    if kind not in KINDS:
        raise ShoalError(f"--quantize: {kind!r} is not one of {', '.join(KINDS)}")
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise ShoalError(f"--quantize {kind}: the model has no Linear layers for int8 quantisation to take")
    try:
        import torchao.quantization as tq
    except ImportError:
        raise ShoalError("--quantize needs torchao: pip install 'shoal[compress]'") from None
    config = tq.Int8DynamicActivationInt8WeightConfig() if kind == "dynamic" else tq.Int8WeightOnlyConfig()
    tq.quantize_(model, config, filter_fn=lambda m, _: isinstance(m, nn.Linear) and m.weight.shape[0] > 1)
    return model
