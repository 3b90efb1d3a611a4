"""``jaxtok grow``: a trained tiny TokenFormer grown into a new run, on one device and on a mesh."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerance import assert_close_at_scale, reduction_rtol

from jaxtok import cli
from jaxtok.data import make_eval_batches
from jaxtok.models.tokenformer import TokenFormer
from jaxtok.sharding import make_mesh
from jaxtok.train import configs, grow, pretrain
from jaxtok.train.checkpoint import Checkpointer
from jaxtok.train.observe import METRICS_FILE, read_metrics
from jaxtok.train.trainer import Trainer, lm_task


def one_device():
    return jax.devices()[:1]  # compiles far faster than the session's 8-device mesh


GROW_TO = ["model.qkv_tokens=48", "model.proj_tokens=40", "model.ffn_tokens=192"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tokenformer-tiny run of 12 steps: (RunResult, config)."""
    run_dir = tmp_path_factory.mktemp("grow") / "base"
    config = configs.apply_overrides(configs.get_config("tokenformer-tiny"),
                                     ["steps=12", "eval_every=0", "checkpoint_every=12", "progress=false"])
    config = dataclasses.replace(config, run_dir=str(run_dir))
    return pretrain.run(config, devices=one_device()), config


@pytest.fixture(scope="module")
def eval_batch(base):
    result, config = base
    tokenizer = pretrain.prepare_tokenizer(config, result.run_dir)
    return {k: jnp.asarray(v) for k, v in make_eval_batches(config.data, tokenizer)[0].items()}


def _assert_same_function(after, before, grown_model):
    """Zero growth appends tokens whose contribution is exactly 0: logits differ only by the
    reordered float32 sums over the (now longer) parameter-token axis, chained over the layers."""
    rtol = reduction_rtol(grown_model.ffn_tokens * grown_model.n_layers)
    assert_close_at_scale(after, before, rtol=rtol, err_msg="logits after growth")


def _logits(model_config, params, batch) -> np.ndarray:
    host = jax.device_get(params)  # off the mesh: compare on one device
    return np.asarray(lm_task(TokenFormer(model_config)).apply_fn(host, batch))


def _train_losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / METRICS_FILE) if r["split"] == "train"]


def test_zero_growth_keeps_the_function_and_training_resumes(base, eval_batch, tmp_path):
    result, _ = base
    grown = grow.grow(result.run_dir, tmp_path / "grown", [*GROW_TO, "optimizer.lr=1e-3"],
                        devices=one_device())
    assert (grown.new_model.qkv_tokens, grown.new_model.proj_tokens, grown.new_model.ffn_tokens) == (48, 40, 192)
    assert grown.config.model_overrides["ffn_tau_tokens"] == 128 and grown.config.optimizer.lr == 1e-3
    before = _logits(grown.old_model, result.state.params, eval_batch)
    after = _logits(grown.new_model, grown.state.params, eval_batch)
    _assert_same_function(after, before, grown.new_model)
    assert (grown.run_dir / "tokenizer.json").read_bytes() == (result.run_dir / "tokenizer.json").read_bytes()

    # the new checkpoint: step 0, zero Adam moments and count, no data state
    task, _, _ = pretrain.build_task(grown.config, pretrain.prepare_tokenizer(grown.config, grown.run_dir))
    trainer = Trainer(task, grown.config.optimizer, make_mesh(None, one_device()), total_steps=grown.config.steps)
    with Checkpointer(grown.run_dir / "checkpoints") as checkpointer:
        assert checkpointer.all_steps() == [0]
        restored = checkpointer.restore(0, trainer.abstract_state)
    assert restored.step == 0 and restored.data_state is None
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(restored.state.opt_state))

    # training resumes from the grown weights: the first batch (the same one the base run began
    # with) already has the trained loss, not the from-scratch one
    resumed = pretrain.run(dataclasses.replace(grown.config, steps=1), resume=True, devices=one_device())
    scratch_first, base_last = _train_losses(result.run_dir)[0], _train_losses(result.run_dir)[-1]
    first = _train_losses(resumed.run_dir)[0]
    assert len(_train_losses(resumed.run_dir)) == 1
    assert first < scratch_first - 0.5 * (scratch_first - base_last), (first, scratch_first, base_last)


def test_zero_keys_growth_on_a_mesh(base, eval_batch, tmp_path):
    result, _ = base
    mesh = "data=2,fsdp=2,tensor=2"
    grown = grow.grow(result.run_dir, tmp_path / "grown", GROW_TO, mesh=mesh, mode="zero_keys")
    assert grown.config.mesh == mesh
    value_tokens = grown.state.params["blocks"]["ffn"]["value_tokens"]
    assert value_tokens.shape[-2] == 192 and len(value_tokens.sharding.device_set) == 8
    key_tokens = np.asarray(grown.state.params["blocks"]["ffn"]["key_tokens"])
    assert np.all(key_tokens[..., 128:, :] == 0) and np.abs(np.asarray(value_tokens)[..., 128:, :]).max() > 0
    # restored onto the mesh and grown there, the old tokens are the trained ones, bit for bit
    trained = result.state.params["blocks"]["ffn"]
    np.testing.assert_array_equal(key_tokens[..., :128, :], np.asarray(trained["key_tokens"]))
    np.testing.assert_array_equal(np.asarray(value_tokens)[..., :128, :], np.asarray(trained["value_tokens"]))
    before = _logits(grown.old_model, result.state.params, eval_batch)
    _assert_same_function(_logits(grown.new_model, grown.state.params, eval_batch), before, grown.new_model)


def test_random_growth_changes_the_function_and_gives_a_resume_command(base, eval_batch, tmp_path):
    result, _ = base
    grown = grow.grow(result.run_dir, tmp_path / "grown", ["model.ffn_tokens=256", "steps=20"], mode="random",
                      seed=1, devices=one_device())
    before = _logits(grown.old_model, result.state.params, eval_batch)
    assert np.abs(_logits(grown.new_model, grown.state.params, eval_batch) - before).max() > 1e-3
    config_args = grown.pretrain_args
    assert config_args[:2] == ["--config", "tokenformer-tiny"]
    rebuilt = pretrain.config_from_args("tokenformer-tiny", config_args[3:], run_dir=str(grown.run_dir))
    assert configs.to_json(rebuilt) == configs.to_json(grown.config)
    # with no --config, a resumed run takes the config saved in its checkpoint
    from_checkpoint = pretrain.config_from_args(None, [], run_dir=str(grown.run_dir), resume=True)
    assert configs.to_json(from_checkpoint) == configs.to_json(grown.config)
    assert "--resume" in (grown.run_dir / grow.GROW_FILE).read_text()


def _llama_run(path):
    """A run directory whose checkpoint says it trained a Llama (a dummy state is enough)."""
    config = configs.get_config("tiny")
    (path / "tokenizer.json").parent.mkdir(parents=True)
    with Checkpointer(path / "checkpoints", config=configs.to_json(config)) as checkpointer:
        checkpointer.save(1, {"x": jnp.zeros(2)})
    return path


@pytest.mark.parametrize("extra, message", [
    (["model.ffn_tokens=64"], "can only grow"),
    (["bogus=1"], "unknown config key 'bogus'"),
    (["model.d_model=128"], "model.d_model cannot change"),
    (["steps=20"], "nothing to grow"),
])
def test_cli_refuses_bad_growth(base, tmp_path, capsys, extra, message):
    result, _ = base
    code = cli.main(["grow", "--from", str(result.run_dir), "--to", str(tmp_path / "new"), "--set", *extra])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "new" / "checkpoints").exists()


def test_refuses_existing_target_and_other_models(base, tmp_path):
    result, _ = base
    (tmp_path / "taken" / "checkpoints" / "3").mkdir(parents=True)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        grow.grow(result.run_dir, tmp_path / "taken", GROW_TO)
    with pytest.raises(ValueError, match="only TokenFormer runs can grow"):
        grow.grow(_llama_run(tmp_path / "llama"), tmp_path / "new", GROW_TO)
    with pytest.raises(ValueError, match="must differ"):
        grow.grow(result.run_dir, result.run_dir, GROW_TO)


def test_config_json_round_trip():
    config = configs.apply_overrides(configs.get_config("tokenformer-tiny"),
                                     ["data.paths=a.txt,b.txt", "data.source=text", "optimizer.clip_norm=none"])
    assert configs.config_from_json(configs.to_json(config)) == config
