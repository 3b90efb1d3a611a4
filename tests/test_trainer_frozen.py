"""The trainer's two slots for training part of a model: a trainable mask (only the selected
parameters move; the rest get no update, no weight decay and no Adam moments) and frozen state
(an argument of every compiled step, sharded by its logical names, never baked in)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec
from test_trainer import LLAMA, random_batch

from jaxtok.models import llama
from jaxtok.sharding import make_mesh
from jaxtok.train import OptimizerConfig, Trainer, lm_task
from jaxtok.train.trainer import TrainTask, lm_objective

OPT = OptimizerConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1, eps=1e-3)


def test_trainable_mask_moves_only_the_selected_parameters():
    """``jaxtok pretrain --set trainable=embeddings``: the mask ``build_task`` attaches."""
    from jaxtok.train import configs, pretrain

    config = configs.apply_overrides(configs.get_config("tiny"), ["trainable=embeddings"])
    task = pretrain.build_task(config, pretrain.train_bpe(["a tiny corpus of text"] * 4, 300))[0]
    assert task.trainable(("embedding",)) and not task.trainable(("layers", "attn"))
    base = lm_task(llama.Llama(LLAMA))
    assert LLAMA.tie_embeddings  # one matrix: the embedding
    task = TrainTask(init_fn=base.init_fn, apply_fn=base.apply_fn, trainable=pretrain.embeddings_only(LLAMA))
    trainer = Trainer(task, OPT, make_mesh(None, jax.devices()[:1]), total_steps=10)
    state = trainer.init_state(jax.random.key(0))
    before = jax.device_get(state.params)
    for seed in (1, 2):
        state, metrics = trainer.train_step(state, trainer.device_batch(random_batch(seed)))
    after = jax.device_get(state.params)
    assert np.max(np.abs(after["embedding"] - before["embedding"])) > 1e-3
    others = {k: v for k, v in after.items() if k != "embedding"}
    chex_equal = jax.tree.map(lambda a, b: np.array_equal(a, b), others, {k: before[k] for k in others})
    assert all(jax.tree.leaves(chex_equal)), chex_equal  # weight decay would have moved them too
    # Adam moments exist for the embedding only (set_to_zero keeps no state)
    moment_sizes = sum(x.size for x in jax.tree.leaves(state.opt_state) if getattr(x, "ndim", 0) >= 1)
    assert moment_sizes == 2 * before["embedding"].size
    assert np.isfinite(float(metrics["loss"]))


def test_trainable_mask_selecting_nothing_is_an_error():
    base = lm_task(llama.Llama(LLAMA))
    task = TrainTask(init_fn=base.init_fn, apply_fn=base.apply_fn, trainable=lambda path: False)
    with pytest.raises(ValueError, match="selects no parameter"):
        Trainer(task, OPT, make_mesh(None, jax.devices()[:1]), total_steps=10)


def _frozen_task():
    """A tiny 'adapter' trained on top of a frozen Llama: logits = Llama(frozen)(tokens) + bias."""
    model = llama.Llama(LLAMA)
    axes = nn.get_partition_spec(jax.eval_shape(lambda: llama.init_params(LLAMA, jax.random.key(0))))

    def init_fn(rng):
        return {"bias": nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",))(rng, (LLAMA.vocab_size,))}

    def apply_with(frozen):
        def apply_fn(params, batch):
            logits = model.apply({"params": frozen}, batch["tokens"], positions=batch["positions"],
                                 segment_ids=batch["segment_ids"]).logits
            return logits + params["bias"]
        return apply_fn

    def objective(params, batch, rng, frozen):
        return lm_objective(apply_with(frozen))(params, batch, rng)

    return TrainTask(init_fn=init_fn, objective=objective, frozen_axes=axes), apply_with


@pytest.mark.parametrize("mesh_shape", [None, "data=2,fsdp=2,tensor=2"])
def test_frozen_state_is_an_argument_of_the_step(mesh_shape):
    task, apply_with = _frozen_task()
    devices = jax.devices()[:1] if mesh_shape is None else None
    trainer = Trainer(task, OPT, make_mesh(mesh_shape, devices), total_steps=10)
    frozen_a = jax.device_get(nn.unbox(llama.init_params(LLAMA, jax.random.key(1))))
    frozen_b = jax.device_get(nn.unbox(llama.init_params(LLAMA, jax.random.key(2))))
    batch = random_batch(3)
    with pytest.raises(ValueError, match="set_frozen"):
        trainer.train_step(trainer.init_state(jax.random.key(0)), trainer.device_batch(batch))
    losses = {}
    for name, frozen in (("a", frozen_a), ("b", frozen_b)):
        trainer.set_frozen(frozen)
        state = trainer.init_state(jax.random.key(0))
        state, metrics = trainer.train_step(state, trainer.device_batch(batch))
        losses[name] = float(metrics["loss"])
        # the same loss and update as plain autodiff through a closure over this frozen state
        ref_loss = jax.jit(lambda p, f, b: lm_objective(apply_with(f))(p, b, None)[0])(
            {"bias": jnp.zeros(LLAMA.vocab_size)}, frozen, batch)
        np.testing.assert_allclose(losses[name], float(ref_loss), rtol=1e-5)
        assert np.max(np.abs(jax.device_get(state.params["bias"]))) > 0  # the bias trained
    # one compiled program served both frozen states and read each one's values
    assert trainer._train_step._cache_size() == 1
    assert abs(losses["a"] - losses["b"]) > 1e-4
    if mesh_shape is not None:  # placed by the logical rules, like parameters
        table = trainer.frozen["embedding"]
        assert table.sharding.spec != PartitionSpec(), table.sharding
