"""A vision backbone over 3-D patch tokens for TokenUnify: Mamba blocks (the ViT as a baseline),
one set of weights serving both a bidirectional and a causal reading.

Tokens are patches of a volume in z-y-x raster order (``jaxtok.data.volumes.patchify``), each a
vector of ``pd·ph·pw`` voxels. The model is ``linear patch embedding + learned position
embedding -> n_layers blocks -> RMSNorm``, then two heads: ``reconstruction`` (the token at the
same position: random-token and next-all-token prediction) and ``next_token`` (the token one
position later: next-token prediction).

How one backbone serves both directions (``causal`` is an argument of the call, not a config):

* Mamba: each block holds the forward mixer ``mixer`` and a second one, ``mixer_reverse``, that
  reads the sequence reversed (the two summed, as ``jaxtok.models.mamba`` does with
  ``bidirectional=True``). Causal calls run ``mixer`` alone: position t then sees tokens <= t
  only, and the forward weights are shared by both readings (the reverse mixer is trained by
  the bidirectional objective only). The mixers are ``jaxtok.models.mamba.Mixer`` itself.
* ViT: the same weights with a full or a causal attention mask (``jaxtok.nn.attention``).

Blocks are a plain Python loop of separately named layers (a handful of layers here; the
``causal`` switch stays a Python bool).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from jaxtok.models.mamba import MambaConfig, Mixer
from jaxtok.nn.attention import dot_product_attention
from jaxtok.nn.layers import DenseGeneral, LayerNorm, ModelDtypes, RMSNorm, param_with_axes, require_positive
from jaxtok.sharding import constrain

__all__ = ["PRESETS", "VisionConfig", "VisionBackbone", "VisionOutput", "TokenUnifyModel", "BACKBONES"]

BACKBONES = ("mamba", "vit")


@dataclasses.dataclass(frozen=True)
class VisionConfig(ModelDtypes):
    """Shape of the backbone and its heads.

    Attributes:
      backbone: ``mamba`` or ``vit`` (the baseline).
      patch: (z, y, x) voxels per token; the crop must be a multiple of it.
      max_tokens: rows of the learned position embedding (tokens per crop at most).
      d_model, n_layers: width and depth.
      version, d_state, d_conv, expand, head_dim, chunk_size, scan: the Mamba mixer
        (``jaxtok.models.mamba.MambaConfig``'s fields of the same names).
      n_heads, mlp_ratio: the ViT's attention heads and MLP width (``mlp_ratio · d_model``).
      norm_eps: RMSNorm / LayerNorm epsilon.
      dtype / param_dtype: compute and storage dtypes.
    """

    backbone: str = "mamba"
    patch: tuple[int, ...] = (4, 16, 16)
    max_tokens: int = 400
    d_model: int = 256
    n_layers: int = 8
    version: int = 2
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    head_dim: int = 32
    chunk_size: int = 64
    scan: str = "auto"
    n_heads: int = 4
    mlp_ratio: int = 4
    norm_eps: float = 1e-5
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "patch", tuple(int(p) for p in self.patch))
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if len(self.patch) != 3 or min(self.patch) < 1:
            raise ValueError(f"patch must be three positive sizes (z, y, x), got {self.patch}")
        require_positive(self, "max_tokens", "d_model", "n_layers", "n_heads", "mlp_ratio")
        if self.backbone == "vit" and self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_heads={self.n_heads}")
        if self.backbone == "mamba":
            self.mamba_config()  # its own checks

    @property
    def patch_dim(self) -> int:
        return math.prod(self.patch)

    def mamba_config(self) -> MambaConfig:
        """The mixer's config (``vocab_size`` is unused: there is no token table)."""
        return MambaConfig(version=self.version, vocab_size=1, d_model=self.d_model, n_layers=self.n_layers,
                           d_state=self.d_state, d_conv=self.d_conv, expand=self.expand, head_dim=self.head_dim,
                           chunk_size=self.chunk_size, scan=self.scan, norm_eps=self.norm_eps,
                           bidirectional=True, dtype=self.dtype, param_dtype=self.param_dtype)

    def matmul_params(self, causal: bool) -> int:
        """Parameters each token is multiplied by in one reading (embedding, blocks, one head)."""
        d = self.d_model
        if self.backbone == "mamba":
            m = self.mamba_config()
            blocks = self.n_layers * m._layer_matmul_params() * (1 if causal else 2)
        else:
            blocks = self.n_layers * (4 * d * d + 2 * self.mlp_ratio * d * d)
        return 2 * self.patch_dim * d + blocks

    def mixer_flops_per_token(self, n_tokens: int, causal: bool) -> float:
        """Sequence mixing beyond the matmuls, forward only (the scan, or attention scores)."""
        if self.backbone == "mamba":
            m = self.mamba_config()
            return 6.0 * self.n_layers * m.d_inner * m.d_state * (1 if causal else 2)
        return 4.0 * self.n_layers * n_tokens * self.d_model * (0.5 if causal else 1.0)


PRESETS: dict[str, VisionConfig] = {
    # tests and the notebook: 8x32x32 crops in 2x8x8 patches (64 tokens); Mamba-1 (the paper's
    # mixer; its sequential scan also compiles in about half the time of the chunked SSD)
    "vision-mamba-tiny": VisionConfig(backbone="mamba", patch=(2, 8, 8), max_tokens=64, d_model=32, n_layers=2,
                                      version=1, d_state=8),
    "vision-vit-tiny": VisionConfig(backbone="vit", patch=(2, 8, 8), max_tokens=64, d_model=32, n_layers=2,
                                    n_heads=2),
    # the CPU ablation (benchmarks/tokenunify.py): 16x64x64 crops in 4x8x8 patches (256 tokens)
    "vision-mamba-small": VisionConfig(backbone="mamba", patch=(4, 8, 8), max_tokens=256, d_model=96, n_layers=4,
                                       d_state=16, head_dim=24, chunk_size=64),
    "vision-vit-small": VisionConfig(backbone="vit", patch=(4, 8, 8), max_tokens=256, d_model=96, n_layers=4,
                                     n_heads=4),
    # the paper's token layout: 16x160x160 crops in 4x16x16 patches (400 tokens)
    "vision-mamba-base": VisionConfig(backbone="mamba", patch=(4, 16, 16), max_tokens=400, d_model=384,
                                      n_layers=12, d_state=16, head_dim=64, chunk_size=80),
}


# ---------------------------------------------------------------------------------------------
# Blocks


class MambaBlock(nn.Module):
    """Pre-norm residual block: forward mixer, plus the reversed one unless ``causal``."""

    config: MambaConfig

    @nn.compact
    def __call__(self, x: jax.Array, causal: bool) -> jax.Array:
        cfg = self.config
        b, t, _ = x.shape
        valid, seg = jnp.ones((b, t), bool), jnp.zeros((b, t), jnp.int32)
        h = RMSNorm(cfg.norm_eps, cfg.compute_dtype, cfg.storage_dtype, name="norm")(x)
        out, _ = Mixer(cfg, name="mixer")(h, None, valid, seg, None)
        if not causal or self.is_initializing():  # init always creates both mixers
            back, _ = Mixer(cfg, name="mixer_reverse")(jnp.flip(h, axis=1), None, valid, seg, None)
            if not causal:
                out = out + jnp.flip(back, axis=1)
        return constrain(x + out.astype(x.dtype), ("batch", "length", "embed"))


class ViTBlock(nn.Module):
    """Pre-norm transformer block (LayerNorm, multi-head attention, GELU MLP)."""

    config: VisionConfig

    @nn.compact
    def __call__(self, x: jax.Array, causal: bool) -> jax.Array:
        cfg = self.config
        dt, pt = cfg.compute_dtype, cfg.storage_dtype
        b, t, d = x.shape
        hd = d // cfg.n_heads
        h = LayerNorm(cfg.norm_eps, dtype=dt, param_dtype=pt, name="attn_norm")(x)
        qkv = DenseGeneral((d, 3, cfg.n_heads, hd), ("embed", None, "heads", "head_dim"), "btd,dkhe->btkhe",
                           dtype=dt, param_dtype=pt, name="qkv")(h)
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        att = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], q_positions=pos, k_positions=pos,
                                    causal=causal)
        x = x + DenseGeneral((cfg.n_heads, hd, d), ("heads", "head_dim", "embed"), "bthe,hed->btd",
                             dtype=dt, param_dtype=pt, name="out")(att).astype(x.dtype)
        h = LayerNorm(cfg.norm_eps, dtype=dt, param_dtype=pt, name="mlp_norm")(x)
        h = DenseGeneral((d, cfg.mlp_ratio * d), ("embed", "mlp"), "btd,df->btf", use_bias=True,
                         bias_axes=("mlp",), dtype=dt, param_dtype=pt, name="up")(h)
        h = DenseGeneral((cfg.mlp_ratio * d, d), ("mlp", "embed"), "btf,fd->btd", use_bias=True,
                         bias_axes=("embed",), dtype=dt, param_dtype=pt, name="down")(jax.nn.gelu(h))
        return constrain(x + h.astype(x.dtype), ("batch", "length", "embed"))


# ---------------------------------------------------------------------------------------------
# Backbone and the pretraining model


class VisionBackbone(nn.Module):
    """(B, N, pd·ph·pw) patch tokens -> (B, N, d_model) features.

    Attributes:
      config: the backbone's shape.
    """

    config: VisionConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, causal: bool = False) -> jax.Array:
        cfg = self.config
        dt, pt = cfg.compute_dtype, cfg.storage_dtype
        b, n, v = tokens.shape
        if v != cfg.patch_dim:
            raise ValueError(f"tokens have {v} voxels, the backbone's patch {cfg.patch} has {cfg.patch_dim}")
        if n > cfg.max_tokens:
            raise ValueError(f"{n} tokens exceed max_tokens={cfg.max_tokens} (the position embedding)")
        x = DenseGeneral((v, cfg.d_model), (None, "embed"), "btv,vd->btd", use_bias=True, bias_axes=("embed",),
                         dtype=dt, param_dtype=pt, name="patch_embed")(tokens.astype(dt))
        pos = param_with_axes(self, "position", nn.initializers.normal(0.02), (cfg.max_tokens, cfg.d_model),
                              (None, "embed"), pt)
        x = constrain(x + pos[:n].astype(dt)[None], ("batch", "length", "embed"))
        for i in range(cfg.n_layers):
            if cfg.backbone == "mamba":
                x = MambaBlock(cfg.mamba_config(), name=f"block_{i}")(x, causal)
            else:
                x = ViTBlock(cfg, name=f"block_{i}")(x, causal)
        return RMSNorm(cfg.norm_eps, dt, pt, name="final_norm")(x)


@struct.dataclass
class VisionOutput:
    """What :class:`TokenUnifyModel` returns: features (B, N, d) and both heads' tokens
    (B, N, pd·ph·pw), float32."""

    features: jax.Array
    reconstruction: jax.Array
    next_token: jax.Array


class TokenUnifyModel(nn.Module):
    """The backbone with the pretraining heads (``params["backbone"]`` is what fine-tuning takes).

    Attributes:
      config: the backbone's shape.
    """

    config: VisionConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, causal: bool = False) -> VisionOutput:
        cfg = self.config
        dt, pt = cfg.compute_dtype, cfg.storage_dtype
        features = VisionBackbone(cfg, name="backbone")(tokens, causal)

        def head(name):
            return DenseGeneral((cfg.d_model, cfg.patch_dim), ("embed", None), "btd,dv->btv", use_bias=True,
                                bias_axes=(None,), dtype=dt, param_dtype=pt, name=name)(features)

        return VisionOutput(features=features, reconstruction=head("reconstruction").astype(jnp.float32),
                            next_token=head("next_token").astype(jnp.float32))


def init_params(config: VisionConfig, rng: jax.Array, n_tokens: int | None = None) -> Any:
    """Boxed parameters of :class:`TokenUnifyModel` (``flax.linen.unbox`` gives plain arrays)."""
    n = config.max_tokens if n_tokens is None else n_tokens
    tokens = jnp.zeros((1, n, config.patch_dim), jnp.float32)
    return jax.jit(lambda key: TokenUnifyModel(config).init(key, tokens)["params"])(rng)
