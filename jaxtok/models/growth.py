"""Progressive scaling of a TokenFormer by appending key/value parameter tokens.

Pure functions on parameter trees. ``grown_config`` raises the token counts and pins τ to the
pre-growth counts; ``grow_params`` appends tokens to every Pattention:

* ``mode="zero"``: new keys and values are 0. With τ pinned, the new scores are 0, so ‖A‖₂ over
  the tokens is unchanged and GeLU(0) = 0 keeps the new values out: the grown model computes the
  same function (up to float reduction order) for the ``l2_norm_gelu`` / ``gelu_l2_norm`` forms.
* ``mode="random"``: new tokens drawn as a fresh init draws them (keys ~ N(0, init_std²), values
  ~ N(0, value_init_std²)), the released code's incremental loading (old tokens copied into the
  prefix of a freshly initialised model). The function changes.

Works on plain or boxed (``nn.Partitioned``) trees and on sharded arrays (``jnp.concatenate``).
To place the grown tree directly, jit it with the new config's shardings::

    shardings = tree_shardings(new_abstract, new_logical, mesh, PARAM_RULES)
    grown = jax.jit(lambda p, r: grow_params(p, old, new, "zero", r), out_shardings=shardings)(
        params, rng)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxtok.models.tokenformer import PATTENTION_GROUPS, TokenFormerConfig

GROWTH_MODES = ("zero", "random")

# Everything but these fields must agree between the configs of a growth step.
_GROWABLE_FIELDS = ("qkv_tokens", "proj_tokens", "ffn_tokens", "qkv_tau_tokens",
                    "proj_tau_tokens", "ffn_tau_tokens")


def grown_config(
    config: TokenFormerConfig,
    *,
    qkv_tokens: int | None = None,
    proj_tokens: int | None = None,
    ffn_tokens: int | None = None,
) -> TokenFormerConfig:
    """``config`` with more parameter tokens (None = unchanged) and τ fixed at its current value.

    τ of each group keeps being computed from ``config.tau_tokens(group)``, so repeated growth
    keeps the τ of the very first model.
    """
    new_counts = {"qkv": qkv_tokens, "proj": proj_tokens, "ffn": ffn_tokens}
    updates: dict[str, int] = {}
    for group, requested in new_counts.items():
        old = config.tokens(group)
        count = old if requested is None else requested
        if count < old:
            raise ValueError(f"{group}_tokens can only grow: {old} -> {count}")
        updates[f"{group}_tokens"] = count
        updates[f"{group}_tau_tokens"] = config.tau_tokens(group)
    return dataclasses.replace(config, **updates)


def _check_configs(old: TokenFormerConfig, new: TokenFormerConfig) -> None:
    fields = [f.name for f in dataclasses.fields(TokenFormerConfig)]
    differ = [name for name in fields
              if name not in _GROWABLE_FIELDS and getattr(old, name) != getattr(new, name)]
    if differ:
        raise ValueError(f"configs differ in non-growable fields {differ}")
    for group in ("qkv", "proj", "ffn"):
        if new.tokens(group) < old.tokens(group):
            raise ValueError(f"{group} tokens shrink: {old.tokens(group)} -> {new.tokens(group)}")


def _append_tokens(leaf: Any, old_n: int, new_n: int, std: float, mode: str,
                   rng: jax.Array) -> Any:
    """Appends new_n - old_n rows on the token axis (-2) of a (..., n, d) array or boxed array."""
    if isinstance(leaf, nn.Partitioned):
        return leaf.replace_boxed(_append_tokens(leaf.value, old_n, new_n, std, mode, rng))
    if leaf.shape[-2] != old_n:
        raise ValueError(f"parameter has {leaf.shape[-2]} tokens, old config says {old_n}")
    shape = (*leaf.shape[:-2], new_n - old_n, leaf.shape[-1])  # (L, n_new - n_old, d)
    if mode == "zero":
        extra = jnp.zeros(shape, leaf.dtype)
    else:
        extra = (std * jax.random.normal(rng, shape, jnp.float32)).astype(leaf.dtype)
    return jnp.concatenate([leaf, extra], axis=-2)


def grow_params(params: Any, old_config: TokenFormerConfig, new_config: TokenFormerConfig,
                mode: str = "zero", rng: jax.Array | None = None) -> Any:
    """Extends the key/value tokens of every Pattention in ``params`` to ``new_config``'s counts.

    ``params`` is the ``"params"`` collection of a :class:`TokenFormer` (plain or boxed arrays,
    layers stacked by ``nn.scan``). New tokens are appended after the old ones (see the module
    docstring for the modes). ``rng`` is needed for ``mode="random"``.
    """
    if mode not in GROWTH_MODES:
        raise ValueError(f"unknown growth mode {mode!r}; valid: {GROWTH_MODES}")
    if mode == "random" and rng is None:
        raise ValueError("mode='random' needs an rng")
    _check_configs(old_config, new_config)
    rng = jax.random.key(0) if rng is None else rng
    counter = iter(range(1 << 30))  # one fresh key per grown array, in tree order

    def visit(tree: Any, name: str | None) -> Any:
        if not isinstance(tree, Mapping):
            return tree
        if "key_tokens" in tree and "value_tokens" in tree:
            if name not in PATTENTION_GROUPS:
                raise ValueError(f"Pattention {name!r} belongs to no token group")
            group = PATTENTION_GROUPS[name]
            old_n, new_n = old_config.tokens(group), new_config.tokens(group)
            stds = {"key_tokens": new_config.init_std, "value_tokens": new_config.value_init_std}
            return {
                k: (_append_tokens(v, old_n, new_n, stds[k], mode,
                                   jax.random.fold_in(rng, next(counter)))
                    if k in stds else v)
                for k, v in tree.items()
            }
        return {k: visit(v, k) for k, v in tree.items()}

    return visit(params, None)
