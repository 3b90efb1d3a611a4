"""The model-agnostic trainer: a task, an optimizer and a mesh in; jitted, sharded steps out.

What a model family hands over is a :class:`TrainTask` (``init_fn`` and ``apply_fn`` or an
``objective``); nothing here knows which family it is. The pieces, in the order a run uses them:

* :class:`OptimizerConfig` -> :func:`make_optimizer`: AdamW, linear warmup + cosine decay,
  global-norm clipping, weight decay on matrices only, gradient accumulation over micro-batches.
* :class:`Trainer`: derives every sharding from the logical axis names of the parameters
  (``PARAM_RULES`` for parameters and optimizer state, the ``batch`` rule for data), creates the
  state on the mesh and compiles ``train_step`` / ``eval_step`` with explicit in/out shardings.
* :func:`fit`: the loop (steps, eval, checkpoints, progress, divergence check).

Objectives return ``(loss, metrics)``. Metrics are *totals over the batch* (sums), so that
micro-batches and eval batches simply add up; ``metrics["weight"]`` (default 1) is what the loss
was averaged over, and accumulation weights each micro-batch by it, which makes k micro-batches
give exactly the gradient of one big batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from jaxtok.objectives import bits_per_byte, masked_sum, token_nll
from jaxtok.sharding import ACTIVATION_RULES, PARAM_RULES, logical_to_spec, tree_shardings

Batch = Mapping[str, Any]
Metrics = dict[str, jax.Array]
Objective = Callable[[Any, Batch, jax.Array], tuple[jax.Array, Metrics]]
WEIGHT = "weight"  # metric: what the loss was averaged over (tokens for an LM)
AVERAGED = ("cosine", "mse", "aux_loss")  # metrics an objective sums per unit of its WEIGHT: logged as means


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm stopped being finite."""


# ---------------------------------------------------------------------------------------------
# Optimizer


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warmup + cosine decay.

    Attributes:
      lr: peak learning rate.
      warmup_steps: linear warmup from lr / warmup_steps to lr.
      decay_steps: step at which the cosine reaches ``end_lr_fraction * lr`` (None: the run's
        last step).
      end_lr_fraction: final learning rate as a fraction of ``lr``.
      b1, b2, eps: Adam moments.
      weight_decay: decoupled decay, applied to matrices (not norms, biases or scalars).
      clip_norm: clip the global gradient norm to this (None: no clipping).
      micro_batches: split each batch into this many micro-batches and accumulate gradients
        (the same update as the whole batch at once, with 1/k of the activation memory).
    """

    lr: float = 3e-4
    warmup_steps: int = 100
    decay_steps: int | None = None
    end_lr_fraction: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0
    micro_batches: int = 1

    def __post_init__(self):
        if self.lr < 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("lr, weight_decay and warmup_steps must be >= 0")
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {self.micro_batches}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"clip_norm must be positive or None, got {self.clip_norm}")
        if not 0.0 <= self.end_lr_fraction <= 1.0:
            raise ValueError(f"end_lr_fraction must be in [0, 1], got {self.end_lr_fraction}")


def lr_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup then cosine decay (optax's), indexed by optimizer step (0 = the first update).

    The schedule is read one step ahead, so the first update already uses ``lr / warmup_steps``
    instead of zero, the peak is reached at update ``warmup_steps - 1`` and the end value at the
    decay step.
    """
    warm = config.warmup_steps
    decay = max(total_steps if config.decay_steps is None else config.decay_steps, warm + 1)
    if config.lr == 0:
        return optax.constant_schedule(0.0)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.lr, warmup_steps=warm, decay_steps=decay,
        end_value=config.lr * config.end_lr_fraction)
    return lambda count: schedule(count + 1)


def decay_mask(logical_axes: Any) -> Any:
    """True for parameters with two or more axes besides the stacked ``layers`` axis."""
    def is_matrix(spec):
        return sum(name not in (None, "layers") for name in spec) >= 2

    return jax.tree.map(is_matrix, logical_axes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def make_optimizer(config: OptimizerConfig, schedule: optax.Schedule, mask: Any,
                   trainable: Any = None) -> optax.GradientTransformation:
    """Clipping then AdamW (accumulation is done by the train step, not by the optimizer);
    ``trainable`` (a bool tree like the parameters) leaves the False ones untouched."""
    clip = optax.clip_by_global_norm(config.clip_norm) if config.clip_norm else optax.identity()
    adamw = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                        weight_decay=config.weight_decay, mask=mask)
    optimizer = optax.chain(clip, adamw)
    if trainable is None:
        return optimizer
    labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable)
    return optax.multi_transform({"train": optimizer, "freeze": optax.set_to_zero()}, labels)


def trainable_mask(trainable: Callable[[tuple[str, ...]], bool] | None, params: Any) -> Any:
    """The bool tree of ``TrainTask.trainable`` over ``params`` (None: everything trains)."""
    if trainable is None:
        return None

    def keys(path):
        return tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)

    mask = jax.tree_util.tree_map_with_path(lambda path, _: bool(trainable(keys(path))), params)
    if not any(jax.tree.leaves(mask)):
        raise ValueError("TrainTask.trainable selects no parameter: nothing would train")
    return mask


# ---------------------------------------------------------------------------------------------
# Task and objective


@dataclasses.dataclass(frozen=True)
class TrainTask:
    """What a model family gives the trainer.

    Attributes:
      init_fn: ``rng -> params`` boxed with logical axis names (``nn.with_logical_partitioning``).
      apply_fn: ``(params, batch) -> logits`` [B, T, V]; trained with :func:`lm_objective`.
      objective: ``(params, batch, rng) -> (loss, metrics)``; overrides ``apply_fn``. With
        ``frozen_axes`` it is called ``objective(params, batch, rng, frozen)``.
      frozen_axes: logical axis names (``PartitionSpec`` tree) of state the objective reads but
        never trains, e.g. a frozen base LM under a hypernetwork. The arrays go in through
        :meth:`Trainer.set_frozen`, sharded by these names, and reach the compiled step as an
        argument (never as a constant baked into the program).
      trainable: which parameters the optimizer updates: ``None`` (all), or a function of the
        parameter's path (a tuple of keys) returning a bool, e.g. embeddings only. The others get
        neither updates nor weight decay, and no optimizer moments.
    """

    init_fn: Callable[[jax.Array], Any]
    apply_fn: Callable[[Any, Batch], jax.Array] | None = None
    objective: Callable[..., tuple[jax.Array, Metrics]] | None = None
    frozen_axes: Any = None
    trainable: Callable[[tuple[str, ...]], bool] | None = None

    def loss_fn(self) -> Objective:
        if self.objective is not None:
            return self.objective
        if self.apply_fn is None:
            raise ValueError("a TrainTask needs apply_fn or objective")
        return lm_objective(self.apply_fn)


def lm_objective(apply_fn: Callable[[Any, Batch], jax.Array]) -> Objective:
    """Next-token cross-entropy averaged over scored tokens (``loss_mask``); metrics carry the
    summed nats and the UTF-8 bytes of the batch, for bits per byte."""

    def objective(params, batch, rng):
        del rng  # deterministic
        nll = token_nll(apply_fn(params, batch), batch["targets"])
        nats = masked_sum(nll, batch["loss_mask"])
        tokens = jnp.sum(batch["loss_mask"] > 0).astype(jnp.float32)
        metrics = {"nats": nats, "tokens": tokens, "bytes": jnp.sum(batch["num_bytes"]).astype(jnp.float32),
                   WEIGHT: tokens}
        return nats / jnp.maximum(tokens, 1.0), metrics

    return objective


def lm_task(module: nn.Module, init_seq_len: int = 8) -> TrainTask:
    """A task for any flax module called as ``module(tokens, positions=, segment_ids=)`` that
    returns an object with ``.logits`` (every decoder LM in jaxtok)."""

    def init_fn(rng):
        return module.init(rng, jnp.zeros((1, init_seq_len), jnp.int32))["params"]

    def apply_fn(params, batch):
        out = module.apply({"params": params}, batch["tokens"], positions=batch["positions"],
                           segment_ids=batch["segment_ids"])
        return out.logits

    return TrainTask(init_fn=init_fn, apply_fn=apply_fn)


# ---------------------------------------------------------------------------------------------
# State and steps


@struct.dataclass
class TrainState:
    """Everything a step changes: the step count, parameters and optimizer state."""

    step: jax.Array
    params: Any
    opt_state: Any


def _weighted_grads(loss_fn: Objective, params, batch, rng):
    """Gradient of ``loss * weight`` and the metrics (plus the weighted loss) of one batch."""
    def weighted(p):
        loss, metrics = loss_fn(p, batch, rng)
        weight = jnp.asarray(metrics.get(WEIGHT, 1.0), jnp.float32)
        return loss * weight, {**metrics, WEIGHT: weight}

    (weighted_loss, metrics), grads = jax.value_and_grad(weighted, has_aux=True)(params)
    return grads, {**metrics, "weighted_loss": weighted_loss}


def _split_micro_batches(batch: Batch, k: int, sharding: NamedSharding) -> Batch:
    """[B, ...] -> [k, B/k, ...] where micro-batch j takes rows j, j+k, ...: every micro-batch
    stays spread over all data shards instead of living on a few devices."""
    def split(x):
        parts = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
        spec = PartitionSpec(None, *sharding.spec)
        return jax.lax.with_sharding_constraint(parts, NamedSharding(sharding.mesh, spec))

    return jax.tree.map(split, batch)


def accumulate_gradients(loss_fn: Objective, params, batch: Batch, rng, micro_batches: int,
                         batch_sharding: NamedSharding):
    """Gradients and summed metrics over ``micro_batches`` slices of ``batch``, normalised by
    the total weight: the same as one pass over the whole batch."""
    if micro_batches == 1:
        grads, metrics = _weighted_grads(loss_fn, params, batch, rng)
    else:
        micro = _split_micro_batches(batch, micro_batches, batch_sharding)
        first = jax.tree.map(lambda x: x[0], micro)
        _, metric_shapes = jax.eval_shape(lambda: _weighted_grads(loss_fn, params, first, rng))
        zeros = (jax.tree.map(jnp.zeros_like, params),
                 jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes))

        def body(carry, xs):
            index, mb = xs
            grads, metrics = _weighted_grads(loss_fn, params, mb, jax.random.fold_in(rng, index))
            return jax.tree.map(jnp.add, carry, (grads, metrics)), None

        (grads, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(micro_batches), micro))
    total = metrics[WEIGHT]
    scale = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)
    grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
    loss = metrics["weighted_loss"] * scale
    metrics = {k: v * scale if k in AVERAGED else v for k, v in metrics.items() if k not in (WEIGHT, "weighted_loss")}
    return grads, {**metrics, "loss": loss}


def _frozen_where(params: Any, trainable: Any) -> Any:
    """Parameters with the untrained ones behind ``stop_gradient``, so the backward pass does
    not compute gradients nobody uses."""
    if trainable is None:
        return params
    return jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)


def train_step(state: TrainState, batch: Batch, *, loss_fn: Objective, optimizer: optax.GradientTransformation,
               schedule: optax.Schedule, micro_batches: int, batch_sharding: NamedSharding,
               seed: int, trainable: Any = None) -> tuple[TrainState, Metrics]:
    """One optimizer update. The step's randomness is derived from (seed, step), so a resumed
    run draws exactly what the uninterrupted one would."""
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    if trainable is not None:
        inner = loss_fn

        def loss_fn(params, batch, rng):
            return inner(_frozen_where(params, trainable), batch, rng)

    grads, metrics = accumulate_gradients(loss_fn, state.params, batch, rng, micro_batches, batch_sharding)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # param_norm: a finite loss and gradient can still step into inf (a huge lr), which the
    # next step would only report after the state was checkpointed
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params),
               "lr": schedule(state.step)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch: Batch, *, loss_fn: Objective) -> Metrics:
    """Summed metrics of one batch (the weighted loss is summed too, see :func:`summarize_eval`)."""
    loss, metrics = loss_fn(params, batch, jax.random.key(0))
    weight = jnp.asarray(metrics.get(WEIGHT, 1.0), jnp.float32)
    return {**metrics, WEIGHT: weight, "weighted_loss": loss * weight}


def summarize_eval(totals: Mapping[str, float]) -> dict[str, float]:
    """Loss (and bits per byte when the objective reports nats and bytes, and the mean of the
    :data:`AVERAGED` metrics it reports) from summed metrics."""
    weight = max(float(totals[WEIGHT]), 1e-9)
    summary = {"loss": float(totals["weighted_loss"]) / weight}
    if "nats" in totals and float(totals.get("bytes", 0)) > 0:
        summary["bpb"] = bits_per_byte(float(totals["nats"]), int(totals["bytes"]))
    summary.update({name: float(totals[name]) / weight for name in AVERAGED if name in totals})
    return summary


# ---------------------------------------------------------------------------------------------
# The trainer: shardings and compiled functions of one task on one mesh


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Rows over every data-like mesh axis (the ``batch`` activation rule); used as a pytree
    prefix, so it fits every field of a batch whatever its rank."""
    return NamedSharding(mesh, logical_to_spec(("batch",), None, mesh, ACTIVATION_RULES))


class Trainer:
    """Compiled, sharded train and eval steps of one :class:`TrainTask` on one mesh.

    Attributes:
      mesh: the device mesh; every call runs under ``jax.set_mesh(mesh)``.
      logical_axes: logical axis names of the parameters (from the boxed ``init_fn``).
      abstract_state: ``ShapeDtypeStruct`` tree of the state, each with its target sharding
        (what a checkpoint restore needs).
      state_shardings, batch_sharding: where the state and the batches live.
    """

    def __init__(self, task: TrainTask, optimizer: OptimizerConfig, mesh: jax.sharding.Mesh, *,
                 total_steps: int, seed: int = 0):
        self.task, self.config, self.mesh, self.seed = task, optimizer, mesh, seed
        self.loss_fn = task.loss_fn()
        boxed = jax.eval_shape(task.init_fn, jax.random.key(0))
        self.logical_axes = nn.get_partition_spec(boxed)
        self.schedule = lr_schedule(optimizer, total_steps)
        self.trainable = trainable_mask(task.trainable, nn.unbox(boxed))
        self.optimizer = make_optimizer(optimizer, self.schedule, decay_mask(self.logical_axes), self.trainable)
        # optax's state mirrors the parameter tree and the logical boxes ride along through its
        # tree maps, so each Adam moment gets the sharding of its parameter.
        boxed_opt = jax.eval_shape(self.optimizer.init, boxed)
        replicated = NamedSharding(mesh, PartitionSpec())
        self.state_shardings = TrainState(
            step=replicated,
            params=tree_shardings(nn.unbox(boxed), self.logical_axes, mesh, PARAM_RULES),
            opt_state=tree_shardings(nn.unbox(boxed_opt), nn.get_partition_spec(boxed_opt), mesh, PARAM_RULES))
        shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=nn.unbox(boxed),
                            opt_state=nn.unbox(boxed_opt))
        self.abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                           shapes, self.state_shardings)
        self.batch_sharding = batch_sharding(mesh)
        self.frozen = None
        self._jit_functions(replicated)

    def _bound_loss(self, frozen: Any) -> Objective:
        if self.task.frozen_axes is None:
            return self.loss_fn
        return lambda params, batch, rng: self.loss_fn(params, batch, rng, frozen)

    def _jit_functions(self, replicated: NamedSharding) -> None:
        def new_state(params):
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.optimizer.init(params))

        def step(state, batch, frozen):
            return train_step(state, batch, loss_fn=self._bound_loss(frozen), optimizer=self.optimizer,
                              schedule=self.schedule, micro_batches=self.config.micro_batches,
                              batch_sharding=self.batch_sharding, seed=self.seed, trainable=self.trainable)

        shardings = self.state_shardings
        # frozen state: sharded by its own logical names, placed once (set_frozen), an argument
        # of every step (None when the task has none)
        self.frozen_shardings = (None if self.task.frozen_axes is None else
                                 jax.tree.map(lambda spec: NamedSharding(self.mesh, logical_to_spec(
                                     tuple(spec), None, self.mesh, PARAM_RULES)), self.task.frozen_axes,
                                     is_leaf=lambda x: isinstance(x, PartitionSpec)))
        # out_shardings make init write each device's shard only: no full copy anywhere
        self._init_fresh = jax.jit(lambda rng: new_state(nn.unbox(self.task.init_fn(rng))), out_shardings=shardings)
        self._init_from = jax.jit(new_state, in_shardings=(shardings.params,), out_shardings=shardings)
        self._train_step = jax.jit(step, in_shardings=(shardings, self.batch_sharding, self.frozen_shardings),
                                   out_shardings=(shardings, replicated), donate_argnames="state")
        self._eval_step = jax.jit(
            lambda params, batch, frozen: eval_step(params, batch, loss_fn=self._bound_loss(frozen)),
            in_shardings=(shardings.params, self.batch_sharding, self.frozen_shardings), out_shardings=replicated)

    def set_frozen(self, frozen: Any) -> None:
        """Places the task's frozen state (host or device arrays) on the mesh for every step."""
        if self.task.frozen_axes is None:
            raise ValueError("this task has no frozen state (TrainTask.frozen_axes is None)")
        with jax.set_mesh(self.mesh):
            self.frozen = jax.tree.map(lambda x, sh: jax.device_put(jnp.asarray(x), sh), frozen,
                                       self.frozen_shardings)

    def _frozen(self) -> Any:
        if self.task.frozen_axes is not None and self.frozen is None:
            raise ValueError("the task has frozen state: call Trainer.set_frozen(...) before training")
        return self.frozen

    # -- state ------------------------------------------------------------------------------

    def init_state(self, rng: jax.Array, params: Any = None) -> TrainState:
        """A fresh state on the mesh: parameters from ``task.init_fn(rng)`` or the given
        ``params`` (e.g. pretrained weights, any pytree of host or device arrays)."""
        with jax.set_mesh(self.mesh):
            if params is None:
                return self._init_fresh(rng)
            return self._init_from(place_params(params, self.abstract_state.params))

    def device_batch(self, batch: Batch) -> dict[str, jax.Array]:
        """This host's numpy rows -> global arrays sharded over the data axes."""
        global_rows = next(iter(batch.values())).shape[0] * jax.process_count()
        shards = math.prod(self.mesh.shape[a] for a in _axes(self.batch_sharding.spec[0]))
        if global_rows % (shards * self.config.micro_batches):
            raise ValueError(
                f"global batch {global_rows} must divide by the data-parallel size {shards} x "
                f"micro_batches {self.config.micro_batches}")
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(x)),
                            dict(batch))

    # -- steps -----------------------------------------------------------------------------

    def lower_train_step(self, batch: Any) -> Any:
        """The step lowered for abstract inputs (``ShapeDtypeStruct`` batch): ahead-of-time
        compilation for hardware this host does not have (``jaxtok.train.aot``)."""
        with jax.set_mesh(self.mesh):
            return self._train_step.lower(self.abstract_state, batch, self.frozen)

    def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        """One update; ``state`` is donated (do not use it afterwards)."""
        with jax.set_mesh(self.mesh):
            return self._train_step(state, batch, self._frozen())

    def evaluate(self, params: Any, batches: Sequence[Batch]) -> dict[str, float]:
        """Loss and bits per byte over ``batches`` (host numpy batches)."""
        totals = None
        with jax.set_mesh(self.mesh):
            for batch in batches:
                metrics = self._eval_step(params, self.device_batch(batch), self._frozen())
                totals = metrics if totals is None else jax.tree.map(jnp.add, totals, metrics)
        if totals is None:
            raise ValueError("evaluation needs at least one batch")
        return summarize_eval(jax.device_get(totals))


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def place_params(params: Any, abstract: Any) -> Any:
    """Host (or device) arrays -> arrays with the shardings and dtypes of ``abstract``. Built
    with ``make_array_from_callback``, which also works when devices span several hosts."""
    def place(x, target):
        if tuple(x.shape) != tuple(target.shape):
            raise ValueError(f"parameter shape {tuple(x.shape)} does not match the model's {target.shape}")
        host = np.asarray(jax.device_get(x)).astype(target.dtype)
        return jax.make_array_from_callback(target.shape, target.sharding, lambda index: host[index])

    try:
        return jax.tree.map(place, params, abstract)
    except ValueError as err:
        raise ValueError(f"the given parameters do not fit the model: {err}") from None


def check_finite(step: int, metrics: Mapping[str, Any], last_good: int | None, where: str = "") -> None:
    """Raises :class:`TrainingDiverged` when the loss, gradient norm or parameter norm is NaN/Inf."""
    watched = ("loss", "grad_norm", "param_norm")
    bad = {k: float(metrics[k]) for k in watched if k in metrics and not np.isfinite(metrics[k])}
    if bad:
        values = ", ".join(f"{k}={v}" for k, v in bad.items())
        kept = (f"the last good checkpoint is step {last_good}{where}" if last_good is not None
                else "no checkpoint was written yet")
        raise TrainingDiverged(
            f"training diverged at step {step} ({values}); stopped without saving, {kept}. "
            "Lower optimizer.lr or check the data, then resume.")


# ---------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """When the loop evaluates and saves.

    Attributes:
      steps: last step of the run (a resumed run continues to it).
      eval_every: evaluate every this many steps and at the end (0: never).
      checkpoint_every: save every this many steps and at the end (0: only at the end).
    """

    steps: int
    eval_every: int = 0
    checkpoint_every: int = 0


class StepCallback(Protocol):
    def __call__(self, step: int, state: TrainState, metrics: Mapping[str, float]) -> None: ...


class CheckpointSink(Protocol):
    """What the loop needs of a checkpointer (see ``checkpoint.Checkpointer``)."""

    directory: Any

    def save(self, step: int, state: TrainState, *, data_state: Mapping[str, Any] | None = None) -> None: ...

    def last_saved_step(self) -> int | None: ...


class Observer(Protocol):
    def train(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def eval(self, step: int, metrics: Mapping[str, float]) -> None: ...


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def fit(trainer: Trainer, state: TrainState, data: Iterator[Batch], loop: LoopConfig, *,
        eval_batches: Sequence[Batch] = (), checkpointer: CheckpointSink | None = None,
        observer: Observer | None = None, callbacks: Sequence[StepCallback] = ()) -> TrainState:
    """Trains from ``state.step`` to ``loop.steps``; returns the final state.

    ``data`` yields host-local numpy batches (its ``get_state()``, if any, is checkpointed).
    A NaN/Inf loss, gradient or parameter norm raises :class:`TrainingDiverged` before that
    state is saved. ``callbacks`` run after each step's logging, evaluation and checkpoint.
    """
    start = int(jax.device_get(state.step))
    for step in range(start + 1, loop.steps + 1):
        batch = next(data, None)
        if batch is None:
            raise ValueError(f"the training data ran out before step {step} of {loop.steps} "
                             "(fewer steps, or more data.num_epochs)")
        state, metrics = trainer.train_step(state, trainer.device_batch(batch))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        last_good = checkpointer.last_saved_step() if checkpointer else None
        check_finite(step, metrics, last_good, f" in {checkpointer.directory}" if checkpointer else "")
        if observer is not None:
            observer.train(step, metrics)
        if eval_batches and loop.eval_every > 0 and _due(step, loop.eval_every, loop.steps):
            result = trainer.evaluate(state.params, eval_batches)
            if observer is not None:
                observer.eval(step, result)
        if checkpointer is not None and _due(step, loop.checkpoint_every, loop.steps):
            data_state = data.get_state() if hasattr(data, "get_state") else None
            checkpointer.save(step, state, data_state=data_state)
        for callback in callbacks:
            callback(step, state, metrics)
    return state
