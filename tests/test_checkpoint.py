"""Checkpoints: round trip with keep-N, damaged or half-written checkpoints are reported and
skipped, failing saves leave committed ones alone, and states move between 8 devices and 1."""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxtok.models import llama
from jaxtok.sharding import make_mesh
from jaxtok.train import Checkpointer, CheckpointError, OptimizerConfig, Trainer, fingerprint, lm_task

LLAMA = llama.PRESETS["llama-tiny"]


def make_trainer(mesh_shape: str | None) -> Trainer:
    devices = jax.devices()[:1] if mesh_shape is None else None
    return Trainer(lm_task(llama.Llama(LLAMA)), OptimizerConfig(), make_mesh(mesh_shape, devices), total_steps=10)


@pytest.fixture(scope="module")
def params():
    return jax.device_get(nn.unbox(llama.init_params(LLAMA, jax.random.key(0))))


@pytest.fixture(scope="module")
def single(params):
    trainer = make_trainer(None)
    return trainer, trainer.init_state(jax.random.key(0), params=params)


@pytest.fixture(scope="module")
def sharded(params):
    trainer = make_trainer("data=2,fsdp=2,tensor=2")
    return trainer, trainer.init_state(jax.random.key(0), params=params)


def at_step(state, step: int):
    """A distinguishable state per step (no training needed)."""
    return state.replace(step=jnp.asarray(step, jnp.int32),
                         params=jax.tree.map(lambda x: x + 0.001 * step, state.params))


def save_steps(directory: Path, state, steps, keep: int = 3) -> None:
    with Checkpointer(directory, keep=keep, config={"name": "test"}) as checkpointer:
        for step in steps:
            checkpointer.save(step, at_step(state, step), data_state={"next_index": step})


def assert_same(a, b) -> None:
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_round_trip_keeps_the_newest(tmp_path, single):
    trainer, state = single
    save_steps(tmp_path, state, [1, 2, 3], keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "3"]  # committed by rename, no tmp left
    with Checkpointer(tmp_path) as checkpointer:
        restored = checkpointer.restore_latest(trainer.abstract_state)
    assert restored.step == 3 and int(restored.state.step) == 3
    assert restored.data_state == {"next_index": 3} and restored.config == {"name": "test"}
    assert_same(restored.state, at_step(state, 3))


def _largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "flipped byte in array data": lambda step: _flip_middle_byte(_largest_file(step / "state")),
    "truncated array data": lambda step: os.truncate(_largest_file(step / "state"), 100),
    "array data deleted": lambda step: [p.unlink() for p in (step / "state").rglob("*") if p.is_file()
                                        and p.parent.name == "d"],
    "bad metadata json": lambda step: (step / "meta" / "metadata").write_text("{not json"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_latest_is_reported_and_skipped(tmp_path, single, corruption):
    trainer, state = single
    save_steps(tmp_path, state, [1, 2])
    CORRUPTIONS[corruption](tmp_path / "2")
    messages = []
    with Checkpointer(tmp_path, log=messages.append) as checkpointer:
        restored = checkpointer.restore_latest(trainer.abstract_state)
        assert restored.step == 1
        assert_same(restored.state, at_step(state, 1))
        assert len(messages) == 1
        assert f"checkpoint step 2 in {tmp_path} is unusable (" in messages[0]
        assert "moved it to 2.corrupt; falling back to step 1" in messages[0]
        assert (tmp_path / "2.corrupt").is_dir() and checkpointer.all_steps() == [1]
        # step 2 can be written again (Orbax would silently skip a step that exists)
        checkpointer.save(2, at_step(state, 20))
        checkpointer.wait()
        assert_same(checkpointer.restore(2, trainer.abstract_state).state.params, at_step(state, 20).params)


def test_flipped_byte_is_caught_by_the_fingerprint(tmp_path, single):
    # Orbax restores this one without complaint; only the fingerprint notices.
    trainer, state = single
    save_steps(tmp_path, state, [1])
    _flip_middle_byte(_largest_file(tmp_path / "1" / "state"))
    with Checkpointer(tmp_path) as checkpointer, pytest.raises(CheckpointError, match="fail their fingerprint"):
        checkpointer.restore(1, trainer.abstract_state)


def test_half_written_checkpoint_is_ignored(tmp_path, single):
    trainer, state = single
    save_steps(tmp_path, state, [1, 2])
    junk = tmp_path / "3.orbax-checkpoint-tmp" / "state"  # what a kill during a save leaves
    junk.mkdir(parents=True)
    (junk / "manifest.ocdbt").write_bytes(b"\0" * 10)
    with Checkpointer(tmp_path) as checkpointer:
        assert checkpointer.latest_step() == 2
        assert checkpointer.restore_latest(trainer.abstract_state).step == 2


def test_failing_save_leaves_committed_checkpoints_alone(tmp_path, single):
    trainer, state = single
    save_steps(tmp_path, state, [1], keep=1)
    with Checkpointer(tmp_path, keep=1) as checkpointer:
        with pytest.raises(CheckpointError, match=r"failed .*committed checkpoints are untouched: \[1\]"):
            checkpointer.save(2, at_step(state, 2), data_state={"not json": object()})
            checkpointer.wait()
        assert checkpointer.all_steps() == [1]
    with Checkpointer(tmp_path) as checkpointer:
        assert_same(checkpointer.restore_latest(trainer.abstract_state).state, at_step(state, 1))


def test_existing_step_is_never_overwritten(tmp_path, single):
    _, state = single
    save_steps(tmp_path, state, [1])
    with Checkpointer(tmp_path) as checkpointer, pytest.raises(CheckpointError, match="already exists"):
        checkpointer.save(1, at_step(state, 5))


def test_nothing_usable_returns_none(tmp_path, single):
    trainer, state = single
    save_steps(tmp_path, state, [1])
    (tmp_path / "1" / "meta" / "metadata").write_text("")
    messages = []
    with Checkpointer(tmp_path, log=messages.append) as checkpointer:
        assert checkpointer.restore_latest(trainer.abstract_state) is None
    assert "no older checkpoint is left" in messages[0]


def test_restore_moves_between_8_devices_and_1(tmp_path, single, sharded):
    single_trainer, single_state = single
    sharded_trainer, sharded_state = sharded
    assert fingerprint(single_state) == fingerprint(sharded_state)  # independent of the layout

    save_steps(tmp_path / "from8", sharded_state, [1])
    with Checkpointer(tmp_path / "from8") as checkpointer:
        on_one = checkpointer.restore_latest(single_trainer.abstract_state).state
    assert on_one.params["embedding"].sharding.device_set == {jax.devices()[0]}
    assert_same(on_one, at_step(single_state, 1))

    save_steps(tmp_path / "from1", on_one, [2])
    with Checkpointer(tmp_path / "from1") as checkpointer:
        on_eight = checkpointer.restore_latest(sharded_trainer.abstract_state).state
    jax.tree.map(lambda x, want: x.sharding.is_equivalent_to(want, x.ndim) or pytest.fail(str(x.sharding)),
                 on_eight, sharded_trainer.state_shardings)
    assert len(on_eight.params["blocks"]["q"]["kernel"].sharding.device_set) == 8
    assert_same(on_eight, at_step(at_step(single_state, 1), 2))
