"""Losses and metrics shared by every language model in jaxtok.

Bits per byte is the common yardstick: summed cross-entropy in nats divided by
(ln 2 x UTF-8 bytes of exactly the evaluated text).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Negative log-likelihood in nats of each target, computed in float32. (B, T, V) -> (B, T)."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return log_z - picked


def masked_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(mask > 0, values, 0.0))


def bits_per_byte(total_nats: float, num_bytes: int) -> float:
    if num_bytes <= 0:
        raise ValueError("bits per byte needs at least one byte of text")
    return float(total_nats) / (math.log(2.0) * num_bytes)
