"""Hugging Face transformers and timm models as model.target: built from a config mapping or a local directory,
sized against the data. The only module that knows these libraries' conventions (it imports neither: the
user's target does, in the ranks).

`transformers:AutoModelForCausalLM.from_config` (or a model class such as `transformers:GPT2LMHeadModel`)
takes `config` in model.kwargs as a mapping: `model_type` and the config class's fields; Shoal makes the
config object. `from_pretrained` reads a local directory only (nothing is downloaded here or in the ranks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from shoal.data.spec import DataSpec
from shoal.errors import ConfigError

CONFIG = "config"
PATH = "pretrained_model_name_or_path"


def is_model(model: nn.Module) -> bool:
    """A Hugging Face PreTrainedModel (it has a config and takes named inputs)."""
    return type(model).__module__.startswith("transformers.") and hasattr(model, "config")


def factory_kwargs(factory: Any, kwargs: dict[str, Any], spec: DataSpec) -> dict[str, Any]:
    """model.kwargs as the factory takes them: a config mapping made a config object (its vocab_size and
    num_labels, where not given, the data's), a local path checked."""
    kwargs = dict(kwargs)
    if isinstance(kwargs.get(CONFIG), dict):
        kwargs[CONFIG] = _config(factory, {**_sized(spec), **kwargs[CONFIG]})
    if getattr(factory, "__name__", "") == "from_pretrained":
        path = kwargs.get(PATH)
        if not isinstance(path, str) or not Path(path).expanduser().is_dir():
            raise ConfigError(
                f"{PATH}: {path!r} is not a local directory (a save_pretrained or `shoal export --format "
                "hugging_face` directory; nothing is downloaded)",
                key=f"model.kwargs.{PATH}",
            )
        kwargs[PATH] = str(Path(path).expanduser())
        kwargs.setdefault("local_files_only", True)
    return kwargs


def is_timm_target(target: str | None) -> bool:
    return bool(target) and target.split(":")[0].split(".")[0] == "timm"


def timm_kwargs(kwargs: dict[str, Any], spec: DataSpec) -> dict[str, Any]:
    """timm.create_model's kwargs: the data's channels and classes where not given; never pretrained weights
    (nothing is downloaded: start from a state dict file with model.weights)."""
    if kwargs.get("pretrained"):
        raise ConfigError(
            "true would download weights; set pretrained: false and give a state dict file as model.weights",
            key="model.kwargs.pretrained",
        )
    sized = {"in_chans": spec.input_shape[0]} if len(spec.input_shape) == 3 else {}
    if spec.task == "classification":
        sized["num_classes"] = spec.num_classes
    return {**sized, **kwargs, "pretrained": False}


def _sized(spec: DataSpec) -> dict[str, int]:
    """The sizes the data gives a model config."""
    sizes = {"vocab_size": spec.vocab_size} if spec.vocab_size else {}
    return {**sizes, "num_labels": spec.num_classes} if spec.task == "classification" else sizes


def _config(factory: Any, fields: dict[str, Any]) -> Any:
    """The config object a mapping describes, of the class the factory's model uses."""
    owner = getattr(factory, "__self__", factory)  # a classmethod's class, or the class itself
    model_type = fields.pop("model_type", None)
    fields.setdefault("use_cache", False)  # training: no key/value cache to build and return
    make = _config_maker(owner, model_type)
    return make(**_token_ids_in_vocabulary(make(), fields))


def _config_maker(owner: Any, model_type: str | None) -> Any:
    """The config class the factory's model takes (for an Auto class: the model_type's)."""
    config_class = getattr(owner, "config_class", None)
    if config_class is not None:
        return config_class
    if model_type is None:
        raise ConfigError(
            f"config needs model_type for {getattr(owner, '__name__', owner)} (e.g. gpt2, bert, llama)",
            key="model.kwargs.config",
        )
    from transformers import AutoConfig  # the target is a transformers Auto class: the package is there

    def make(**fields: Any) -> Any:
        try:
            return AutoConfig.for_model(model_type, **fields)
        except ValueError as e:
            raise ConfigError(f"model_type {model_type!r}: {e}", key="model.kwargs.config") from None

    return make


def _token_ids_in_vocabulary(defaults: Any, fields: dict[str, Any]) -> dict[str, Any]:
    """Special token ids the mapping leaves at defaults past its vocabulary (GPT-2's 50256 for a vocabulary of
    300) set to None: they name no token of this data (transformers would warn at every build)."""
    vocab = fields.get("vocab_size", getattr(defaults, "vocab_size", None))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        default = getattr(defaults, key, None)
        if key not in fields and isinstance(default, int) and vocab is not None and default >= vocab:
            fields[key] = None
    return fields


def check_sizes(model: nn.Module, spec: DataSpec) -> None:
    """The model's vocabulary, classes and positions against the data's."""
    config = model.config
    # a language model's logits must be the vocabulary; an encoder may hold more ids than the data uses
    too_few = config.vocab_size != spec.vocab_size if spec.task == "lm" else config.vocab_size < spec.vocab_size
    if spec.vocab_size and too_few:
        _mismatch("vocab_size", config.vocab_size, f"the data's vocab_size={spec.vocab_size}", spec.vocab_size)
    if spec.task == "classification" and config.num_labels != spec.num_classes:
        _mismatch("num_labels", config.num_labels, f"the data's {spec.num_classes} classes", spec.num_classes)
    positions = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions") if hasattr(config, k)), 0)
    length = spec.input_shape[0] if spec.vocab_size and spec.input_shape else 0
    if positions and length > positions:
        raise ConfigError(
            f"max_position_embeddings: the model has {positions} positions but the data's samples are {length} "
            "tokens long; raise it or shard with a shorter --seq-len",
            key="model.kwargs.config",
        )


def _mismatch(name: str, got: int, data: str, want: int) -> None:
    raise ConfigError(f"the model has {got} but {data}; set it to {want}", key=f"model.kwargs.config.{name}")
