"""TokenUnify: the three objectives and their mix, the backbone's two readings, and
``jaxtok pretrain --config tokenunify-tiny`` on a user HDF5 volume with resume."""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxtok.data import volumes
from jaxtok.models.vision_mamba import PRESETS, TokenUnifyModel, VisionConfig
from jaxtok.objectives import tokenunify as tu
from jaxtok.train import configs, pretrain
from jaxtok.train.observe import METRICS_FILE, read_metrics

# one layer: test time is compile time
TINY = {name: dataclasses.replace(PRESETS[f"vision-{name}-tiny"], n_layers=1) for name in ("mamba", "vit")}
N, V = 64, 128  # 8x32x32 crops in 2x8x8 patches


@functools.cache
def model_and_params(name: str):
    module = TokenUnifyModel(TINY[name])
    params = nn.unbox(module.init(jax.random.key(0), jnp.zeros((1, N, V)))["params"])
    return module, params


def crops(batch=2, seed=0):
    image, _ = volumes.synthetic_volume((8, 32, 32), seed=seed)
    rng = np.random.default_rng(seed)
    return np.stack([volumes.augment(rng, volumes.standardize(image))[0] for _ in range(batch)])


# ---------------------------------------------------------------------------------------------
# pure pieces


def test_masks_cuts_and_fills():
    mask = tu.random_token_mask(jax.random.key(1), 5, 64, 0.4)
    np.testing.assert_array_equal(mask.sum(axis=1), [26] * 5)  # round(0.4 * 64)
    assert len({tuple(np.flatnonzero(row)) for row in np.asarray(mask)}) == 5  # rows differ
    assert tu.random_token_mask(jax.random.key(1), 2, 4, 0.01).sum(axis=1).tolist() == [1, 1]  # at least one
    cut = tu.cut_points(jax.random.key(2), 4000, 10)
    assert int(cut.min()) == 1 and int(cut.max()) == 9  # U{1..N-1}
    tokens = jnp.ones((1, 3, 2))
    where = jnp.array([[False, True, False]])
    zeros = tu.fill_tokens(jax.random.key(3), tokens, where, "zeros")
    np.testing.assert_array_equal(zeros, [[[1, 1], [0, 0], [1, 1]]])
    noise = tu.fill_tokens(jax.random.key(3), tokens, where, "noise")
    np.testing.assert_array_equal(noise[0, [0, 2]], 1.0)
    assert not np.any(np.asarray(noise[0, 1]) == 1.0)


def test_losses_on_hand_computed_cases():
    tokens = jnp.array([[[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]])
    pred = jnp.array([[[1.0, 1.0], [1.0, 3.0], [2.0, 2.0]]])  # per-token MSE 1, 2, 0
    np.testing.assert_allclose(tu.random_token_loss(pred, tokens, jnp.array([[True, True, False]])), 1.5)
    np.testing.assert_allclose(tu.next_all_loss(pred, tokens), 1.0)
    # next-token: pred[t] against tokens[t + 1] for t < k; k = 1 -> only pred[0] vs tokens[1]: (1-1)^2 = 0
    np.testing.assert_allclose(tu.next_token_loss(pred, tokens, jnp.array([1])), 0.0)
    # k = 2 -> pred[0] vs tokens[1] (0) and pred[1] vs tokens[2] ((1-2)^2 + (3-2)^2) / 2 = 1 -> mean 0.5
    np.testing.assert_allclose(tu.next_token_loss(pred, tokens, jnp.array([2])), 0.5)


def test_schedule_weights_and_alternation():
    summed = tu.MixtureConfig(weights=(1.0, 0.5, 2.0))
    np.testing.assert_array_equal(tu.schedule_weights(summed, jnp.int32(7)), [1.0, 0.5, 2.0])
    alternate = tu.MixtureConfig(weights=(1.0, 0.0, 1.0), period=2)  # rtp, rtp, nap, nap, rtp, ...
    got = [np.asarray(tu.schedule_weights(alternate, jnp.int32(s))).tolist() for s in range(1, 6)]
    assert got == [[1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 0, 1], [1, 0, 0]]
    np.testing.assert_array_equal(tu.schedule_weights(alternate, jnp.int32(volumes.EVAL_STEP)), [1, 0, 1])
    for bad in (dict(weights=(0, 0, 0)), dict(weights=(1, 1)), dict(period=-1), dict(mask_ratio=1.0),
                dict(fill="mean")):
        with pytest.raises(ValueError):
            tu.MixtureConfig(**bad)


# ---------------------------------------------------------------------------------------------
# the backbone's two readings


@pytest.mark.parametrize("name", ["mamba", "vit"])
def test_causal_reading_never_sees_later_tokens_and_the_bidirectional_one_does(name):
    module, params = model_and_params(name)
    features = jax.jit(lambda p, t, causal: module.apply({"params": p}, t, causal).features, static_argnums=2)
    x = jax.random.normal(jax.random.key(4), (1, N, V))
    y = x.at[0, 20].add(1.0)
    causal = np.abs(np.asarray(features(params, x, True) - features(params, y, True))).max(-1)[0]
    both = np.abs(np.asarray(features(params, x, False) - features(params, y, False))).max(-1)[0]
    np.testing.assert_array_equal(causal[:20], 0.0)
    assert causal[20] > 1e-4 and causal[21:].max() > 1e-4
    assert both[:20].max() > 1e-4


def test_a_mixed_step_gives_each_objective_its_gradient():
    module, params = model_and_params("mamba")
    objective = tu.tokenunify_objective(lambda p, t, causal: module.apply({"params": p}, t, causal),
                                        tu.MixtureConfig(), TINY["mamba"].patch)
    batch = {"volume": jnp.asarray(crops()), "step": jnp.array([1, 1])}

    def terms(p):
        loss, metrics = objective(p, batch, jax.random.key(5))
        return jnp.stack([metrics["loss_rtp"], metrics["loss_ntp"], metrics["loss_nap"], loss])

    values, jac = jax.jit(lambda p: (terms(p), jax.jacrev(terms)(p)))(params)
    np.testing.assert_allclose(values[3], values[:3].sum(), rtol=1e-6)  # weights (1, 1, 1)

    def norms(tree):  # per term: the gradient norm over ``tree``
        return np.sqrt(sum(np.sum(np.square(np.asarray(g)).reshape(4, -1), axis=1) for g in jax.tree.leaves(tree)))

    assert (norms(jac) > 1e-6).all()
    assert (norms(jac["backbone"]["block_0"]["mixer"]) > 1e-6).all()  # the shared forward mixer
    rtp, ntp, nap, _ = norms(jac["backbone"]["block_0"]["mixer_reverse"])
    assert rtp > 1e-6 and ntp == 0 and nap == 0  # the reverse mixer only in the bidirectional reading
    rtp, ntp, nap, _ = norms(jac["next_token"])
    assert ntp > 1e-6 and rtp == 0 and nap == 0
    rtp, ntp, nap, _ = norms(jac["reconstruction"])
    assert rtp > 1e-6 and nap > 1e-6 and ntp == 0


# ---------------------------------------------------------------------------------------------
# configs and the pretraining job


def test_config_keys_round_trip_and_bad_shapes(tmp_path):
    config = configs.apply_overrides(configs.get_config("tokenunify-tiny"), [
        "data.volume=/data/em.h5", "data.volume_key=volumes/raw", "data.crop=8,64,64", "objective.weights=1,0,2",
        "objective.period=100", "model=vision-vit-tiny", "model.max_tokens=128"])
    assert config.data.volume == "/data/em.h5" and config.data.crop == (8, 64, 64)
    assert config.objective == tu.MixtureConfig(weights=(1.0, 0.0, 2.0), period=100)
    assert configs.config_from_json(json.loads(json.dumps(configs.to_json(config)))) == config
    assert tu.tokens_per_step(config) == 4 * 4 * 8 * 8
    with pytest.raises(configs.UnknownKeyError, match="data.volume_key"):
        configs.apply_overrides(config, ["data.seq_len=5"])
    bad = configs.apply_overrides(configs.get_config("tokenunify-tiny"), ["data.crop=8,32,36",
                                                                          "data.synthetic_shape=16,64,72"])
    with pytest.raises(ValueError, match=r"patch \(2, 8, 8\) does not divide the crop \(8, 32, 36\)"):
        pretrain.build_task(bad, None)
    big = configs.apply_overrides(configs.get_config("tokenunify-tiny"), ["data.crop=8,64,64"])
    with pytest.raises(ValueError, match="more than the model's max_tokens=64"):
        pretrain.build_task(big, None)
    with pytest.raises(ValueError, match="backbone must be one of"):
        VisionConfig(backbone="cnn")


def test_pretrain_on_a_user_hdf5_volume_alternates_and_resumes(tmp_path):
    image, _ = volumes.synthetic_volume((16, 32, 32), seed=7)
    with h5py.File(tmp_path / "em.h5", "w") as f:
        f.create_dataset("volumes/raw", data=(image * 255).astype(np.uint8), chunks=(4, 32, 32))
    config = configs.apply_overrides(configs.get_config("tokenunify-tiny"), [
        f"data.volume={tmp_path / 'em.h5'}", "data.volume_key=volumes/raw", "objective.period=1", "steps=3",
        "checkpoint_every=2", "eval_every=0", "progress=false", "model=vision-vit-tiny", "model.n_layers=1"])
    full = tmp_path / "full"
    result = pretrain.run(dataclasses.replace(config, run_dir=str(full)), devices=jax.devices()[:1])
    assert result.summary["steps"] == 3 and "mfu" in result.summary
    records = {r["step"]: r for r in read_metrics(full / METRICS_FILE) if r["split"] == "train"}
    # period 1 over (rtp, ntp, nap): one objective per step, in that order, each logged
    for step, active in [(1, "rtp"), (2, "ntp"), (3, "nap")]:
        weights = {name: records[step][f"weight_{name}"] for name in tu.OBJECTIVES}
        assert weights == {name: float(name == active) for name in tu.OBJECTIVES}
        np.testing.assert_allclose(records[step]["loss"], records[step][f"loss_{active}"], rtol=1e-6)

    # resume from step 2, the way `jaxtok pretrain --run-dir DIR --resume` does (config from the checkpoint)
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "3")
    resumed_config = pretrain.config_from_args(None, resume=True, run_dir=str(cut))
    assert resumed_config.data == config.data and resumed_config.objective == config.objective
    pretrain.run(resumed_config, resume=True, devices=jax.devices()[:1])
    last = [r for r in read_metrics(cut / METRICS_FILE) if r["split"] == "train" and r["step"] == 3][-1]
    for key in ("loss", "loss_rtp", "loss_ntp", "loss_nap"):
        np.testing.assert_allclose(last[key], records[3][key], rtol=1e-5, err_msg=key)
