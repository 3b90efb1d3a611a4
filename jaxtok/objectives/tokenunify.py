"""TokenUnify's mixture of token prediction objectives over patch tokens of volumes.

Three objectives (tokens: (B, N, V) patches of a standardised crop, z-y-x raster order):

* **random-token prediction** (``rtp``, MAE-like): ``mask_ratio`` of each row's tokens (exactly
  ``round(mask_ratio · N)``, at least 1) are replaced by N(0, 1) noise (``fill="noise"``) or
  zeros; the **bidirectional** backbone reconstructs the clean volume. As in MAE the loss is the
  MSE over the masked tokens only (the visible ones are trivially copied).
* **next-all-token prediction** (``nap``): a cut point k ~ U{1..N-1} per row; tokens k..N-1 are
  replaced by noise and the **causal** backbone reconstructs the whole clean volume: MSE over all
  N tokens (the prefix terms are the easy ones, the tail is prediction of everything after k).
* **next-token prediction** (``ntp``): on the same causal pass, the ``next_token`` head at
  position t predicts token t + 1 for every t < k (the positions whose inputs are clean, so no
  position sees its target): MSE over those k targets. Position k - 1 predicting token k is the
  released code's single next-token target; the other positions are the same prediction made
  earlier in the raster (teacher forcing).

So a mixed step costs two backbone passes (one bidirectional, one causal), whatever the weights.

The mix (:class:`MixtureConfig`): ``period = 0`` sums ``weights · losses`` every step (the
released code's default mode is an equal-weight sum); ``period = p > 0`` trains one objective at
a time, the next every ``p`` steps, cycling over those with a positive weight (the released
code's other mode alternates every 100 epochs). The step comes from the batch (``batch["step"]``,
written by ``jaxtok.data.volumes``); evaluation batches (step -1) always use the weighted sum.
Every computed term is logged (``loss_rtp``, ``loss_ntp``, ``loss_nap``) together with the weight
it had at that step (``weight_rtp`` ...). Terms whose weight is 0 are not computed at all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxtok.data.volumes import EVAL_STEP, check_patch, patchify

OBJECTIVES = ("rtp", "ntp", "nap")  # random-token, next-token, next-all-token
FILLS = ("noise", "zeros")


@dataclasses.dataclass(frozen=True)
class MixtureConfig:
    """How the three objectives are mixed (the ``objective.*`` keys of a TokenUnify run).

    Attributes:
      weights: weights of (random-token, next-token, next-all-token) prediction.
      period: 0: the weighted sum every step; p > 0: one objective per step, switching every
        p steps in the order above, over the objectives with a positive weight.
      mask_ratio: share of tokens masked by random-token prediction.
      fill: what replaces masked / future tokens: ``noise`` (N(0, 1)) or ``zeros``.
    """

    weights: tuple[float, ...] = (1.0, 1.0, 1.0)
    period: int = 0
    mask_ratio: float = 0.4
    fill: str = "noise"

    def __post_init__(self):
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if len(self.weights) != 3 or min(self.weights) < 0 or max(self.weights) <= 0:
            raise ValueError(f"weights must be 3 non-negative numbers {OBJECTIVES}, not all 0; got {self.weights}")
        if self.period < 0:
            raise ValueError(f"period must be >= 0, got {self.period}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.fill not in FILLS:
            raise ValueError(f"fill must be one of {FILLS}, got {self.fill!r}")

    @property
    def active(self) -> tuple[str, ...]:
        return tuple(name for name, w in zip(OBJECTIVES, self.weights) if w > 0)


# ---------------------------------------------------------------------------------------------
# Pure pieces


def random_token_mask(key: jax.Array, batch: int, n: int, ratio: float) -> jax.Array:
    """(B, N) bool, exactly ``clip(round(ratio · N), 1, N - 1)`` True per row, uniformly placed."""
    count = min(max(int(round(ratio * n)), 1), n - 1)
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(key, (batch, n)), axis=1), axis=1)
    return ranks < count


def cut_points(key: jax.Array, batch: int, n: int) -> jax.Array:
    """(B,) int32 cut points k ~ U{1..N-1}: tokens >= k are the future."""
    return jax.random.randint(key, (batch,), 1, n, dtype=jnp.int32)


def fill_tokens(key: jax.Array, tokens: jax.Array, mask: jax.Array, fill: str) -> jax.Array:
    """``tokens`` with the rows' masked tokens ((B, N) bool) replaced by noise or zeros."""
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    filler = jax.random.normal(key, tokens.shape, tokens.dtype) if fill == "noise" else jnp.zeros_like(tokens)
    return jnp.where(mask[..., None], filler, tokens)


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean squared error over the voxels of the tokens where ``mask`` (B, N) is True."""
    err = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)  # (B, N)
    weight = mask.astype(jnp.float32)
    return jnp.sum(err * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def random_token_loss(recon: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """MSE of the reconstruction over the masked tokens (MAE's choice)."""
    return masked_mse(recon, tokens, mask)


def next_all_loss(recon: jax.Array, tokens: jax.Array) -> jax.Array:
    """MSE of the reconstruction over the whole volume."""
    return masked_mse(recon, tokens, jnp.ones(tokens.shape[:2], bool))


def next_token_loss(next_pred: jax.Array, tokens: jax.Array, cut: jax.Array) -> jax.Array:
    """MSE of ``next_pred[:, t]`` against ``tokens[:, t + 1]`` for every t < k (``cut``)."""
    n = tokens.shape[1]
    valid = jnp.arange(n - 1)[None, :] < cut[:, None]  # (B, N-1)
    return masked_mse(next_pred[:, :-1], tokens[:, 1:], valid)


def schedule_weights(config: MixtureConfig, step: jax.Array) -> jax.Array:
    """(3,) weights of (rtp, ntp, nap) at training step ``step`` (1-based; -1: evaluation)."""
    weights = jnp.asarray(config.weights, jnp.float32)
    if config.period == 0:
        return weights
    active = jnp.asarray([i for i, w in enumerate(config.weights) if w > 0], jnp.int32)
    turn = active[((jnp.maximum(step, 1) - 1) // config.period) % active.shape[0]]
    one_hot = (jnp.arange(3) == turn).astype(jnp.float32)
    return jnp.where(step == EVAL_STEP, weights, one_hot)


# ---------------------------------------------------------------------------------------------
# The objective and the task


Apply = Callable[[Any, jax.Array, bool], Any]  # (params, tokens, causal) -> VisionOutput


def tokenunify_objective(apply_fn: Apply, config: MixtureConfig, patch: tuple[int, ...], micro_batches: int = 1):
    """``(params, batch, rng) -> (loss, metrics)`` for ``jaxtok.train``'s trainer.

    ``batch["volume"]`` (B, D, H, W) standardised crops, ``batch["step"]`` (B,) the step. The
    loss is a mean over the batch, so every micro-batch weighs the same (``weight`` 1) and the
    logged per-objective losses are divided by ``micro_batches``: summed over the micro-batches
    they are the means of the whole batch.
    """
    needs_rtp = config.weights[0] > 0
    needs_causal = config.weights[1] > 0 or config.weights[2] > 0

    def objective(params, batch, rng):
        tokens = patchify(batch["volume"].astype(jnp.float32), patch)  # (B, N, V)
        b, n, _ = tokens.shape
        weights = schedule_weights(config, jnp.max(batch["step"]))
        k_mask, k_fill, k_cut, k_future = jax.random.split(rng, 4)
        losses = {}
        if needs_rtp:
            mask = random_token_mask(k_mask, b, n, config.mask_ratio)
            out = apply_fn(params, fill_tokens(k_fill, tokens, mask, config.fill), False)
            losses["rtp"] = random_token_loss(out.reconstruction, tokens, mask)
        if needs_causal:
            cut = cut_points(k_cut, b, n)
            future = jnp.arange(n)[None, :] >= cut[:, None]
            out = apply_fn(params, fill_tokens(k_future, tokens, future, config.fill), True)
            if config.weights[1] > 0:
                losses["ntp"] = next_token_loss(out.next_token, tokens, cut)
            if config.weights[2] > 0:
                losses["nap"] = next_all_loss(out.reconstruction, tokens)
        loss = sum(weights[OBJECTIVES.index(name)] * value for name, value in losses.items())
        metrics = {"weight": jnp.float32(1.0)}
        for name, value in losses.items():
            metrics[f"loss_{name}"] = value / micro_batches
            metrics[f"weight_{name}"] = weights[OBJECTIVES.index(name)] / micro_batches
        return loss, metrics

    return objective


def tokenunify_task(module, config: Any):
    """The ``TrainTask`` of a TokenUnify experiment (``module``: a ``TokenUnifyModel``;
    ``config``: the experiment, whose ``data.crop`` must be a multiple of the model's patch)."""
    from jaxtok.train.trainer import TrainTask  # jaxtok.train imports jaxtok.objectives

    model_config = module.config
    grid = check_patch(config.data.crop, model_config.patch)
    n = grid[0] * grid[1] * grid[2]
    if n > model_config.max_tokens:
        raise ValueError(f"crop {config.data.crop} in patches {model_config.patch} gives {n} tokens, more than "
                         f"the model's max_tokens={model_config.max_tokens}")
    mixture = config.objective if config.objective is not None else MixtureConfig()

    def init_fn(rng):
        return module.init(rng, jnp.zeros((1, n, model_config.patch_dim), jnp.float32))["params"]

    def apply_fn(params, tokens, causal):
        return module.apply({"params": params}, tokens, causal)

    return TrainTask(init_fn=init_fn, objective=tokenunify_objective(
        apply_fn, mixture, model_config.patch, config.optimizer.micro_batches))


def tokens_per_step(config: Any) -> int:
    """Patch tokens one step trains on (for tokens/s and MFU)."""
    grid = check_patch(config.data.crop, config.model_config(vocab_size=None).patch)
    return config.data.global_batch * grid[0] * grid[1] * grid[2]


def flops_per_token(model_config: Any, config: Any) -> float:
    """Training FLOPs per patch token: forward + backward (3x) of each pass the mix runs."""
    grid = check_patch(config.data.crop, model_config.patch)
    n = grid[0] * grid[1] * grid[2]
    weights = (config.objective or MixtureConfig()).weights
    passes = ([False] if weights[0] > 0 else []) + ([True] if weights[1] > 0 or weights[2] > 0 else [])
    return sum(3.0 * (2.0 * model_config.matmul_params(causal) + model_config.mixer_flops_per_token(n, causal))
               for causal in passes)
