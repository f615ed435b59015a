"""Built-in models (mlp, cnn, resnet, transformer_lm) and user models by import path."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from shoal import hf
from shoal.config import ModelConfig
from shoal.data.fields import is_hugging_face_target
from shoal.data.spec import DataSpec
from shoal.errors import ConfigError, ShoalError
from shoal.imports import import_object
from shoal.model_io import bind
from shoal.toolchain import missing

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.01),
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}
# gain names torch.nn.init understands for each activation
_GAIN = {"relu": "relu", "leaky_relu": "leaky_relu", "gelu": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}


def build_model(cfg: ModelConfig, spec: DataSpec, out_features: int) -> nn.Module:
    """The model the config names, sized for the data, with its init applied."""
    if cfg.target:
        return _user_model(cfg, spec)
    if spec.token_ids and spec.task != "lm":
        raise ConfigError(
            f"{cfg.name} does not classify token ids (the data are rows of ids in a vocabulary of "
            f"{spec.vocab_size:,}, padded with id {spec.pad_id}); name a model that embeds them with model.target",
            key="model.name",
        )
    if cfg.name == "mlp":
        model = MLP(math.prod(spec.input_shape), out_features, cfg)
    elif cfg.name == "cnn":
        model = CNN(_image_shape(spec, "cnn"), out_features, cfg)
    elif cfg.name == "resnet":
        model = ResNet(_image_shape(spec, "resnet"), out_features, cfg)
    else:
        model = TransformerLM(spec.vocab_size, spec.seq_len, cfg)
    init_weights(model, cfg)
    return model


def _user_model(cfg: ModelConfig, spec: DataSpec) -> nn.Module:
    """model.target(**model.kwargs), used as it comes (no init applied), its forward taking the batch
    (model.inputs) and giving one tensor (model.output); a Hugging Face model checked against the data."""
    # timm's kwargs before its import: a refused one needs no timm to be said
    kwargs = hf.timm_kwargs(cfg.kwargs, spec) if hf.is_timm_target(cfg.target) else cfg.kwargs
    factory = import_object(cfg.target, "model.target")
    if is_hugging_face_target(cfg.target):
        kwargs = hf.factory_kwargs(factory, kwargs, spec)
    try:
        model = factory(**kwargs)
    except ShoalError:
        raise
    except Exception as e:  # the user's factory: its failure is a config problem, said in one line
        raise ConfigError(f"{cfg.target}(**model.kwargs) raised {type(e).__name__}: {e}", key="model.target") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{cfg.target} returned {type(model).__name__}, not a torch.nn.Module", key="model.target")
    hugging_face = hf.is_model(model)
    if hugging_face:
        hf.check_sizes(model, spec)
    return bind(model, cfg, spec, hugging_face)


def _image_shape(spec: DataSpec, name: str) -> tuple[int, int, int]:
    if len(spec.input_shape) != 3:
        raise ConfigError(
            f"{name} needs image-shaped samples (C, H, W); the data gives {list(spec.input_shape)} "
            "(set data.input_shape: [1, 8, 8] for synthetic data, or use model.name=mlp)",
            key="model.name",
        )
    return spec.input_shape  # type: ignore[return-value]


def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """Apply model.init to every Linear and Conv weight; biases start at zero."""
    if cfg.init == "default":
        return
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            w = module.weight
            if cfg.init == "he":
                gain = "leaky_relu" if cfg.activation == "leaky_relu" else "relu"
                nn.init.kaiming_normal_(w, nonlinearity=gain)
            elif cfg.init == "xavier":
                nn.init.xavier_normal_(w, gain=nn.init.calculate_gain(_GAIN[cfg.activation]))
            else:
                nn.init.normal_(w, 0.0, cfg.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters that train, each tensor once under its first name.

    A tensor owned by two modules (a language model's output projection tied to its token
    embedding) is one parameter: counted once by the optimizer, the decay rule, clipping, the
    health probes and the parameter servers alike. Every place that enumerates parameters uses this.
    """
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def aliases(model: nn.Module) -> dict[str, str]:
    """Other names of shared parameters -> the name `trainable` and the optimizer know them by."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


def apply_freeze(model: nn.Module, patterns: list[str]) -> list[str]:
    """Turn off gradients for parameters matching any glob (by any of their names); returns the frozen names."""
    canonical = {**{n: n for n, _ in model.named_parameters()}, **aliases(model)}
    frozen: list[str] = []
    for pattern in patterns:
        hits = [canonical[n] for n in canonical if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            names = list(canonical)
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ConfigError(f"pattern {pattern!r} matches no parameter (parameters: {shown})", key="model.freeze")
        frozen.extend(h for h in hits if h not in frozen)
    params = dict(model.named_parameters())
    if frozen and len(frozen) == len(params):
        raise ConfigError("every parameter is frozen: nothing would train", key="model.freeze")
    for name in frozen:
        params[name].requires_grad_(False)
    return frozen


def _norm1d(kind: str, width: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm1d(width)
    if kind == "layer":
        return nn.LayerNorm(width)
    return nn.Identity()


class Block(nn.Module):
    """Linear -> norm -> activation -> dropout, with an optional skip connection."""

    def __init__(self, fan_in: int, width: int, cfg: ModelConfig):
        super().__init__()
        self.linear = nn.Linear(fan_in, width)
        self.norm = _norm1d(cfg.norm, width)
        self.act = ACTIVATIONS[cfg.activation]()
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.residual = cfg.residual and fan_in == width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(self.act(self.norm(self.linear(x))))
        return x + y if self.residual else y


class MLP(nn.Module):
    """depth hidden blocks of `width` units, then a linear head."""

    def __init__(self, fan_in: int, out_features: int, cfg: ModelConfig):
        super().__init__()
        widths = [fan_in] + [cfg.width] * cfg.depth
        self.layers = nn.ModuleList(Block(a, b, cfg) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(cfg.width, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _norm2d(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)  # LayerNorm over (C, H, W)
    return nn.Identity()


class CNN(nn.Module):
    """depth conv blocks (3x3 conv, norm, activation, 2x2 pool while the map is >= 4), global pool, head."""

    def __init__(self, shape: tuple[int, int, int], out_features: int, cfg: ModelConfig):
        super().__init__()
        c, h, _ = shape
        blocks: list[nn.Module] = []
        for _ in range(cfg.depth):
            layers = [
                nn.Conv2d(c, cfg.width, 3, padding=1),
                _norm2d(cfg.norm, cfg.width),
                ACTIVATIONS[cfg.activation](),
            ]
            if h >= 4:
                layers.append(nn.MaxPool2d(2))
                h //= 2
            if cfg.dropout:
                layers.append(nn.Dropout(cfg.dropout))
            blocks.append(nn.Sequential(*layers))
            c = cfg.width
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(c, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class BasicBlock(nn.Module):
    """Two 3x3 convs with batch norm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet: stem, three stages of `depth` basic blocks (width, 2x, 4x), global pool, head."""

    def __init__(self, shape: tuple[int, int, int], out_features: int, cfg: ModelConfig):
        super().__init__()
        c, h, _ = shape
        w = cfg.width
        self.stem = nn.Sequential(nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        stages: list[nn.Module] = []
        c_in = w
        for i, c_out in enumerate((w, 2 * w, 4 * w)):
            stride = 2 if i > 0 and h >= 4 else 1
            h = h // stride
            blocks = [BasicBlock(c_in if j == 0 else c_out, c_out, stride if j == 0 else 1) for j in range(cfg.depth)]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c_in, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean(dim=(2, 3)))


class DecoderBlock(nn.Module):
    """Pre-norm causal self-attention and MLP."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(dropout)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.mlp(self.ln2(x)))


class TransformerLM(nn.Module):
    """A small decoder-only language model: token and position embeddings, depth blocks, a head tied to the
    token embedding as GPT-2's is (model.tie_embeddings)."""

    def __init__(self, vocab: int, seq_len: int, cfg: ModelConfig):
        super().__init__()
        self.tok = nn.Embedding(vocab, cfg.width)
        self.pos = nn.Embedding(seq_len, cfg.width)
        self.blocks = nn.ModuleList(DecoderBlock(cfg.width, cfg.heads, cfg.dropout) for _ in range(cfg.depth))
        self.ln = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, vocab, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def blocks(model: nn.Module, patterns: list[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The model's repeated blocks, in order: what fsdp shards as units and activation checkpointing recomputes.

    patterns (fsdp.units): class names or globs over module names. Without them: the built-in
    models' layers and blocks, a Hugging Face model's `_no_split_modules`, or a user model's direct
    children that hold parameters.
    """
    if patterns:
        return _matching(model, patterns)
    if isinstance(model, MLP):
        return [(f"layers.{i}", m) for i, m in enumerate(model.layers)]
    if isinstance(model, CNN):
        return [(f"features.{i}", m) for i, m in enumerate(model.features)]
    if isinstance(model, ResNet):
        return [(f"stages.{i}.{j}", b) for i, stage in enumerate(model.stages) for j, b in enumerate(stage)]
    if isinstance(model, TransformerLM):
        return [(f"blocks.{i}", m) for i, m in enumerate(model.blocks)]
    if getattr(
        model, "_no_split_modules", None
    ):  # a Hugging Face model names its blocks (GPT2Block, LlamaDecoderLayer)
        return _matching(model, list(model._no_split_modules))
    return [(n, m) for n, m in model.named_children() if any(True for _ in m.parameters())]


def _matching(model: nn.Module, patterns: list[str]) -> list[tuple[str, nn.Module]]:
    """The modules whose class name or name matches a pattern of fsdp.units."""
    hits = [
        (n, m)
        for n, m in model.named_modules()
        if n and any(type(m).__name__ == p or fnmatch.fnmatchcase(n, p) for p in patterns)
    ]
    if not hits:
        shown = ", ".join(sorted({type(m).__name__ for _, m in model.named_modules()})[:10])
        raise ConfigError(f"{patterns} match no module (classes here: {shown})", key="fsdp.units")
    return hits


def checkpoint_activations(model: nn.Module, mode: str, every: int, patterns: list[str] | None = None) -> list[str]:
    """train.activation_checkpointing: blocks recompute their activations in backward; returns their names.

    The block's forward is wrapped in place (no wrapper module), so parameter names, checkpoints and
    exports are the same with and without it.
    """
    if mode == "none":
        return []
    chosen = [(n, m) for i, (n, m) in enumerate(blocks(model, patterns)) if mode == "full" or i % every == 0]
    for _, module in chosen:
        module.forward = _recomputed(module.forward)
    return [n for n, _ in chosen]


def _recomputed(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def compile_in_place(model: nn.Module, mode: str | bool, on_cpu: bool, patterns: list[str] | None = None) -> list[str]:
    """train.compile: torch.compile the model's forward (model) or each block's (blocks); returns what was compiled.

    nn.Module.compile() compiles a module's call in place (no OptimizedModule around it), so parameter names,
    checkpoints and exports carry no `_orig_mod.` prefix. A block checkpointed by checkpoint_activations is
    compiled with its recomputation; fsdp shards the compiled blocks afterwards. The graphs are built lazily,
    at the first step (compile_seconds measures it).
    """
    if not mode:
        return []
    problem = missing(on_cpu)
    if problem:
        raise ConfigError(problem, key="train.compile")
    chosen = [("", model)] if mode == "model" else blocks(model, patterns)
    for _, module in chosen:
        module.compile()
    return [n or "model" for n, _ in chosen]


def compile_seconds() -> float | None:
    """Seconds torch.compile has spent in this process so far (TorchDynamo's own timers: the forward graphs and
    the backward's), or None where this torch does not keep them."""
    try:
        from torch._dynamo.utils import calculate_time_spent  # only train.compile jobs ask (a private torch module)

        return round(calculate_time_spent()["total_wall_time"], 3)
    except Exception:  # a torch without these timers: no figure rather than a wrong one
        return None


class Piece:
    """One link of a model's chain, for pipeline splitting: a function of the activation, the modules it
    uses (by the model's own names, so a stage's parameters keep their names) and their parameter count."""

    def __init__(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor], modules: list[str], params: int):
        self.name, self.fn, self.modules, self.params = name, fn, modules, params

    def __repr__(self) -> str:
        return f"Piece({self.name}, {self.params} parameters)"


def pieces(model: nn.Module) -> list[Piece]:
    """The model as a chain of pieces whose composition is its forward: the built-in models, or an
    nn.Sequential (nested Sequentials unrolled). Raises ConfigError for a model whose forward is not a chain."""
    # each function holds the submodules it calls, not the model: a stage keeps only its own layers alive
    if isinstance(model, MLP):
        return _mlp_pieces(model)
    if isinstance(model, TransformerLM):
        return _lm_pieces(model)
    if isinstance(model, (CNN, ResNet)):
        return _conv_pieces(model)
    if isinstance(model, nn.Sequential):
        return [_piece(model, name, m, [name]) for name, m in _sequence(model, "")]
    raise ConfigError(
        f"{type(model).__name__}'s forward is not known to be a chain of its children, so it cannot be split into "
        "pipeline stages by name; make it an nn.Sequential, or give parallel.split_fn",
        key="parallel.pipeline_stages",
    )


def _piece(model: nn.Module, name: str, fn: Callable, modules: list[str]) -> Piece:
    """A piece, its parameters counted in the model (fn must not hold the model)."""
    return Piece(name, fn, modules, sum(p.numel() for n in modules for p in model.get_submodule(n).parameters()))


def _mlp_pieces(model: MLP) -> list[Piece]:
    first, head = model.layers[0], model.head
    return (
        [_piece(model, "layers.0", lambda x: first(x.flatten(1)), ["layers.0"])]
        + [_piece(model, f"layers.{i}", model.layers[i], [f"layers.{i}"]) for i in range(1, len(model.layers))]
        + [_piece(model, "head", head, ["head"])]
    )


def _lm_pieces(model: TransformerLM) -> list[Piece]:
    if model.head.weight is model.tok.weight:
        raise ConfigError(
            "a tied output projection cannot be split from the token embedding across pipeline stages; "
            "set model.tie_embeddings: false",
            key="model.tie_embeddings",
        )
    tok, pos, ln, head = model.tok, model.pos, model.ln, model.head

    def embed(idx: torch.Tensor) -> torch.Tensor:
        return tok(idx) + pos(torch.arange(idx.shape[1], device=idx.device))

    return (
        [_piece(model, "embed", embed, ["tok", "pos"])]
        + [_piece(model, f"blocks.{i}", b, [f"blocks.{i}"]) for i, b in enumerate(model.blocks)]
        + [_piece(model, "head", lambda x: head(ln(x)), ["ln", "head"])]
    )


def _conv_pieces(model: CNN | ResNet) -> list[Piece]:
    head = model.head
    runs = [("stem", model.stem)] if isinstance(model, ResNet) else []
    if isinstance(model, CNN):
        runs += [(f"features.{i}", f) for i, f in enumerate(model.features)]
    else:
        runs += [(f"stages.{i}.{j}", b) for i, stage in enumerate(model.stages) for j, b in enumerate(stage)]
    pooled_head = _piece(model, "head", lambda x: head(x.mean(dim=(2, 3))), ["head"])
    return [_piece(model, n, m, [n]) for n, m in runs] + [pooled_head]


def _sequence(seq: nn.Sequential, prefix: str) -> list[tuple[str, nn.Module]]:
    out = []
    for name, m in seq.named_children():
        full = f"{prefix}{name}"
        out += _sequence(m, full + ".") if isinstance(m, nn.Sequential) else [(full, m)]
    return out
