"""Downstream of TokenUnify: affinity targets, fine-tuning from a pretrained backbone, the
watershed agglomeration, and VOI / ARAND against hand-computed values and a plain twin."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxtok import neuroseg
from jaxtok.data import volumes
from jaxtok.models.vision_mamba import PRESETS, TokenUnifyModel


def test_affinities_on_a_hand_made_volume():
    labels = np.array([[[1, 1, 2]], [[1, 3, 2]]])  # (z 2, y 1, x 3)
    aff, mask = neuroseg.affinities(labels)
    np.testing.assert_array_equal(aff[2], [[[0, 1, 0]], [[0, 0, 0]]])  # x: (1,1) same, (1,2) not; (1,3), (3,2) not
    np.testing.assert_array_equal(aff[0], [[[0, 0, 0]], [[1, 0, 1]]])  # z: slice 1 vs slice 0
    np.testing.assert_array_equal(mask[2], [[[0, 1, 1]], [[0, 1, 1]]])  # no x neighbour before x = 0
    np.testing.assert_array_equal(mask[1], 0)  # a single y row: no y neighbours at all


# ---------------------------------------------------------------------------------------------
# metrics


def test_voi_and_arand_on_hand_computed_cases():
    gt = np.array([1, 1, 2, 2]).reshape(1, 1, 4)
    merged = neuroseg.evaluate_segmentation(gt, np.ones_like(gt))
    assert merged["voi_split"] == pytest.approx(0.0, abs=1e-12) and merged["voi_merge"] == pytest.approx(1.0)
    # contingency (2, 2): sum n_ij^2 = 8, sum a_i^2 = 8, sum b_j^2 = 16, n = 4:
    # P = (8 - 4) / (16 - 4) = 1/3, R = (8 - 4) / (8 - 4) = 1, ARAND = 1 - 2PR / (P + R) = 0.5
    assert merged["arand"] == pytest.approx(0.5)
    split = neuroseg.evaluate_segmentation(gt, np.array([1, 2, 3, 4]).reshape(1, 1, 4))
    assert split["voi_split"] == pytest.approx(1.0) and split["voi_merge"] == pytest.approx(0.0, abs=1e-12)
    same = neuroseg.evaluate_segmentation(gt, 7 - gt)  # a relabelling is a perfect segmentation
    assert same["voi"] == pytest.approx(0.0, abs=1e-12) and same["arand"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="differ in shape"):
        neuroseg.evaluate_segmentation(gt, gt[..., :3])


def _plain_metrics(gt, seg):
    """VOI (bits) and ARAND from the contingency table, written out directly."""
    n = gt.size
    pairs = {}
    for a, b in zip(gt.ravel(), seg.ravel()):
        pairs[(a, b)] = pairs.get((a, b), 0) + 1
    rows, cols = {}, {}
    for (a, b), c in pairs.items():
        rows[a] = rows.get(a, 0) + c
        cols[b] = cols.get(b, 0) + c
    h_seg_given_gt = -sum(c / n * np.log2(c / rows[a]) for (a, b), c in pairs.items())
    h_gt_given_seg = -sum(c / n * np.log2(c / cols[b]) for (a, b), c in pairs.items())
    sum_ij = sum(c * c for c in pairs.values())
    sum_gt, sum_seg = sum(c * c for c in rows.values()), sum(c * c for c in cols.values())
    if sum_gt == n or sum_seg == n:  # all singletons on one side: no pair of voxels, ARAND undefined
        return h_seg_given_gt, h_gt_given_seg, None
    precision, recall = (sum_ij - n) / (sum_seg - n), (sum_ij - n) / (sum_gt - n)
    arand = 1.0 - 2 * precision * recall / (precision + recall) if precision + recall > 0 else 1.0
    return h_seg_given_gt, h_gt_given_seg, arand


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(1, 5)), min_size=2, max_size=40))
def test_metrics_equal_their_plain_twin(pairs):
    gt = np.array([a for a, _ in pairs]).reshape(1, 1, -1)
    seg = np.array([b for _, b in pairs]).reshape(1, 1, -1)
    got = neuroseg.evaluate_segmentation(gt, seg)
    split, merge, arand = _plain_metrics(gt, seg)
    np.testing.assert_allclose([got["voi_split"], got["voi_merge"]], [split, merge], atol=1e-9)
    if arand is not None:
        np.testing.assert_allclose(got["arand"], arand, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# agglomeration


def test_segment_recovers_cells_from_their_affinities():
    labels = np.ones((4, 12, 12), np.int32)
    labels[:, :, 6:] = 2
    labels[:, 8:, :] = 3
    aff, _ = neuroseg.affinities(labels)
    seg = neuroseg.segment(aff, min_seed_size=4, smooth=0.0)
    assert neuroseg.evaluate_segmentation(labels, seg)["voi"] == pytest.approx(0.0, abs=1e-9)
    _, cells = volumes.synthetic_volume((8, 48, 48), seed=2)
    aff, _ = neuroseg.affinities(cells)
    noisy = np.clip(aff + np.random.default_rng(0).normal(0, 0.3, aff.shape), 0, 1)
    scores = neuroseg.evaluate_segmentation(cells, neuroseg.segment(noisy, seed_threshold=0.9))
    everything_merged = neuroseg.evaluate_segmentation(cells, np.ones_like(cells))
    assert scores["voi"] < 0.3 * everything_merged["voi"] and scores["arand"] < 0.4
    with pytest.raises(ValueError, match=r"affinity must be \(3, z, y, x\)"):
        neuroseg.segment(aff[:2])


def test_seed_threshold_is_tuned_to_where_the_probabilities_sit():
    labels = np.ones((4, 12, 12), np.int32)
    labels[:, :, 6:] = 2
    labels[:, 8:, :] = 3
    aff, _ = neuroseg.affinities(labels)
    shy = 0.5 * aff  # a model whose joined edges score 0.5: at 0.9 nothing is a seed, all is one cell
    threshold, voi = neuroseg.tune_seed_threshold(shy, labels, (0.9, 0.3))
    assert threshold == 0.3 and voi[0.3] == pytest.approx(0.0, abs=1e-9)
    assert voi[0.9] == pytest.approx(neuroseg.evaluate_segmentation(labels, np.ones_like(labels))["voi"])
    threshold, voi = neuroseg.tune_seed_threshold(aff, labels, (0.9, 0.8, 0.6))
    assert threshold == 0.6 and voi[0.8] == voi[0.6] == pytest.approx(0.0, abs=1e-9) and voi[0.9] > 1  # tie: the lower
    with pytest.raises(ValueError, match="at least one seed threshold"):
        neuroseg.tune_seed_threshold(aff, labels, ())


# ---------------------------------------------------------------------------------------------
# fine-tuning


def test_finetuning_starts_from_the_pretrained_backbone_and_predicts_affinities():
    cfg = dataclasses.replace(PRESETS["vision-mamba-tiny"], n_layers=1)
    pretrained = nn.unbox(TokenUnifyModel(cfg).init(jax.random.key(3), jnp.zeros((1, 64, 128)))["params"])
    image, labels = volumes.synthetic_volume((8, 32, 64), seed=1)
    config = neuroseg.FinetuneConfig(crop=(8, 32, 32), steps=2, batch=2, lr=0.0)
    params, losses = neuroseg.finetune_affinities(cfg, [(image, labels)], config, pretrained["backbone"])
    # lr 0: the backbone is exactly the pretrained one, the head a fresh one
    jax.tree.map(np.testing.assert_array_equal, params["backbone"], jax.device_get(pretrained["backbone"]))
    assert set(params) == {"backbone", "to_voxels", "decoder_hidden", "decoder_out", "decoder_bias"}
    assert len(losses) == 2 and all(0.1 < loss < 2.0 for loss in losses)  # ~ln 2 for an untrained head
    probs = neuroseg.predict_affinities(cfg, params, image, config.crop, batch=2)
    assert probs.shape == (3, 8, 32, 64) and 0.0 < probs.min() and probs.max() < 1.0
    with pytest.raises(ValueError, match="multiple of the tile"):
        neuroseg.predict_affinities(cfg, params, image[:, :30], config.crop)
