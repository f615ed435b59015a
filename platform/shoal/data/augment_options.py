"""data.augment's entries, read and checked against the data's shape. No torch: the driver checks them before a
cluster starts (exit 2 naming the entry)."""

from __future__ import annotations

from typing import Any

from shoal.config import DataConfig
from shoal.data.spec import DataSpec
from shoal.errors import ConfigError

IMAGE_OPS = ("crop", "hflip", "rotate", "translate", "color_jitter")
ANY_OPS = ("noise", "erase")
LM_OPS = ("token_mask",)
DEFAULTS: dict[str, dict[str, Any]] = {
    "crop": {"padding": 2},
    "hflip": {"p": 0.5},
    "rotate": {"degrees": 10.0},
    "translate": {"fraction": 0.1},
    "color_jitter": {"brightness": 0.2, "contrast": 0.2, "saturation": 0.0, "hue": 0.0},
    "noise": {"std": 0.1},
    "erase": {"p": 0.5, "scale": [0.02, 0.2]},
    "token_mask": {"p": 0.1, "token": 0},
}


def parse(cfg: DataConfig, spec: DataSpec) -> list[tuple[str, dict[str, Any]]]:
    """(name, options) per data.augment entry, checked against the data's shape (ConfigError names the entry)."""
    image = len(spec.input_shape) == 3
    out = [_entry(entry, f"data.augment[{i}]", spec, image) for i, entry in enumerate(cfg.augment)]
    for key, mix in (("data.mixup", cfg.mixup), ("data.cutmix", cfg.cutmix)):
        if mix is not None and spec.task != "classification":
            raise ConfigError("mixes class targets: classification data only", key=key)
        if mix is not None and spec.token_ids:
            raise ConfigError("mixes inputs, and these are rows of token ids (text classification)", key=key)
    if cfg.cutmix is not None and not image:
        raise ConfigError(
            f"cutmix pastes image boxes: needs [C, H, W] inputs (the data gives {list(spec.input_shape)})",
            key="data.cutmix",
        )
    return out


def _entry(entry: Any, key: str, spec: DataSpec, image: bool) -> tuple[str, dict[str, Any]]:
    """(name, options with the defaults filled in) of one entry, checked."""
    if isinstance(entry, dict):
        if len(entry) != 1:
            raise ConfigError(f"one transform per entry, as {{name: {{options}}}} (got {entry})", key=key)
        name, opts = next(iter(entry.items()))
        opts = dict(opts or {})
    else:
        name, opts = entry, {}
    if ":" in name:
        return name, {}
    if name not in DEFAULTS:
        allowed = ", ".join([*DEFAULTS, "package.module:fn"])
        raise ConfigError(f"unknown transform {name!r}; one of {allowed}", key=key)
    unknown = set(opts) - set(DEFAULTS[name]) - ({"size"} if name == "crop" else set())
    if unknown:
        raise ConfigError(f"{name}: unknown option(s) {sorted(unknown)}; it takes {sorted(DEFAULTS[name])}", key=key)
    opts = {**DEFAULTS[name], **opts}
    _check_fits(name, opts, key, spec, image)
    return name, opts


def _check_fits(name: str, opts: dict[str, Any], key: str, spec: DataSpec, image: bool) -> None:
    """The transform suits the data's task and shape; crop's size is filled in."""
    if spec.token_ids and spec.task != "lm":
        raise ConfigError(
            f"{name}: the inputs are rows of token ids (text classification), which no transform takes", key=key
        )
    if spec.task == "lm" and name not in LM_OPS:
        raise ConfigError(f"{name} transforms inputs, and lm inputs are token ids; use token_mask", key=key)
    if name in LM_OPS and spec.task != "lm":
        raise ConfigError(f"{name} is for lm data (token ids)", key=key)
    if name in IMAGE_OPS and not image:
        raise ConfigError(
            f"{name} needs image inputs [C, H, W]; the data gives {list(spec.input_shape)} (noise and erase work "
            "on any input)",
            key=key,
        )
    if name == "crop":
        opts["size"] = _crop_size(opts, key, spec)
    if name == "color_jitter" and (opts["saturation"] or opts["hue"]) and spec.input_shape[0] != 3:
        raise ConfigError("color_jitter: saturation and hue need 3 colour channels", key=key)


def _crop_size(opts: dict[str, Any], key: str, spec: DataSpec) -> list[int]:
    """crop's size: the image's own, as a crop must keep the input shape."""
    size = list(opts.get("size") or spec.input_shape[1:])
    if size[0] > spec.input_shape[1] + 2 * opts["padding"] or size[1] > spec.input_shape[2] + 2 * opts["padding"]:
        raise ConfigError(
            f"crop: size {size} is larger than the padded image {list(spec.input_shape[1:])} + 2 x {opts['padding']}",
            key=key,
        )
    if size != list(spec.input_shape[1:]):
        raise ConfigError(f"crop: size {size} would change the input shape {list(spec.input_shape)}", key=key)
    return size
