"""The trainer on tiny models: sharded steps equal the single-device step, accumulation equals
one big batch, NaN stops the run, TokenFormer trains, configs reject what they should, and a run
killed with SIGKILL resumes to exactly the losses of an uninterrupted one."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from _tolerance import assert_close_at_scale, reduction_rtol
from flax import linen as nn
from jax.sharding import PartitionSpec

from jaxtok.models import llama, tokenformer
from jaxtok.sharding import make_mesh
from jaxtok.train import (
    Checkpointer,
    LoopConfig,
    OptimizerConfig,
    Trainer,
    TrainingDiverged,
    configs,
    fit,
    lm_task,
    pretrain,
)
from jaxtok.train.configs import UnknownKeyError, apply_overrides
from jaxtok.train.observe import read_metrics, save_figure
from jaxtok.train.trainer import accumulate_gradients

LLAMA = llama.PRESETS["llama-tiny"]
# Adam's eps bounds how far its update lr * m / (sqrt(v) + eps) moves when the gradient moves by
# float noise dg: by at most ~2 lr dg / eps per step. With the default 1e-8 that bound is void (a
# gradient element at the level of its own rounding noise has an update of +-lr either way), so
# two runs that reduce in another order could differ by O(lr) anywhere (seen: 1.3% of lr on one
# element of 16,384 between data=2,fsdp=2,tensor=2 and one device). 1e-3 (about the RMS
# gradient here) keeps Adam's per-element scaling for the large gradients and makes the
# parameters comparable at a tolerance derived from float32 (see assert_same_run).
OPT = OptimizerConfig(lr=1e-3, warmup_steps=0, weight_decay=0.1, eps=1e-3)
ROWS, LENGTH = 8, 32  # of random_batch: each gradient element and the loss sum over 256 tokens


def random_batch(seed: int, rows: int = ROWS, length: int = LENGTH, vocab: int = 256) -> dict[str, np.ndarray]:
    """A packed-looking batch: two documents per row, the last few positions padding."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (rows, length)).astype(np.int32)
    half = length // 2
    segments = np.ones((rows, length), np.int32)
    segments[:, half:] = 2
    segments[:, -3:] = 0
    positions = np.where(np.arange(length) < half, np.arange(length), np.arange(length) - half)
    positions = np.broadcast_to(positions, (rows, length)) * (segments > 0)
    return {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1), "segment_ids": segments,
            "positions": positions.astype(np.int32), "loss_mask": (segments > 0).astype(np.int32),
            "num_bytes": rng.integers(50, 90, rows).astype(np.int32)}


@pytest.fixture(scope="module")
def llama_params():
    # One host-side init shared by every trainer: the parameters are then identical across
    # meshes, and the model's init is compiled once.
    return jax.device_get(nn.unbox(llama.init_params(LLAMA, jax.random.key(0))))


def make_trainer(mesh_shape: str | None, optimizer: OptimizerConfig = OPT, config=LLAMA) -> Trainer:
    devices = jax.devices()[:1] if mesh_shape is None else None
    module = llama.Llama(config) if isinstance(config, llama.LlamaConfig) else tokenformer.TokenFormer(config)
    return Trainer(lm_task(module), optimizer, make_mesh(mesh_shape, devices), total_steps=10)


def two_steps(trainer: Trainer, params) -> tuple[object, list[dict]]:
    state = trainer.init_state(jax.random.key(0), params=params)
    history = []
    for seed in (1, 2):
        state, metrics = trainer.train_step(state, trainer.device_batch(random_batch(seed)))
        history.append(jax.device_get(metrics))
    return state, history


@pytest.fixture(scope="module")
def single_device_run(llama_params):
    return two_steps(make_trainer(None), llama_params)


# ---------------------------------------------------------------------------------------------
# (b) sharded steps


def assert_same_run(state, history, ref_state, ref_history, steps: int = 2) -> None:
    """Two runs of ``steps`` steps agree up to float32 reordering (see tests/_tolerance.py).

    Loss, gradient norm and the Adam moments (linear / quadratic in the gradients) are sums over
    the batch's 256 tokens: 256 ulps of their scale (2x for the second moment, a square). The
    parameters are compared at the scale of what the steps can move them, lr * steps: each step
    moves by at most 2 lr dg / eps (OPT's comment) with dg <= 256 ulps of the largest gradient
    element, itself <= clip_norm (the global norm is clipped to it).
    """
    tokens = ROWS * LENGTH
    for step, (got, want) in enumerate(zip(history, ref_history), start=1):
        for name in ("loss", "grad_norm"):
            assert_close_at_scale(got[name], want[name], rtol=reduction_rtol(tokens), err_msg=f"step {step} {name}")
    adam, ref_adam = state.opt_state[1][0], ref_state.opt_state[1][0]
    assert_close_at_scale(adam.mu, ref_adam.mu, rtol=reduction_rtol(tokens), err_msg="Adam mu")
    assert_close_at_scale(adam.nu, ref_adam.nu, rtol=2 * reduction_rtol(tokens), err_msg="Adam nu")
    assert_close_at_scale(state.params, ref_state.params, scale=OPT.lr * steps,
                          rtol=2 * reduction_rtol(tokens) * OPT.clip_norm / OPT.eps, err_msg="params")
    assert int(state.step) == int(ref_state.step) == steps


_ = None  # a replicated dimension, in the table below
# Where every parameter (and both Adam moments) of llama-tiny must live, written out by hand from
# its shapes (layers 2, vocab 256, embed 64, heads 4, kv_heads 2, head_dim 16, mlp 128): FSDP
# splits the embedding dimension, tensor parallelism vocabulary, heads and MLP; norms replicate.
EXPECTED_SPECS = {
    "data=8": {},  # pure data parallelism: every parameter replicated
    "fsdp=8": {
        "embedding": PartitionSpec(_, "fsdp"),
        "blocks/q/kernel": PartitionSpec(_, "fsdp", _, _),
        "blocks/k/kernel": PartitionSpec(_, "fsdp", _, _),
        "blocks/v/kernel": PartitionSpec(_, "fsdp", _, _),
        "blocks/o/kernel": PartitionSpec(_, _, _, "fsdp"),
        "blocks/gate/kernel": PartitionSpec(_, "fsdp", _),
        "blocks/up/kernel": PartitionSpec(_, "fsdp", _),
        "blocks/down/kernel": PartitionSpec(_, _, "fsdp"),
    },
    "data=2,fsdp=2,tensor=2": {
        "embedding": PartitionSpec("tensor", "fsdp"),
        "blocks/q/kernel": PartitionSpec(_, "fsdp", "tensor", _),
        "blocks/k/kernel": PartitionSpec(_, "fsdp", "tensor", _),
        "blocks/v/kernel": PartitionSpec(_, "fsdp", "tensor", _),
        "blocks/o/kernel": PartitionSpec(_, "tensor", _, "fsdp"),
        "blocks/gate/kernel": PartitionSpec(_, "fsdp", "tensor"),
        "blocks/up/kernel": PartitionSpec(_, "fsdp", "tensor"),
        "blocks/down/kernel": PartitionSpec(_, "tensor", "fsdp"),
    },
}
PARAM_PATHS = {"embedding", "final_norm/scale", "blocks/attn_norm/scale", "blocks/mlp_norm/scale",
               *(f"blocks/{name}/kernel" for name in ("q", "k", "v", "o", "gate", "up", "down"))}


def by_path(tree) -> dict[str, jax.Array]:
    return {"/".join(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("mesh_shape", list(EXPECTED_SPECS))
def test_sharded_step_equals_single_device(mesh_shape, llama_params, single_device_run):
    trainer = make_trainer(mesh_shape)
    state, history = two_steps(trainer, llama_params)
    assert_same_run(state, history, *single_device_run)

    # every parameter and both Adam moments are placed as the table says (unlisted: replicated)
    params = by_path(state.params)
    assert set(params) == PARAM_PATHS
    expected = {path: EXPECTED_SPECS[mesh_shape].get(path, PartitionSpec(*[_] * leaf.ndim))
                for path, leaf in params.items()}
    adam = state.opt_state[1][0]
    for name, tree in [("params", state.params), ("Adam mu", adam.mu), ("Adam nu", adam.nu)]:
        assert {path: leaf.sharding.spec for path, leaf in by_path(tree).items()} == expected, name


def test_parallelism_modes_really_shard(llama_params):
    trainer = make_trainer("data=2,fsdp=2,tensor=2")
    state = trainer.init_state(jax.random.key(0), params=llama_params)
    q = state.params["blocks"]["q"]["kernel"]  # (layers, embed, heads, head_dim) = (2, 64, 4, 16)
    assert q.sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 32, 2, 16)
    assert state.params["embedding"].sharding.spec == PartitionSpec("tensor", "fsdp")
    fsdp = make_trainer("fsdp=8").init_state(jax.random.key(0), params=llama_params)
    assert fsdp.params["blocks"]["up"]["kernel"].addressable_shards[0].data.shape == (2, 8, 128)
    data = make_trainer("data=8").init_state(jax.random.key(0), params=llama_params)
    assert data.params["embedding"].sharding.is_fully_replicated


# ---------------------------------------------------------------------------------------------
# (g) gradient accumulation


def test_micro_batches_equal_one_big_batch(llama_params, single_device_run):
    trainer = make_trainer(None, dataclasses.replace(OPT, micro_batches=4))
    state, history = two_steps(trainer, llama_params)
    assert_same_run(state, history, *single_device_run)
    for got, want in zip(history, single_device_run[1]):
        assert got["tokens"] == want["tokens"]


def test_accumulation_weights_micro_batches_by_their_scored_tokens(llama_params):
    """Micro-batches of 58, 24, 6 and 2 scored tokens: only weighting each by its tokens gives
    the one-batch mean (weighting them equally would give the four micro-batch means' mean)."""
    batch = random_batch(7)
    scored_per_row = [29, 16, 4, 1, 29, 8, 2, 1]  # micro-batch j holds rows j and j + 4
    for row, n in enumerate(scored_per_row):
        batch["loss_mask"][row] = np.arange(LENGTH) < n
    trainer = make_trainer(None, dataclasses.replace(OPT, micro_batches=4))
    device_batch = trainer.device_batch(batch)

    def gradients(micro_batches):
        fn = jax.jit(lambda p, b: accumulate_gradients(trainer.loss_fn, p, b, jax.random.key(0), micro_batches,
                                                       trainer.batch_sharding))
        return jax.device_get(fn(llama_params, device_batch))

    (grads, metrics), (ref_grads, ref_metrics) = gradients(4), gradients(1)
    assert metrics["tokens"] == ref_metrics["tokens"] == sum(scored_per_row)
    assert_close_at_scale(metrics["loss"], ref_metrics["loss"], rtol=reduction_rtol(ROWS * LENGTH), err_msg="loss")
    assert_close_at_scale(grads, ref_grads, rtol=reduction_rtol(ROWS * LENGTH), err_msg="gradient")
    # the train step reports the same loss as the whole batch in one pass
    state = trainer.init_state(jax.random.key(0), params=llama_params)
    _, step_metrics = trainer.train_step(state, device_batch)
    assert_close_at_scale(float(step_metrics["loss"]), ref_metrics["loss"], rtol=reduction_rtol(ROWS * LENGTH),
                          err_msg="train-step loss")


def test_batch_must_divide_over_data_axes():
    trainer = make_trainer("data=8")
    with pytest.raises(ValueError, match="divide by the data-parallel size 8"):
        trainer.device_batch(random_batch(0, rows=4))


# ---------------------------------------------------------------------------------------------
# (e) divergence


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, llama_params):
    trainer = make_trainer(None)
    poisoned = random_batch(3)
    poisoned["targets"][:] = LLAMA.vocab_size + 7  # out of range: the gather fills NaN
    batches = iter([random_batch(1), random_batch(2), poisoned, random_batch(4)])
    state = trainer.init_state(jax.random.key(0), params=llama_params)
    with Checkpointer(tmp_path / "ckpt", keep=3) as checkpointer:
        with pytest.raises(TrainingDiverged, match=r"diverged at step 3 \(loss=nan.*last good checkpoint is step 2"):
            fit(trainer, state, batches, LoopConfig(steps=4, checkpoint_every=2), checkpointer=checkpointer)
    with Checkpointer(tmp_path / "ckpt") as checkpointer:
        assert checkpointer.all_steps() == [2]
        restored = checkpointer.restore_latest(trainer.abstract_state)
    assert restored.step == 2
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.state.params))
    # a fresh run never starts over a run's checkpoints
    with Checkpointer(tmp_path / "ckpt") as checkpointer, pytest.raises(ValueError, match="pass --resume"):
        pretrain.restore_or_init(trainer, checkpointer, configs.tiny(), iter([]), resume=False)


# ---------------------------------------------------------------------------------------------
# (h) another model family through the same trainer


def test_tokenformer_trains_through_the_same_trainer():
    trainer = make_trainer(None, OptimizerConfig(lr=1e-2, warmup_steps=0), tokenformer.PRESETS["tokenformer-tiny"])
    state = trainer.init_state(jax.random.key(0))
    batch = trainer.device_batch(random_batch(5))
    losses = []
    for _ in range(6):
        state, metrics = trainer.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.1, losses
    result = trainer.evaluate(state.params, [random_batch(5)])
    assert result["bpb"] > 0 and np.isfinite(result["loss"])


# ---------------------------------------------------------------------------------------------
# (f) configs and the command line


def test_overrides_are_typed_and_nested():
    config = apply_overrides(configs.tiny(), ["steps=1e2", "optimizer.lr=0.01", "model.d_model=32",
                                              "data.max_documents=none", "data.paths=a.txt,b.txt", "progress=false"])
    assert config.steps == 100 and config.optimizer.lr == 0.01 and config.progress is False
    assert config.model_config(vocab_size=512).d_model == 32
    assert config.data.max_documents is None and config.data.paths == ("a.txt", "b.txt")
    switched = apply_overrides(configs.default(), ["model.ffn_tokens=64", "model=tokenformer-tiny"])
    assert switched.model_config(vocab_size=512).ffn_tokens == 64


@pytest.mark.parametrize("item, message", [
    ("nope=1", "unknown config key 'nope'; valid keys: .*checkpoint_every.*optimizer.lr"),
    ("optimizer.learning_rate=1", "unknown config key 'optimizer.learning_rate'; valid keys:"),
    ("model.qkv_tokens=4", "unknown config key 'model.qkv_tokens'; valid keys: .*model.d_model"),
    ("model.vocab_size=9", "unknown config key 'model.vocab_size'"),
])
def test_unknown_keys_list_the_valid_ones(item, message):
    with pytest.raises(UnknownKeyError, match=message):
        apply_overrides(configs.tiny(), [item])


@pytest.mark.parametrize("item, message", [
    ("steps=abc", "steps: expected an integer"),
    ("progress=maybe", "progress: expected true or false"),
    ("data.source=ftp", r"data.source: 'ftp' is not one of \['stdlib'"),
    ("mesh=data=2,pipe=2", "bad mesh item"),
    ("model.n_heads=3", "not a multiple"),
    ("steps", "expected key=value"),
])
def test_bad_values_are_rejected(item, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(configs.tiny(), [item])


def test_cli_reports_bad_mesh_and_missing_data(tmp_path, capsys, monkeypatch):
    from jaxtok.cli import main

    monkeypatch.setattr(pretrain, "enable_compilation_cache", lambda: None)  # no process-wide cache here

    assert main(["pretrain", "--config", "tiny", "--mesh", "data=3", "--run-dir", str(tmp_path / "a")]) == 2
    assert "needs 3 devices but 8 are available" in capsys.readouterr().err
    assert main(["pretrain", "--config", "tiny", "--run-dir", str(tmp_path / "b"),
                 "--set", "data.source=text", f"data.paths={tmp_path}/missing.txt"]) == 2
    assert f"path {tmp_path}/missing.txt does not exist" in capsys.readouterr().err
    assert main(["pretrain", "--config", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown config 'nope'; available: [" in err and "'default'" in err and "'tiny'" in err


def test_multi_process_environment_detection():
    assert not pretrain.is_multi_process_env({})
    assert not pretrain.is_multi_process_env({"SLURM_NTASKS": "1"})
    assert pretrain.is_multi_process_env({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert pretrain.is_multi_process_env({"OMPI_COMM_WORLD_SIZE": "4"})
    assert pretrain.is_multi_process_env({"TPU_WORKER_HOSTNAMES": "a,b"})
    assert not pretrain.maybe_initialize_distributed({})


# ---------------------------------------------------------------------------------------------
# (a) resume after SIGKILL


_CHILD = textwrap.dedent("""
    import dataclasses, os, signal, sys, time
    from pathlib import Path
    from jaxtok.train import configs, pretrain

    run_dir, kill_at, committed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    config = configs.apply_overrides(configs.tiny(), sys.argv[4:])
    config = dataclasses.replace(config, run_dir=run_dir)

    def kill(step, state, metrics):
        if step == kill_at:
            while not (Path(run_dir) / "checkpoints" / str(committed)).exists():
                time.sleep(0.01)  # the rename that commits the checkpoint
            os.kill(os.getpid(), signal.SIGKILL)

    pretrain.run(config, callbacks=[kill])
""")


def _child_env(cache_dir) -> dict[str, str]:
    env = dict(os.environ)
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    overrides = ["steps=10", "checkpoint_every=4", "eval_every=0", "progress=false"]
    env = _child_env(tmp_path / "xla-cache")
    full, cut = tmp_path / "full", tmp_path / "cut"

    done = subprocess.run([sys.executable, "-m", "jaxtok.train.pretrain", "--config", "tiny", "--run-dir", str(full),
                           "--set", *overrides], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(f"run dir: {full}") == 2

    killed = subprocess.run([sys.executable, "-c", _CHILD, str(cut), "6", "4", *overrides], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert max(r["step"] for r in read_metrics(cut / "metrics.jsonl")) == 6

    resumed = subprocess.run([sys.executable, "-m", "jaxtok.train.pretrain", "--config", "tiny", "--run-dir", str(cut),
                              "--resume", "--set", *overrides], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 4" in resumed.stdout

    def losses(run):
        return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"}

    want, got = losses(full), losses(cut)
    assert sorted(got) == list(range(1, 11)) == sorted(want)
    np.testing.assert_allclose([got[s] for s in range(5, 11)], [want[s] for s in range(5, 11)], rtol=1e-6, atol=0)
    assert (cut / "loss.png").stat().st_size > 0 and any((cut / "tensorboard").iterdir())
    saved = json.loads((cut / "checkpoints" / "10" / "config" / "metadata").read_text())
    assert saved["model"] == "llama-tiny"


# ---------------------------------------------------------------------------------------------
# continued pretraining of a real model


@pytest.mark.slow
def test_smollm2_continue_starts_from_the_pretrained_weights(smollm2):
    from jaxtok.data import pack_documents
    from jaxtok.objectives import token_nll

    config = apply_overrides(configs.get_config("smollm2-continue"), ["data.seq_len=64", "data.global_batch=2"])
    task, params, model_config = pretrain.build_task(config, smollm2.tokenizer.hf, smollm2)
    assert model_config.vocab_size == 49152 and params is smollm2.params
    trainer = Trainer(task, config.optimizer, make_mesh(None, jax.devices()[:1]), total_steps=config.steps)
    state = trainer.init_state(jax.random.key(0), params=params)
    text = open(pretrain.__file__, encoding="utf-8").read()
    hf = smollm2.tokenizer.hf
    batch = {k: v[:2] for k, v in pack_documents([text], hf, 64, bos_id=hf.token_to_id(configs.BOS)).items()}
    state, metrics = trainer.train_step(state, trainer.device_batch(batch))

    logits = llama.Llama(smollm2.config).apply({"params": smollm2.params}, batch["tokens"],
                                              positions=batch["positions"], segment_ids=batch["segment_ids"]).logits
    mask = batch["loss_mask"]
    direct = float((token_nll(logits, batch["targets"]) * mask).sum() / mask.sum())
    np.testing.assert_allclose(float(metrics["loss"]), direct, rtol=1e-4)
    # a uniform guess over 49152 tokens costs ln(49152) = 10.8 nats
    assert direct < 7.0 and np.isfinite(float(metrics["grad_norm"]))


def test_save_figure_replaces_an_image_only_once_it_is_written(tmp_path):
    from pathlib import Path

    from matplotlib.figure import Figure

    out = tmp_path / "plots" / "curve.png"
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    assert save_figure(fig, out) == out
    good = out.read_bytes()
    assert good.startswith(b"\x89PNG")

    class DiskFull:
        def savefig(self, path, **kwargs):
            Path(path).write_bytes(b"\x89PN")  # half an image, then the failure
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_figure(DiskFull(), out)
    assert out.read_bytes() == good and [p.name for p in out.parent.iterdir()] == ["curve.png"]
