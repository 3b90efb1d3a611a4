"""Volumes for TokenUnify: the synthetic generator, file readers (HDF5, TIFF, Zarr, .npy) with
their errors, crops, augmentation, patchify/unpatchify and the resumable Grain pipeline."""

from __future__ import annotations

import dataclasses

import h5py
import jax.numpy as jnp
import numpy as np
import pytest
import tifffile
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxtok.data import volumes as V

SMALL = V.VolumeDataConfig(crop=(4, 16, 16), global_batch=4, synthetic_shape=(8, 32, 32), synthetic_volumes=2,
                           eval_crops=3)


# ---------------------------------------------------------------------------------------------
# patchify


@settings(max_examples=25, deadline=None)
@given(st.tuples(*[st.integers(1, 3)] * 3), st.tuples(*[st.integers(1, 3)] * 3), st.integers(1, 2))
def test_unpatchify_inverts_patchify(grid, patch, batch):
    shape = (batch, *(g * p for g, p in zip(grid, patch)))
    volume = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    tokens = V.patchify(volume, patch)
    assert tokens.shape == (batch, np.prod(grid), np.prod(patch))
    np.testing.assert_array_equal(V.unpatchify(tokens, patch, grid), volume)


def test_tokens_are_patches_in_z_y_x_raster_order():
    volume = np.arange(4 * 4 * 6, dtype=np.float32).reshape(1, 4, 4, 6)
    tokens = V.patchify(volume, (2, 2, 3))  # grid (2, 2, 2)
    # token 3 = (gz 0, gy 1, gx 1): voxels z 0:2, y 2:4, x 3:6, in z-y-x order
    np.testing.assert_array_equal(tokens[0, 3], volume[0, 0:2, 2:4, 3:6].reshape(-1))
    np.testing.assert_array_equal(tokens[0, 4], volume[0, 2:4, 0:2, 0:3].reshape(-1))  # (1, 0, 0)
    jnp_tokens = V.patchify(jnp.asarray(volume), (2, 2, 3))  # the same pure function on jax arrays
    np.testing.assert_array_equal(np.asarray(jnp_tokens), tokens)


def test_a_patch_that_does_not_divide_the_crop_is_an_error():
    with pytest.raises(ValueError, match=r"patch \(2, 8, 8\) does not divide the crop \(8, 30, 32\)"):
        V.patchify(np.zeros((1, 8, 30, 32)), (2, 8, 8))
    with pytest.raises(ValueError, match="do not fit grid"):
        V.unpatchify(np.zeros((1, 5, 4)), (1, 2, 2), (2, 2, 1))


# ---------------------------------------------------------------------------------------------
# the synthetic volume


def test_synthetic_volume_is_deterministic_with_labels_and_dark_membranes():
    image, labels = V.synthetic_volume((8, 48, 48), seed=3)
    again, labels_again = V.synthetic_volume((8, 48, 48), seed=3)
    other, _ = V.synthetic_volume((8, 48, 48), seed=4)
    np.testing.assert_array_equal(image, again)
    np.testing.assert_array_equal(labels, labels_again)
    assert not np.array_equal(image, other)
    assert image.dtype == np.float32 and labels.dtype == np.int32 and image.shape == labels.shape == (8, 48, 48)
    assert 0.0 <= image.min() and image.max() <= 1.0
    ids = np.unique(labels)
    np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))  # 1..K, every voxel in a cell
    assert len(ids) >= 4
    # voxels next to a cell boundary (in x) are darker than the rest: the membranes
    edge = np.zeros(labels.shape, bool)
    edge[:, :, 1:] |= labels[:, :, 1:] != labels[:, :, :-1]
    assert image[edge].mean() < image[~edge].mean() - 0.15


# ---------------------------------------------------------------------------------------------
# readers and their errors


def _volume(shape=(12, 20, 24), dtype=np.uint8):
    return (np.random.default_rng(0).integers(0, 200, shape)).astype(dtype)


def test_readers_return_the_written_volume(tmp_path):
    data = _volume()
    with h5py.File(tmp_path / "one.h5", "w") as f:
        f.create_dataset("raw", data=data, chunks=(4, 10, 12))
    with h5py.File(tmp_path / "two.hdf5", "w") as f:
        f.create_dataset("volumes/raw", data=data)
        f.create_dataset("volumes/labels", data=data.astype(np.uint64))
    tifffile.imwrite(tmp_path / "stack.tif", data)
    zarr.save_array(str(tmp_path / "a.zarr"), data)
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("raw", data=data.astype(np.float32))
    np.save(tmp_path / "v.npy", data.astype(np.uint16))
    for path, key in [("one.h5", ""), ("two.hdf5", "volumes/raw"), ("stack.tif", ""), ("a.zarr", ""),
                      ("g.zarr", "raw"), ("v.npy", "")]:
        np.testing.assert_array_equal(np.asarray(V.open_volume(tmp_path / path, key)), data, err_msg=path)
    with pytest.raises(ValueError, match="holds 2 datasets.*data.volume_key"):
        V.open_volume(tmp_path / "two.hdf5")
    with pytest.raises(KeyError, match="no dataset 'nope'"):
        V.open_volume(tmp_path / "two.hdf5", "nope")


def test_bad_volumes_are_clear_errors(tmp_path):
    tifffile.imwrite(tmp_path / "flat.tif", _volume((20, 24)))
    with pytest.raises(ValueError, match=r"shape \(20, 24\): a volume must be 3-D"):
        V.open_volume(tmp_path / "flat.tif")
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f.create_dataset("raw", data=np.zeros((4, 4, 4), np.complex64))
        f.create_dataset("mask", data=np.zeros((4, 4, 4), bool))
    with pytest.raises(TypeError, match="dtype complex64: a volume must hold integers or floats"):
        V.open_volume(tmp_path / "c.h5", "raw")
    with pytest.raises(TypeError, match="dtype bool"):
        V.open_volume(tmp_path / "c.h5", "mask")
    with pytest.raises(ValueError, match="cannot tell the format"):
        V.volume_format("x.png")
    with pytest.raises(FileNotFoundError):
        V.open_volume(tmp_path / "missing.h5")
    tifffile.imwrite(tmp_path / "small.tif", _volume((6, 20, 24)))
    config = dataclasses.replace(SMALL, volume=str(tmp_path / "small.tif"), crop=(4, 32, 16))
    with pytest.raises(ValueError, match=r"crop \(4, 32, 16\) is larger than the volume"):
        next(V.make_volume_iterator(config))
    with pytest.raises(ValueError, match=r"crop \(4, 16, 40\) is larger than synthetic_shape"):
        dataclasses.replace(SMALL, crop=(4, 16, 40))
    with pytest.raises(ValueError, match="too few for a training and a held-out region"):
        next(V.make_volume_iterator(dataclasses.replace(config, crop=(4, 16, 16))))


# ---------------------------------------------------------------------------------------------
# crops, augmentation, the pipeline


def test_augment_moves_image_and_labels_together():
    image, labels = V.synthetic_volume((4, 16, 16), seed=0)
    rng = np.random.default_rng(1)
    for _ in range(6):
        img, lab = V.augment(rng, image, labels)
        # the map voxel value -> label survives every flip / transpose
        pairs = {(float(a), int(b)) for a, b in zip(img.ravel(), lab.ravel())}
        assert pairs == {(float(a), int(b)) for a, b in zip(image.ravel(), labels.ravel())}


def test_pipeline_is_deterministic_resumable_and_split_over_hosts(tmp_path):
    first = V.make_volume_iterator(SMALL)
    batches = [next(first) for _ in range(3)]
    assert batches[0]["volume"].shape == (4, 4, 16, 16) and batches[0]["volume"].dtype == np.float32
    np.testing.assert_array_equal([b["step"][0] for b in batches], [1, 2, 3])
    assert not np.array_equal(batches[0]["volume"], batches[1]["volume"])  # every batch new crops
    state = first.get_state()
    fourth = next(first)
    resumed = V.make_volume_iterator(SMALL)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["volume"], fourth["volume"])
    again = V.make_volume_iterator(SMALL)
    np.testing.assert_array_equal(next(again)["volume"], batches[0]["volume"])
    halves = [next(V.make_volume_iterator(SMALL, process_index=i, process_count=2))["volume"] for i in (0, 1)]
    np.testing.assert_array_equal(np.concatenate(halves), batches[0]["volume"])
    evals = V.make_volume_eval_batches(SMALL)
    assert len(evals) == 1 and (evals[0]["step"] == V.EVAL_STEP).all()
    crops = evals[0]["volume"]
    np.testing.assert_allclose(crops.mean(axis=(1, 2, 3)), 0, atol=1e-5)  # standardised, not augmented
    np.testing.assert_allclose(crops.std(axis=(1, 2, 3)), 1, atol=1e-4)
    np.testing.assert_array_equal(V.make_volume_eval_batches(SMALL)[0]["volume"], crops)


def test_user_volume_crops_come_from_the_file_and_hold_out_its_last_slices(tmp_path):
    data = np.zeros((20, 16, 16), np.uint16)
    data[:15] = np.arange(16)[None, None, :] * 100  # training region: a ramp in x
    data[15:] = np.arange(16)[None, :, None] * 100  # held-out region (last 25%): a ramp in y
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f.create_dataset("raw", data=data, chunks=(5, 16, 16))
    config = dataclasses.replace(SMALL, volume=str(tmp_path / "v.h5"), volume_key="raw", crop=(4, 16, 16),
                                 validation_fraction=0.25, augment=False)
    train = next(V.make_volume_iterator(config))["volume"]
    held_out = V.make_volume_eval_batches(config)[0]["volume"]
    ramp = (np.arange(16) - 7.5) / np.arange(16).std()
    np.testing.assert_allclose(train, np.broadcast_to(ramp[None, None, None, :], train.shape), atol=1e-5)
    np.testing.assert_allclose(held_out, np.broadcast_to(ramp[None, None, :, None], held_out.shape), atol=1e-5)
