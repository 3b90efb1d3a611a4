"""The ZeTT hypernetwork: a new tokenizer's tokens in, the embeddings a frozen LM needs out.

Each new token arrives as its decomposition into at most ``max_pieces`` base-tokenizer pieces
(``jaxtok.transfer.decompose``). The hypernetwork (Minixhofer et al., "Zero-Shot Tokenizer
Transfer", 2024; the residual form from tokenkit):

1. looks up the pieces' frozen base embeddings, input and output concatenated when the base LM
   does not tie them: (N, P, D) or (N, P, 2D);
2. standardises them per dimension with the base vocabulary's mean/std, then applies a learned
   affine scaler (scale 1, shift 0 at init);
3. projects to ``d_model``, adds a learned position embedding, runs ``n_layers`` bidirectional
   pre-norm transformer layers over the P pieces (padding masked), takes position 0;
4. one zero-initialised head per predicted matrix gives a delta, rescaled per dimension by the
   base embeddings' std (scale only, no shift), added to the first piece's embedding
   (``residual``) or, without the residual, to the base mean.

So at init the prediction *is* the first piece's embedding (exactly, with ``residual``), and the
network only learns the correction. Everything is a pure flax module: parameters are a pytree,
the base matrices and their statistics come in as arguments.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxtok.nn.attention import dot_product_attention
from jaxtok.nn.layers import DenseGeneral, LayerNorm, param_with_axes
from jaxtok.sharding import constrain

Matrices = dict[str, jax.Array]
ROLES = ("input", "output")


@dataclasses.dataclass(frozen=True)
class HypernetConfig:
    """Every architectural choice of the hypernetwork.

    Attributes:
      embed_dim: the base LM's embedding width D (0 in a preset: taken from the base LM, see
        :func:`for_base`).
      tied: the base LM ties input and output embeddings (one matrix in, one predicted).
      max_pieces: P, pieces per token seen (longer decompositions are cut).
      d_model, n_layers, n_heads, d_ff: the encoder (d_ff None: 2 * d_model, as ZeTT).
      residual: prediction = first piece + delta (tokenkit) instead of mean + delta.
      chunk: new tokens per ``lax.map`` step in :func:`predict` (memory O(chunk * P * d_model)).
      dtype, param_dtype: compute and storage dtypes.
    """

    embed_dim: int
    tied: bool = True
    max_pieces: int = 7
    d_model: int = 256
    n_layers: int = 3
    n_heads: int = 4
    d_ff: int | None = None
    residual: bool = True
    chunk: int = 1024
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")
        for name in ("max_pieces", "d_model", "n_heads", "chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_layers < 0 or self.embed_dim < 0:
            raise ValueError(f"n_layers and embed_dim must be >= 0, got {self.n_layers}, {self.embed_dim}")

    @property
    def roles(self) -> tuple[str, ...]:
        return ROLES[:1] if self.tied else ROLES

    @property
    def ff(self) -> int:
        return 2 * self.d_model if self.d_ff is None else self.d_ff


def for_base(config: HypernetConfig, tables: Mapping[str, jax.Array]) -> HypernetConfig:
    """``config`` fitted to a base LM's embedding matrices ({"input"[, "output"]}): width and
    tying from the base; a config that names another width is an error."""
    d = int(tables["input"].shape[1])
    if config.embed_dim not in (0, d):
        raise ValueError(f"hypernetwork predicts {config.embed_dim}-dim embeddings, the base LM has {d}")
    return dataclasses.replace(config, embed_dim=d, tied="output" not in tables)


def embedding_stats(base: Mapping[str, jax.Array]) -> Matrices:
    """Per-dimension mean and std of each base matrix (``{role}_mean``, ``{role}_std``): fitted
    once from the base vocabulary, passed to every call."""
    stats = {}
    for role, table in base.items():
        table = jnp.asarray(table, jnp.float32)
        stats[f"{role}_mean"] = table.mean(axis=0)
        stats[f"{role}_std"] = jnp.maximum(table.std(axis=0), 1e-6)
    return stats


class EncoderLayer(nn.Module):
    config: HypernetConfig

    @nn.compact
    def __call__(self, x, segment_ids, positions):
        cfg = self.config
        dense = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        head_dim = cfg.d_model // cfg.n_heads
        h = LayerNorm(1e-5, name="attn_norm", **dense)(x)
        qkv = [DenseGeneral((cfg.d_model, cfg.n_heads, head_dim), ("embed", "heads", "head_dim"),
                            "btd,dhk->bthk", name=name, **dense)(h) for name in ("q", "k", "v")]
        out = dot_product_attention(*qkv, q_positions=positions, k_positions=positions,
                                    q_segment_ids=segment_ids, k_segment_ids=segment_ids, causal=False)
        x = x + DenseGeneral((cfg.n_heads, head_dim, cfg.d_model), ("heads", "head_dim", "embed"),
                             "bthk,hkd->btd", name="o", **dense)(out)
        h = LayerNorm(1e-5, name="mlp_norm", **dense)(x)
        h = DenseGeneral((cfg.d_model, cfg.ff), ("embed", "mlp"), "btd,df->btf", use_bias=True,
                         bias_axes=("mlp",), name="up", **dense)(h)
        h = nn.gelu(h.astype(jnp.float32)).astype(x.dtype)
        return x + DenseGeneral((cfg.ff, cfg.d_model), ("mlp", "embed"), "btf,fd->btd", use_bias=True,
                                bias_axes=("embed",), name="down", **dense)(h)


class Hypernet(nn.Module):
    """``(pieces (N, P), mask (N, P), base matrices, stats) -> {"input": (N, D)[, "output"]}``."""

    config: HypernetConfig

    @nn.compact
    def __call__(self, pieces: jax.Array, mask: jax.Array, base: Mapping[str, jax.Array],
                 stats: Mapping[str, jax.Array]) -> Matrices:
        cfg = self.config
        pieces, mask = pieces[:, :cfg.max_pieces], mask[:, :cfg.max_pieces]
        n, p = pieces.shape
        looked_up = {role: jnp.take(base[role], pieces, axis=0).astype(jnp.float32) for role in cfg.roles}
        x = jnp.concatenate([(looked_up[r] - stats[f"{r}_mean"]) / stats[f"{r}_std"] for r in cfg.roles], -1)
        width = x.shape[-1]
        scale = param_with_axes(self, "input_scale", nn.initializers.ones, (width,), ("norm",), cfg.param_dtype)
        shift = param_with_axes(self, "input_shift", nn.initializers.zeros, (width,), ("norm",), cfg.param_dtype)
        x = (x * scale + shift).astype(cfg.dtype)
        x = DenseGeneral((width, cfg.d_model), (None, "embed"), "btd,de->bte", use_bias=True,
                         bias_axes=("embed",), name="in_proj", dtype=cfg.dtype, param_dtype=cfg.param_dtype)(x)
        pos = param_with_axes(self, "positions", nn.initializers.normal(0.02), (cfg.max_pieces, cfg.d_model),
                              ("pos", "embed"), cfg.param_dtype)
        x = constrain(x + pos[:p].astype(cfg.dtype), ("batch", "length", "embed"))
        segment_ids = mask.astype(jnp.int32)  # 0 = padding piece, never attended to
        positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (n, p))
        for i in range(cfg.n_layers):
            x = EncoderLayer(cfg, name=f"layer_{i}")(x, segment_ids, positions)
        pooled = LayerNorm(1e-5, name="final_norm", dtype=jnp.float32, param_dtype=cfg.param_dtype)(x[:, 0])
        out = {}
        for role in cfg.roles:
            delta = DenseGeneral((cfg.d_model, cfg.embed_dim), ("embed", None), "bd,de->be", use_bias=True,
                                 bias_axes=(None,), init_std=0.0, name=f"{role}_head", dtype=jnp.float32,
                                 param_dtype=cfg.param_dtype)(pooled)
            anchor = looked_up[role][:, 0] if cfg.residual else jnp.broadcast_to(stats[f"{role}_mean"], delta.shape)
            out[role] = anchor + delta * stats[f"{role}_std"]
        return out


def init_params(config: HypernetConfig, rng: jax.Array) -> dict:
    """Boxed parameters (logical axis names) of a hypernetwork for ``config``."""
    d = config.embed_dim
    base = {role: jnp.zeros((8, d), jnp.float32) for role in config.roles}
    stats = embedding_stats({role: jnp.eye(8, d) for role in config.roles})  # shapes only matter
    pieces = jnp.zeros((2, config.max_pieces), jnp.int32)
    return Hypernet(config).init(rng, pieces, pieces > -1, base, stats)["params"]


def predict(config: HypernetConfig, params, pieces: jax.Array, mask: jax.Array,
            base: Mapping[str, jax.Array], stats: Mapping[str, jax.Array], *,
            order: jax.Array | None = None, short: tuple[int, int] | None = None) -> Matrices:
    """The hypernetwork over a whole vocabulary in chunks of ``config.chunk`` tokens (``lax.map``,
    so it runs inside jit and differentiates); rows come back in order.

    Length buckets: with ``order`` (a permutation of the rows, fewest pieces first) and
    ``short = (rows, width)``, the first ``rows`` tokens of that order run with only ``width``
    piece slots and the rest with ``max_pieces``: most tokens have 1-3 pieces, so this saves
    about a third of the work of padding every token to ``max_pieces``. A token of the short
    bucket with more pieces is cut to ``width`` (the caller sizes the buckets to avoid it).
    """
    pieces, mask = pieces[:, :config.max_pieces], mask[:, :config.max_pieces]
    if order is None or short is None:
        out = _predict_rows(config, params, pieces, mask, base, stats)
    else:
        rows, width = short
        pieces, mask = jnp.take(pieces, order, axis=0), jnp.take(mask, order, axis=0)
        head = _predict_rows(config, params, pieces[:rows, :width], mask[:rows, :width], base, stats)
        tail = _predict_rows(config, params, pieces[rows:], mask[rows:], base, stats)
        out = {role: jnp.zeros((pieces.shape[0], head[role].shape[1]), head[role].dtype).at[order].set(
            jnp.concatenate([head[role], tail[role]])) for role in head}
    return {role: constrain(m, ("vocab", "embed")) for role, m in out.items()}


def _predict_rows(config, params, pieces, mask, base, stats) -> Matrices:
    model = Hypernet(config)
    n = pieces.shape[0]
    chunk = max(1, min(config.chunk, n))
    padded = -(-n // chunk) * chunk
    pad = [(0, padded - n), (0, 0)]
    blocks = (jnp.pad(pieces, pad).reshape(-1, chunk, pieces.shape[1]),
              jnp.pad(mask, pad).reshape(-1, chunk, mask.shape[1]))
    out = jax.lax.map(lambda b: model.apply({"params": params}, b[0], b[1], base, stats), blocks)
    return {role: m.reshape(padded, -1)[:n] for role, m in out.items()}


# ---------------------------------------------------------------------------------------------
# Weights on disk: a folder with config.json and model.safetensors (bf16)

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def _flat(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(_flat(value, name + "/") if isinstance(value, Mapping) else {name: value})
    return out


def _nested(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def save_hypernet(directory, config: HypernetConfig, params, metadata: Mapping[str, Any] | None = None,
                  *, dtype: str = "bfloat16", overwrite: bool = False):
    """Writes ``directory`` (config.json + model.safetensors in ``dtype``) through a temporary
    folder renamed at the end: an interrupted save leaves any earlier folder intact."""
    import json
    import shutil
    import tempfile
    from pathlib import Path

    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} is not empty; pass overwrite=True to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    store = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    tensors = {k: np.ascontiguousarray(np.asarray(v, np.float32).astype(store))
               for k, v in _flat(nn.unbox(params)).items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(
            {"hypernet": dataclasses.asdict(config), "dtype": dtype, **(metadata or {})}, indent=1, default=str))
        tmp.chmod(0o755)  # mkdtemp's 0700 would make shipped package data unreadable to other users
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            (tmp / name).chmod(0o644)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old)
        else:
            tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_hypernet(directory) -> tuple[HypernetConfig, dict, dict]:
    """(config, float32 params, metadata) of a folder written by :func:`save_hypernet`; a missing
    or malformed file, or weights that do not fit the config, are errors naming the file."""
    import json
    from pathlib import Path

    import numpy as np
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found: not a hypernetwork folder")
    try:
        meta = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        config = HypernetConfig(**meta["hypernet"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{directory / CONFIG_FILE} is not a hypernetwork config: {err}") from None
    try:
        flat = load_file(str(directory / WEIGHTS_FILE))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{directory / WEIGHTS_FILE} is not a readable safetensors file: {err}") from None
    params = _nested({k: np.asarray(v, np.float32) for k, v in flat.items()})
    expected = nn.unbox(jax.eval_shape(lambda: init_params(config, jax.random.key(0))))
    want = {k: v.shape for k, v in _flat(expected).items()}
    got = {k: v.shape for k, v in _flat(params).items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:4]
        raise ValueError(f"{directory / WEIGHTS_FILE} does not fit its config (first differences: {diff})")
    return config, params, meta


# ---------------------------------------------------------------------------------------------
# As a transfer method (``jaxtok transfer --method hypernet``)

SHIPPED = "hypernets"  # package data folder: jaxtok/hypernets/<base model name>/


def shipped_hypernet(base_name: str):
    """The folder of the hypernetwork shipped with jaxtok for ``base_name`` (None if none)."""
    from importlib import resources

    folder = resources.files("jaxtok").joinpath(SHIPPED, base_name)
    return folder if folder.joinpath(CONFIG_FILE).is_file() else None


@dataclasses.dataclass(frozen=True)
class HypernetOptions:
    """path: a hypernetwork folder (default: the one shipped for the base model).
    copy_overlap: tokens whose surface is exactly a base token take that token's rows instead of
    the prediction (as FVT does); off by default, as in ZeTT, where every token is predicted."""

    path: str = ""
    copy_overlap: bool = False


def hypernet_prepare(ctx, dec, options: HypernetOptions) -> dict:
    from jaxtok.transfer.decompose import TransferError

    if "hypernet" in ctx.aux:
        return {"hypernet": ctx.aux["hypernet"]}
    base_name = ctx.base_name or ""
    folder = options.path or shipped_hypernet(base_name)
    if not folder:
        raise TransferError(f"no hypernetwork shipped for {base_name or 'this model'}: pass --option "
                            "path=FOLDER (a folder written by `jaxtok train-hypernet`)")
    config, params, _ = load_hypernet(folder)
    return {"hypernet": (config, params)}


def hypernet_apply(base: Mapping[str, jax.Array], dec, aux: Mapping, options: HypernetOptions) -> Matrices:
    """Zero-Shot Tokenizer Transfer (Minixhofer et al., 2024): every new token's embeddings
    predicted from its base pieces' embeddings by the trained hypernetwork (module docstring);
    special tokens mapped by role are copied from the base (and, with ``copy_overlap``, the exact
    overlap too)."""
    from jaxtok.transfer.decompose import TransferError

    config, params = aux["hypernet"]
    if config.embed_dim != base["input"].shape[1] or config.tied != ("output" not in base):
        raise TransferError(f"the hypernetwork was trained for {config.embed_dim}-dim embeddings "
                            f"({'tied' if config.tied else 'untied'}); this model has {base['input'].shape[1]} "
                            f"({'untied' if 'output' in base else 'tied'})")
    tables = {role: jnp.asarray(base[role], jnp.float32) for role in config.roles}
    pieces = np.zeros((dec.num_new, config.max_pieces), np.int32)
    mask = np.zeros((dec.num_new, config.max_pieces), bool)
    width = min(config.max_pieces, dec.pieces.shape[1])
    pieces[:, :width], mask[:, :width] = dec.pieces[:, :width], dec.mask[:, :width]
    out = jax.jit(lambda p, pc, m, t: predict(config, p, pc, m, t, embedding_stats(t)))(params, pieces, mask, tables)
    copied = jnp.asarray(dec.copied if options.copy_overlap else dec.special)
    return {role: jnp.where((copied >= 0)[:, None], jnp.take(tables[role], jnp.maximum(copied, 0), axis=0),
                            out[role]) for role in config.roles}
