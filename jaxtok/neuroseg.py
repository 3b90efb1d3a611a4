"""Neuron segmentation downstream of TokenUnify: affinity targets, an affinity head fine-tuned
on a (pretrained) backbone, agglomeration into instances, and the VOI / ARAND metrics.

* :func:`affinities`: (z, y, x) neighbour affinities of instance labels: channel c at voxel p is
  1 when p and its predecessor along axis c (p - e_c) carry the same label (CREMI/waterz
  convention: offsets -1 on each axis); the first slice along c has no neighbour (masked).
* :class:`AffinityModel`: ``VisionBackbone`` (bidirectional) + a one-level decoder: token
  features projected to every voxel of the patch (``unpatchify``), joined with the raw voxels
  (a skip connection), a per-voxel MLP to the 3 affinity logits.
* :func:`finetune_affinities`: binary cross-entropy on random labelled crops, through the
  shared trainer (a mesh, sharded state); starts from ``params["backbone"]`` of a
  ``jaxtok pretrain`` run, or from scratch.
* :func:`segment`: seeds = connected components of the graph of confident affinities
  (> ``seed_threshold``, scipy.sparse.csgraph), grown by a watershed (scikit-image) over the
  boundary map 1 - mean affinity: the seeded-watershed form of waterz's agglomeration.
* :func:`evaluate_segmentation`: VOI split / merge (bits) and adapted Rand error from
  ``skimage.metrics``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxtok.data.volumes import augment, check_patch, patchify, random_crop, standardize, unpatchify
from jaxtok.models.vision_mamba import VisionBackbone, VisionConfig
from jaxtok.nn.layers import DenseGeneral

AXES = ("z", "y", "x")


# ---------------------------------------------------------------------------------------------
# Targets


def affinities(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(affinity, mask)``, both (3, z, y, x) float32, of instance ``labels`` (z, y, x)."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3-D (z, y, x), got shape {labels.shape}")
    aff = np.zeros((3, *labels.shape), np.float32)
    mask = np.zeros_like(aff)
    for c in range(3):
        here = [slice(None)] * 3
        here[c] = slice(1, None)
        before = [slice(None)] * 3
        before[c] = slice(None, -1)
        same = labels[tuple(here)] == labels[tuple(before)]
        aff[(c, *here)] = same & (labels[tuple(here)] > 0)
        mask[(c, *here)] = 1.0
    return aff, mask


# ---------------------------------------------------------------------------------------------
# Model


class AffinityModel(nn.Module):
    """(B, D, H, W) standardised crops -> (B, 3, D, H, W) affinity logits (float32).

    A light decoder (UNETR-like, one level): each token's backbone features are projected to
    ``voxel_features`` numbers per voxel of its patch, joined per voxel with the raw intensity of
    the voxel and of its z/y/x predecessors (the skip connection: where exactly a membrane lies
    inside a patch is a voxel-scale fact), then a per-voxel MLP gives the 3 logits. The context
    (which side of a membrane is which cell) comes from the backbone only.

    Attributes:
      config: the backbone's shape (the pretrained run's model config).
      voxel_features, hidden: decoder widths.
    """

    config: VisionConfig
    voxel_features: int = 8
    hidden: int = 32

    @nn.compact
    def __call__(self, volume: jax.Array) -> jax.Array:
        cfg = self.config
        dt, pt = cfg.compute_dtype, cfg.storage_dtype
        b = volume.shape[0]
        grid = check_patch(volume.shape[1:], cfg.patch)
        features = VisionBackbone(cfg, name="backbone")(patchify(volume, cfg.patch), causal=False)
        k = self.voxel_features
        per_voxel = DenseGeneral((cfg.d_model, cfg.patch_dim, k), ("embed", None, None), "btd,dvk->btvk",
                                 use_bias=True, bias_axes=(None, None), dtype=dt, param_dtype=pt,
                                 name="to_voxels")(features).transpose(0, 3, 1, 2)  # (B, k, N, V)
        per_voxel = unpatchify(per_voxel.reshape(b * k, *per_voxel.shape[2:]), cfg.patch, grid)
        per_voxel = per_voxel.reshape(b, k, *volume.shape[1:]).transpose(0, 2, 3, 4, 1)  # (B, D, H, W, k)
        raw = [volume]
        for axis in (1, 2, 3):  # the predecessor along z, y, x (edge-padded)
            pad = [(0, 0)] * 4
            pad[axis] = (1, 0)
            raw.append(jnp.pad(volume, pad, mode="edge")[tuple(slice(0, -1) if a == axis else slice(None)
                                                             for a in range(4))])
        x = jnp.concatenate([per_voxel.astype(jnp.float32), jnp.stack(raw, axis=-1)], axis=-1)
        x = DenseGeneral((k + 4, self.hidden), (None, None), "bzyxc,ch->bzyxh", use_bias=True, bias_axes=(None,),
                         dtype=dt, param_dtype=pt, name="decoder_hidden")(x)
        logits = DenseGeneral((self.hidden, 3), (None, None), "bzyxh,hc->bczyx", use_bias=False,
                              dtype=dt, param_dtype=pt, name="decoder_out")(jax.nn.gelu(x))
        bias = self.param("decoder_bias", nn.initializers.zeros, (3,), pt)
        return (logits + bias[None, :, None, None, None]).astype(jnp.float32)


def affinity_logits(module: AffinityModel, params: Any, volume: jax.Array) -> jax.Array:
    """(B, D, H, W) standardised crops -> (B, 3, D, H, W) logits."""
    return module.apply({"params": params}, volume)


def bce_objective(module: AffinityModel):
    """Class-balanced binary cross-entropy over the valid affinities of a batch (``volume``,
    ``affinity``, ``mask``): cut edges (~10% of them) weigh as much in total as joined ones, as
    affinity training usually does, so the boundaries are not drowned; ``weight`` 1."""

    def objective(params, batch, rng):
        del rng
        logits = affinity_logits(module, params, batch["volume"])
        target, mask = batch["affinity"], batch["mask"]
        nll = jnp.maximum(logits, 0) - logits * target + jnp.log1p(jnp.exp(-jnp.abs(logits)))
        pos, neg = jnp.sum(mask * target), jnp.sum(mask * (1 - target))
        balance = mask * jnp.where(target > 0.5, 0.5 / jnp.maximum(pos, 1.0), 0.5 / jnp.maximum(neg, 1.0))
        return jnp.sum(nll * balance), {"weight": jnp.float32(1.0)}

    return objective


# ---------------------------------------------------------------------------------------------
# Fine-tuning and prediction


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Affinity fine-tuning.

    Attributes:
      crop: (z, y, x) of each training crop (a multiple of the backbone's patch).
      steps, batch: optimizer steps and crops per step.
      lr, warmup_steps, weight_decay: AdamW with warmup and cosine decay.
      seed: head init, crop positions and augmentation.
    """

    crop: tuple[int, ...] = (16, 64, 64)
    steps: int = 200
    batch: int = 4
    lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.05
    seed: int = 0


def labelled_batches(volumes: Sequence[tuple[np.ndarray, np.ndarray]], crop: Sequence[int], batch: int, seed: int):
    """Endless augmented batches ``{"volume", "affinity", "mask"}`` of random crops of
    ``(image, labels)`` pairs (affinities computed after the flips, so they stay exact)."""
    if not volumes:
        raise ValueError("fine-tuning needs at least one labelled volume")
    rng = np.random.default_rng(seed)
    while True:
        rows = []
        for _ in range(batch):
            image, labels = volumes[int(rng.integers(len(volumes)))]
            img, lab = random_crop(image, crop, rng, None, (labels,))
            img, lab = augment(rng, standardize(img), lab)
            aff, mask = affinities(lab)
            rows.append((img, aff, mask))
        yield {k: np.stack([r[i] for r in rows]) for i, k in enumerate(("volume", "affinity", "mask"))}


def finetune_affinities(model_config: VisionConfig, volumes: Sequence[tuple[np.ndarray, np.ndarray]],
                        config: FinetuneConfig = FinetuneConfig(), backbone_params: Any = None,
                        mesh: jax.sharding.Mesh | None = None) -> tuple[Any, list[float]]:
    """``(params, losses)``: an :class:`AffinityModel` trained on ``volumes`` (image, labels)
    pairs, its backbone starting from ``backbone_params`` (None: from scratch)."""
    from jaxtok.sharding import make_mesh
    from jaxtok.train.trainer import OptimizerConfig, Trainer, TrainTask, place_params

    check_patch(config.crop, model_config.patch)
    module = AffinityModel(model_config)

    def init_fn(rng):
        return module.init(rng, jnp.zeros((1, *config.crop), jnp.float32))["params"]

    optimizer = OptimizerConfig(lr=config.lr, warmup_steps=config.warmup_steps, weight_decay=config.weight_decay)
    trainer = Trainer(TrainTask(init_fn=init_fn, objective=bce_objective(module)), optimizer,
                      mesh if mesh is not None else make_mesh(None, jax.devices()[:1]), total_steps=config.steps,
                      seed=config.seed)
    state = trainer.init_state(jax.random.key(config.seed))
    if backbone_params is not None:
        # swap the pretrained backbone into the fresh state: Adam's moments start at zero for any
        # parameters, so only the parameter tree changes (and no second init program compiles)
        backbone = place_params(backbone_params, trainer.abstract_state.params["backbone"])
        state = state.replace(params={**state.params, "backbone": backbone})
    losses = []
    data = labelled_batches(volumes, config.crop, config.batch, config.seed)
    for _ in range(config.steps):
        state, metrics = trainer.train_step(state, trainer.device_batch(next(data)))
        losses.append(float(metrics["loss"]))
    return jax.device_get(state.params), losses


def predict_affinities(model_config: VisionConfig, params: Any, image: np.ndarray, crop: Sequence[int],
                       batch: int = 4) -> np.ndarray:
    """(3, z, y, x) affinity probabilities of a whole volume, tile by tile (tiles of ``crop``,
    each standardised like the training crops; the volume must be a multiple of ``crop``)."""
    image = np.asarray(image, np.float32)
    if image.ndim != 3 or any(s % c for s, c in zip(image.shape, crop)):
        raise ValueError(f"the volume {image.shape} must be 3-D and a multiple of the tile {tuple(crop)}")
    module = AffinityModel(model_config)
    forward = jax.jit(lambda p, v: jax.nn.sigmoid(affinity_logits(module, p, v)))
    starts = [(z, y, x) for z in range(0, image.shape[0], crop[0]) for y in range(0, image.shape[1], crop[1])
              for x in range(0, image.shape[2], crop[2])]
    out = np.zeros((3, *image.shape), np.float32)
    for i in range(0, len(starts), batch):
        group = starts[i:i + batch]
        tiles = [standardize(image[z:z + crop[0], y:y + crop[1], x:x + crop[2]]) for z, y, x in group]
        tiles += [tiles[-1]] * (batch - len(tiles))  # one compiled shape
        probs = np.asarray(forward(params, jnp.asarray(np.stack(tiles))))
        for (z, y, x), p in zip(group, probs):
            out[:, z:z + crop[0], y:y + crop[1], x:x + crop[2]] = p
    return out


# ---------------------------------------------------------------------------------------------
# Agglomeration and metrics


def boundary_map(affinity: np.ndarray) -> np.ndarray:
    """(z, y, x): 1 - the mean of the 6 affinities touching each voxel (its 3 predecessors' edges
    and its 3 successors'), so that both sides of a cell boundary are marked."""
    total = affinity.sum(axis=0)
    count = np.full(affinity.shape[1:], 3.0, np.float32)
    for c in range(3):
        here = [slice(None)] * 3
        here[c] = slice(None, -1)
        after = [slice(None)] * 3
        after[c] = slice(1, None)
        total[tuple(here)] += affinity[(c, *after)]
        count[tuple(here)] += 1.0
    return 1.0 - total / count


def segment(affinity: np.ndarray, seed_threshold: float = 0.7, min_seed_size: int = 20,
            smooth: float = 0.5) -> np.ndarray:
    """Instance labels (z, y, x) int32 >= 1 from (3, z, y, x) affinities: connected components of
    the voxels joined by affinities above ``seed_threshold`` (components smaller than
    ``min_seed_size`` voxels are not seeds), then a watershed of :func:`boundary_map` from them.
    The seeds come from Gaussian-smoothed affinities (``smooth`` voxels in x-y, a quarter of it
    in z), so that one noisy edge cannot join two cells; the watershed runs on the raw ones."""
    from scipy import ndimage
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from skimage.segmentation import watershed

    affinity = np.asarray(affinity, np.float32)
    if affinity.ndim != 4 or affinity.shape[0] != 3:
        raise ValueError(f"affinity must be (3, z, y, x), got shape {affinity.shape}")
    boundary = boundary_map(affinity)  # the watershed runs on the unsmoothed map
    if smooth > 0:
        affinity = np.stack([ndimage.gaussian_filter(a, (smooth / 4, smooth, smooth)) for a in affinity])
    shape = affinity.shape[1:]
    index = np.arange(int(np.prod(shape))).reshape(shape)
    rows, cols = [], []
    for c in range(3):
        here = [slice(None)] * 3
        here[c] = slice(1, None)
        before = [slice(None)] * 3
        before[c] = slice(None, -1)
        joined = affinity[(c, *here)] > seed_threshold
        rows.append(index[tuple(here)][joined])
        cols.append(index[tuple(before)][joined])
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(index.size, index.size))
    _, component = connected_components(graph, directed=False)
    sizes = np.bincount(component)
    keep = sizes[component] >= min_seed_size
    # seeds numbered 1..K; small components get -1, which np.unique sorts first, to id 0 ("no seed")
    _, markers = np.unique(np.where(keep, component, -1), return_inverse=True)
    markers = markers.reshape(shape).astype(np.int32) + (1 if keep.all() else 0)
    if markers.max() == 0:
        return np.ones(shape, np.int32)  # no confident region at all: one segment
    return watershed(boundary, markers=markers).astype(np.int32)


def tune_seed_threshold(affinity: np.ndarray, labels: np.ndarray,
                        thresholds: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
                        ) -> tuple[float, dict[float, float]]:
    """``(threshold, VOI per threshold)``: the :func:`segment` seed threshold with the lowest
    VOI on a labelled validation volume (ties: the lower threshold). Where a model's
    probabilities sit depends on its training (class-balanced BCE shifts them down), so a fair
    comparison of models tunes this one agglomeration parameter per model, on validation data."""
    if not thresholds:
        raise ValueError("give at least one seed threshold to try")
    voi = {float(th): evaluate_segmentation(labels, segment(affinity, seed_threshold=th))["voi"] for th in thresholds}
    return min(voi, key=lambda th: (voi[th], th)), voi


def evaluate_segmentation(gt: np.ndarray, seg: np.ndarray) -> dict[str, float]:
    """``voi_split`` = H(seg | gt), ``voi_merge`` = H(gt | seg) (bits), their sum ``voi``, and
    the adapted Rand error ``arand`` (label 0 of ``gt`` ignored, as skimage does)."""
    from skimage.metrics import adapted_rand_error, variation_of_information

    gt, seg = np.asarray(gt), np.asarray(seg)
    if gt.shape != seg.shape:
        raise ValueError(f"ground truth {gt.shape} and segmentation {seg.shape} differ in shape")
    split, merge = variation_of_information(gt, seg)  # H(seg|gt), H(gt|seg)
    with np.errstate(invalid="ignore", divide="ignore"):  # no voxel pairs at all: nan, not a warning
        are = adapted_rand_error(gt, seg)[0]
    return {"voi_split": float(split), "voi_merge": float(merge), "voi": float(split + merge), "arand": float(are)}
