"""3-D volumes for TokenUnify: an embedded synthetic EM-like generator, user volumes (HDF5, TIFF,
Zarr, .npy), random crops, augmentation, patchify/unpatchify and a Grain pipeline.

* :func:`synthetic_volume` draws a deterministic (by seed) electron-microscopy-like volume with
  ground-truth instance labels: warped 3-D Voronoi cells (boundaries wobble like a random walk),
  dark membranes of spatially varying thickness, organelle-like blobs inside cells, anisotropy
  (z voxels are ``anisotropy`` times coarser than x-y), blur, slow intensity drift, per-slice
  brightness jitter and noise.
* :func:`open_volume` opens a user volume lazily where the format allows (an HDF5 or Zarr dataset
  is read chunk by chunk as crops ask for it) and checks its rank and dtype.
* :func:`patchify` / :func:`unpatchify`: (B, D, H, W) <-> (B, N, pd·ph·pw) tokens in z-y-x raster
  order, pure jnp/numpy (they work on both).
* :func:`make_volume_iterator`: Grain batches ``{"volume": (B, D, H, W) float32, "step": (B,)}``
  whose state (``get_state``/``set_state``) resumes exactly. Batch ``i`` (the trainer's step
  ``i + 1``) is a function of ``(data.seed, i)`` alone, so resuming needs nothing but the index.
  Every crop is standardised (zero mean, unit variance) so that N(0, 1) noise filling a masked
  token has the scale of the data.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
from scipy import ndimage, spatial

Batch = dict[str, np.ndarray]
VOLUME_SUFFIXES = {".h5": "hdf5", ".hdf5": "hdf5", ".hdf": "hdf5", ".tif": "tiff", ".tiff": "tiff",
                   ".zarr": "zarr", ".npy": "npy"}
EVAL_STEP = -1  # the ``step`` of evaluation batches: objectives scheduled by step use all terms


# ---------------------------------------------------------------------------------------------
# The embedded synthetic volume


def _smooth_noise(rng: np.random.Generator, shape, sigma) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian-filtered noise (a random smooth field)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    field = field - field.mean()
    return field / max(float(field.std()), 1e-6)


def synthetic_volume(shape: Sequence[int] = (32, 128, 128), *, seed: int = 0, cell_size: float = 28.0,
                     anisotropy: float = 4.0, membrane: tuple[float, float] = (0.5, 1.8),
                     organelles_per_cell: float = 1.5, blur: float = 0.8, noise: float = 0.06,
                     drift: float = 0.12) -> tuple[np.ndarray, np.ndarray]:
    """``(image, labels)``: an EM-like volume (z, y, x) float32 in [0, 1] and int32 instance ids
    (1, 2, ... ; every voxel belongs to a cell, membranes included, as in CREMI-style labels).

    Args:
      shape: (z, y, x) voxels.
      seed: everything below is a function of it.
      cell_size: typical cell diameter in x-y voxels.
      anisotropy: physical z spacing over x-y spacing (EM sections are thicker than a pixel).
      membrane: range of membrane half-thickness in x-y voxels (a smooth field picks it).
      organelles_per_cell: mean number of dark blobs per cell.
      blur, noise, drift: Gaussian blur sigma (x-y voxels), noise std, intensity drift amplitude.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive sizes (z, y, x), got {shape}")
    rng = np.random.default_rng(seed)
    spacing = np.array([anisotropy, 1.0, 1.0], np.float32)
    extent = np.array(shape, np.float32) * spacing  # physical box
    n_cells = max(2, int(round(float(np.prod(extent)) / cell_size ** 3 * 1.9)))
    seeds = rng.uniform(0, 1, (n_cells, 3)).astype(np.float32) * extent
    # boundaries wobble: nearest seed of warped coordinates (a smooth displacement per axis)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"), -1) * spacing
    warp_sigma = (cell_size / 3 / anisotropy, cell_size / 3, cell_size / 3)
    for axis in range(3):
        grid[..., axis] += 0.25 * cell_size * _smooth_noise(rng, shape, warp_sigma)
    _, nearest = spatial.cKDTree(seeds).query(grid.reshape(-1, 3))
    cells = nearest.reshape(shape).astype(np.int32) + 1
    # connected pieces as instances (a warped cell can fall apart), numbered 1..K
    from skimage.measure import label as connected

    labels = connected(cells, background=0, connectivity=1).astype(np.int32)
    # membranes: both sides of an x-y boundary, one side of a z boundary (a section cutting a
    # membrane obliquely shows a smear, not a slab)
    boundary = np.zeros(shape, bool)
    for axis in range(3):
        differ = np.diff(labels, axis=axis) != 0
        lo, hi = [slice(None)] * 3, [slice(None)] * 3
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        boundary[tuple(hi)] |= differ
        if axis:
            boundary[tuple(lo)] |= differ
    distance = ndimage.distance_transform_edt(~boundary, sampling=spacing)
    thickness = membrane[0] + (membrane[1] - membrane[0]) * (0.5 + 0.25 * _smooth_noise(rng, shape, warp_sigma))
    is_membrane = distance < np.clip(thickness, membrane[0], membrane[1])

    k = int(labels.max())
    cell_value = rng.uniform(0.55, 0.82, k + 1).astype(np.float32)
    image = cell_value[labels] + 0.04 * _smooth_noise(rng, shape, (0.5, 2.0, 2.0))
    for _ in range(rng.poisson(organelles_per_cell * k)):  # dark ellipsoids kept inside their cell
        center = rng.uniform(0, 1, 3) * (np.array(shape) - 1)
        radius = rng.uniform(1.5, 0.18 * cell_size) * np.array([1 / anisotropy, 1.0, 1.0]) * rng.uniform(0.7, 1.3, 3)
        lo = np.maximum(np.floor(center - radius), 0).astype(int)
        hi = np.minimum(np.ceil(center + radius) + 1, shape).astype(int)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        local = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1)
        inside = (((local - center) / np.maximum(radius, 0.5)) ** 2).sum(-1) <= 1.0
        inside &= labels[box] == labels[tuple(np.round(center).astype(int))]
        image[box] = np.where(inside, rng.uniform(0.25, 0.4), image[box])
    image = np.where(is_membrane, 0.12, image)
    image = ndimage.gaussian_filter(image, (blur / anisotropy, blur, blur))
    slow = _smooth_noise(rng, shape, (shape[0] / 2, shape[1] / 2, shape[2] / 2))
    image = image * (1.0 + drift * slow) + rng.normal(0, 0.02, (shape[0], 1, 1))  # drift + section jitter
    image = image + noise * rng.standard_normal(shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32), labels


@functools.lru_cache(maxsize=8)
def _synthetic_cached(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    image, labels = synthetic_volume(shape, seed=seed)
    image.setflags(write=False)
    labels.setflags(write=False)
    return image, labels


# ---------------------------------------------------------------------------------------------
# User volumes


def volume_format(path: str | os.PathLike) -> str:
    """``hdf5``, ``tiff``, ``zarr`` or ``npy`` from the file name."""
    suffix = Path(path).suffix.lower()
    if suffix not in VOLUME_SUFFIXES:
        raise ValueError(f"cannot tell the format of {path}: expected one of {sorted(VOLUME_SUFFIXES)}")
    return VOLUME_SUFFIXES[suffix]


def _pick_dataset(names: list[str], key: str, path, what: str) -> str:
    if key:
        if key not in names:
            raise KeyError(f"{path} has no {what} {key!r}; it has {names}")
        return key
    if len(names) != 1:
        raise ValueError(f"{path} holds {len(names)} {what}s {names}: name one with data.volume_key")
    return names[0]


def check_volume(array: Any, source: str = "volume") -> Any:
    """``array`` if it is a 3-D (z, y, x) array of real numbers, else a clear error."""
    shape, dtype = tuple(array.shape), np.dtype(array.dtype)
    if len(shape) != 3:
        raise ValueError(f"{source} has shape {shape}: a volume must be 3-D (z, y, x)")
    if dtype == np.bool_ or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise TypeError(f"{source} has dtype {dtype}: a volume must hold integers or floats")
    if min(shape) < 1:
        raise ValueError(f"{source} is empty (shape {shape})")
    return array


def open_volume(path: str | os.PathLike, key: str = "") -> Any:
    """A 3-D volume from a file, indexable like a numpy array. HDF5 and Zarr datasets stay on
    disk and are read chunk by chunk; ``key`` names the dataset (optional when there is one)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"volume file {path} does not exist")
    kind = volume_format(path)
    if kind == "hdf5":
        import h5py

        handle = h5py.File(path, "r")
        names: list[str] = []
        handle.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        array = handle[_pick_dataset(names, key, path, "dataset")]
    elif kind == "zarr":
        import zarr

        node = zarr.open(str(path), mode="r")
        if isinstance(node, zarr.Array):
            array = node
        else:
            names = [name for name, _ in node.arrays()]
            array = node[_pick_dataset(names, key, path, "array")]
    elif kind == "tiff":
        import tifffile

        array = tifffile.imread(path)  # a multi-page stack reads as (z, y, x)
    else:
        array = np.load(path, mmap_mode="r")
    return check_volume(array, f"{path}" + (f"[{key}]" if key else ""))


# ---------------------------------------------------------------------------------------------
# Crops, augmentation, tokens


def check_crop(volume_shape: Sequence[int], crop: Sequence[int], where: str = "the volume") -> None:
    if len(crop) != 3 or min(crop) < 1:
        raise ValueError(f"crop must be three positive sizes (z, y, x), got {tuple(crop)}")
    if any(c > s for c, s in zip(crop, volume_shape)):
        raise ValueError(f"crop {tuple(crop)} is larger than {where} {tuple(volume_shape)}")


def random_crop(volume: Any, crop: Sequence[int], rng: np.random.Generator, z_range: tuple[int, int] | None = None,
                extra: Sequence[Any] = ()) -> tuple[np.ndarray, ...]:
    """A crop at a uniform position (within ``z_range`` of z when given) as float32, and the same
    window of every array in ``extra`` (e.g. labels)."""
    z0, z1 = (0, volume.shape[0]) if z_range is None else z_range
    check_crop((z1 - z0, *volume.shape[1:]), crop, f"the volume's region {(z1 - z0, *volume.shape[1:])}")
    starts = [int(rng.integers(z0, z1 - crop[0] + 1))]
    starts += [int(rng.integers(0, s - c + 1)) for s, c in zip(volume.shape[1:], crop[1:])]
    window = tuple(slice(s, s + c) for s, c in zip(starts, crop))
    return (np.asarray(volume[window], np.float32), *(np.asarray(a[window]) for a in extra))


def augment(rng: np.random.Generator, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """The same random flips (z, y, x) and x-y transpose (square crops only) of every array."""
    flips = rng.integers(0, 2, 3).astype(bool)
    transpose = bool(rng.integers(0, 2)) and arrays[0].shape[1] == arrays[0].shape[2]
    out = []
    for a in arrays:
        a = np.flip(a, axis=tuple(np.flatnonzero(flips))) if flips.any() else a
        out.append(np.ascontiguousarray(a.swapaxes(1, 2) if transpose else a))
    return tuple(out)


def standardize(crop: np.ndarray) -> np.ndarray:
    """Zero mean and unit variance per crop (a flat crop becomes zeros)."""
    crop = crop.astype(np.float32)
    return (crop - crop.mean()) / max(float(crop.std()), 1e-6)


def check_patch(crop: Sequence[int], patch: Sequence[int]) -> tuple[int, int, int]:
    """The token grid of ``crop`` cut into ``patch`` (both (z, y, x)); an error when it does not divide."""
    if len(patch) != 3 or min(patch) < 1:
        raise ValueError(f"patch must be three positive sizes (z, y, x), got {tuple(patch)}")
    if len(crop) != 3 or any(c % p for c, p in zip(crop, patch)):
        raise ValueError(f"patch {tuple(patch)} does not divide the crop {tuple(crop)}")
    return tuple(c // p for c, p in zip(crop, patch))


def patchify(volume, patch: Sequence[int]):
    """(B, D, H, W) -> (B, N, pd·ph·pw): tokens in z-y-x raster order, voxels inside a token in
    z-y-x order too. Works on numpy and jax arrays."""
    b, d, h, w = volume.shape
    gd, gh, gw = check_patch((d, h, w), patch)
    pd, ph, pw = patch
    x = volume.reshape(b, gd, pd, gh, ph, gw, pw)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6)  # (B, gd, gh, gw, pd, ph, pw)
    return x.reshape(b, gd * gh * gw, pd * ph * pw)


def unpatchify(tokens, patch: Sequence[int], grid: Sequence[int]):
    """The inverse of :func:`patchify`: (B, N, pd·ph·pw) -> (B, D, H, W) for a token ``grid``
    (gd, gh, gw)."""
    b, n, v = tokens.shape
    gd, gh, gw = grid
    pd, ph, pw = patch
    if n != gd * gh * gw or v != pd * ph * pw:
        raise ValueError(f"tokens {tokens.shape} do not fit grid {tuple(grid)} x patch {tuple(patch)}")
    x = tokens.reshape(b, gd, gh, gw, pd, ph, pw).transpose(0, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, gd * pd, gh * ph, gw * pw)


# ---------------------------------------------------------------------------------------------
# The pipeline


@dataclasses.dataclass(frozen=True)
class VolumeDataConfig:
    """Where volume crops come from and how they are batched (the ``data.*`` keys of a
    TokenUnify run).

    Attributes:
      volume: a user volume (``.h5``/``.hdf5``, ``.tif``/``.tiff`` stack, ``.zarr``, ``.npy``);
        empty: the embedded synthetic volumes.
      volume_key: the HDF5 dataset / Zarr array inside ``volume`` (optional when there is one).
      crop: (z, y, x) voxels per example.
      global_batch: crops per step over all hosts.
      seed: crop positions, augmentation and the synthetic volumes' seeds.
      augment: random flips, x-y transposes and intensity jitter on training crops.
      validation_fraction: the last share of a user volume's z slices, held out for evaluation.
      eval_crops: fixed crops of the held-out data per evaluation.
      synthetic_shape: (z, y, x) of each synthetic training volume.
      synthetic_volumes: how many synthetic training volumes (one more, held out, is drawn for
        evaluation).
      prefetch: batches prepared ahead by a background thread.
    """

    volume: str = ""
    volume_key: str = ""
    crop: tuple[int, ...] = (16, 160, 160)
    global_batch: int = 8
    seed: int = 0
    augment: bool = True
    validation_fraction: float = 0.2
    eval_crops: int = 8
    synthetic_shape: tuple[int, ...] = (32, 320, 320)
    synthetic_volumes: int = 2
    prefetch: int = 2

    def __post_init__(self):
        object.__setattr__(self, "crop", tuple(int(c) for c in self.crop))
        object.__setattr__(self, "synthetic_shape", tuple(int(c) for c in self.synthetic_shape))
        check_crop((1 << 30,) * 3, self.crop)
        if self.global_batch < 1 or self.eval_crops < 1 or self.synthetic_volumes < 1:
            raise ValueError("global_batch, eval_crops and synthetic_volumes must be >= 1")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")
        if not self.volume:
            check_crop(self.synthetic_shape, self.crop, "synthetic_shape")
        else:
            volume_format(self.volume)  # a bad suffix fails now


@dataclasses.dataclass(frozen=True)
class _Region:
    array: Any
    z_range: tuple[int, int]


def _regions(config: VolumeDataConfig, split: str) -> list[_Region]:
    if split not in ("train", "validation"):
        raise ValueError(f"unknown split {split!r}")
    if not config.volume:
        if split == "train":
            seeds = [config.seed * 1000 + i for i in range(config.synthetic_volumes)]
        else:
            seeds = [config.seed * 1000 + 999]  # never a training volume's seed
        return [_Region(v, (0, v.shape[0])) for v in
                (_synthetic_cached(config.synthetic_shape, s)[0] for s in seeds)]
    array = open_volume(config.volume, config.volume_key)
    check_crop(array.shape, config.crop, f"the volume {config.volume}")
    depth = array.shape[0]
    cut = depth - max(config.crop[0], int(round(depth * config.validation_fraction)))
    if cut < config.crop[0]:
        raise ValueError(f"{config.volume} has {depth} z slices: too few for a training and a held-out "
                         f"region of crop depth {config.crop[0]} each")
    return [_Region(array, (0, cut) if split == "train" else (cut, depth))]


def _crop_of(config: VolumeDataConfig, regions: list[_Region], rng: np.random.Generator, train: bool) -> np.ndarray:
    region = regions[int(rng.integers(len(regions)))]
    (crop,) = random_crop(region.array, config.crop, rng, region.z_range)
    crop = standardize(crop)
    if train and config.augment:
        (crop,) = augment(rng, crop)
        crop = crop * rng.uniform(0.8, 1.2) + rng.uniform(-0.2, 0.2)  # contrast and brightness
    return crop.astype(np.float32)


def _host_rows(global_batch: int, process_index: int | None, process_count: int | None) -> range:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if global_batch % count:
        raise ValueError(f"global_batch {global_batch} does not divide by {count} processes")
    per_host = global_batch // count
    return range(index * per_host, (index + 1) * per_host)


def make_volume_iterator(config: VolumeDataConfig, process_index: int | None = None,
                         process_count: int | None = None) -> grain.DatasetIterator:
    """This host's training batches (``get_state()``/``set_state()`` resume exactly). Row ``r``
    of batch ``i`` is drawn from ``(seed, i, r)`` alone: any host count reads the same data."""
    regions = _regions(config, "train")
    rows = _host_rows(config.global_batch, process_index, process_count)

    def batch(index: int) -> Batch:
        crops = [_crop_of(config, regions, np.random.default_rng([config.seed, int(index), r]), True) for r in rows]
        return {"volume": np.stack(crops), "step": np.full(len(rows), index + 1, np.int32)}

    dataset = grain.MapDataset.range(1 << 40).map(batch)  # endless; a batch is made when asked for
    options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=config.prefetch)
    return iter(dataset.to_iter_dataset(options))


def make_volume_eval_batches(config: VolumeDataConfig, process_index: int | None = None,
                             process_count: int | None = None) -> list[Batch]:
    """Fixed crops of the held-out data (no augmentation), this host's rows of each batch; the
    crop count is rounded up to whole batches."""
    regions = _regions(config, "validation")
    rows = _host_rows(config.global_batch, process_index, process_count)
    out = []
    for i in range(-(-config.eval_crops // config.global_batch)):
        crops = [_crop_of(config, regions, np.random.default_rng([config.seed, 1 << 31, i, r]), False) for r in rows]
        out.append({"volume": np.stack(crops), "step": np.full(len(rows), EVAL_STEP, np.int32)})
    return out
