"""Mamba-1/Mamba-2 LMs: parity with transformers (logits, greedy continuation, folder loader),
decoding with the recurrent cache equals the full forward, padding and packing invariances, the
bidirectional variant, sharding on a mesh, FLOPs and the family registry."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerance import assert_close_at_scale, reduction_rtol
from flax import linen as nn
from test_ssm import fast_jit

from jaxtok.decode.generate import generate
from jaxtok.models.mamba import PRESETS, Mamba, MambaCache, MambaConfig
from jaxtok.sharding import PARAM_RULES, make_mesh, param_logical_axes, tree_shardings
from jaxtok.train import configs
from jaxtok.train.flops import model_flops_per_token

# Test time is compile time: every test below shares one config per version, one token shape
# (2, 21) and the compiled functions of this module. The configs are exactly what the
# transformers loader returns for the tiny transformers models of the parity test (asserted
# there), so the parity forward reuses the same executable. The default scan path runs (AUTO:
# SEQUENTIAL for Mamba-1, CHUNKED over 3 chunks of 8 for Mamba-2: 21 is not a multiple of 8).
TINY = {1: MambaConfig(version=1, vocab_size=64, d_model=32, n_layers=2, d_state=8, dt_rank=2),
        2: MambaConfig(version=2, vocab_size=64, d_model=32, n_layers=2, d_state=8, head_dim=16, n_groups=2,
                       chunk_size=8, tie_embeddings=False)}
BATCH, LENGTH = 2, 21


@functools.cache
def forward(cfg: MambaConfig):
    """Compiled ``(params, tokens, segment_ids) -> logits`` of one config."""
    return fast_jit(lambda p, t, s: Mamba(cfg).apply({"params": p}, t, segment_ids=s).logits)


def init_fn(cfg: MambaConfig):
    """``key -> boxed params`` (logical axis names kept)."""
    return lambda key: Mamba(cfg).init(key, jnp.zeros((1, 8), jnp.int32))["params"]


@functools.cache
def init(cfg: MambaConfig):
    return fast_jit(init_fn(cfg))


def plain(cfg, params, tokens):
    """Logits of unpacked, unpadded rows."""
    return forward(cfg)(params, jnp.asarray(tokens), jnp.ones(np.shape(tokens), jnp.int32))


@functools.cache
def model_and_params_of(version):
    cfg = TINY[version]
    return cfg, nn.unbox(init(cfg)(jax.random.PRNGKey(version)))


@pytest.fixture(scope="module", params=[1, 2], ids=["mamba1", "mamba2"])
def model_and_params(request):
    return model_and_params_of(request.param)


def random_tokens(seed, shape=(BATCH, LENGTH)):
    return np.random.RandomState(seed).randint(0, 64, shape).astype(np.int32)


# ----------------------------------------------------------------------------- transformers


def _hf_model(version):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(version)
    if version == 1:
        hc = transformers.MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8)
        model = transformers.MambaForCausalLM(hc)
    else:
        hc = transformers.Mamba2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8,
                                       num_heads=4, head_dim=16, n_groups=2, chunk_size=8)
        model = transformers.Mamba2ForCausalLM(hc)
    with torch.no_grad():  # move the ones/identity inits off their special values
        for name, value in model.named_parameters():
            if name.endswith(("A_log", ".D", "dt_bias", "dt_proj.bias")) or "norm" in name:
                value.add_(0.3 * torch.randn_like(value))
    return model.eval()


@pytest.mark.reference
@pytest.mark.parametrize("version", [1, 2])
def test_parity_with_transformers(version, tmp_path):
    """Logits of the folder loader's model equal transformers'; Mamba-2's greedy continuations
    are the same, one prompt left-padded in the batch (family-generic ``generate``, MambaCache)."""
    import torch

    from jaxtok.io.mamba_hf import load_mamba_folder

    model = _hf_model(version)
    model.save_pretrained(tmp_path)
    cfg, params = load_mamba_folder(tmp_path)
    assert cfg == TINY[version]
    params = jax.device_put(params)
    tokens = random_tokens(version)
    with torch.no_grad():
        want = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    got = np.asarray(plain(cfg, params, tokens))
    assert_close_at_scale(got, want, rtol=reduction_rtol(cfg.d_inner * cfg.d_state * cfg.n_layers))
    if version == 1:
        # Mamba-1 decoding: its cache steps equal the full forward (test_decode_steps_...), which
        # equals transformers' here; a second generate compile (~6 s) would add no new code path
        return
    prompts = [tokens[0].tolist(), tokens[1, :9].tolist()]  # the second is left-padded
    ours = generate(Mamba(cfg), params, prompts, max_new_tokens=6, eos_id=-1, pad_id=0)
    for prompt, continuation in zip(prompts, ours):
        with torch.no_grad():
            hf = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt):]
        assert continuation == hf.tolist()


# ----------------------------------------------------------------------------- decoding, packing


def test_decode_steps_equal_full_forward(model_and_params):
    cfg, params = model_and_params
    tokens = random_tokens(0)
    model = Mamba(cfg)
    step = fast_jit(lambda p, c, t: model.apply({"params": p}, t, cache=c))
    cache, steps = model.init_cache(BATCH), []
    for i in range(LENGTH):  # one token at a time from the empty cache
        out = step(params, cache, jnp.asarray(tokens[:, i:i + 1]))
        cache = out.cache
        steps.append(out.logits)
    assert int(cache.end) == LENGTH and cache.grow(8) is cache
    assert_close_at_scale(jnp.concatenate(steps, axis=1), plain(cfg, params, tokens), rtol=1e-5)


def test_packed_and_padded_documents_equal_fresh_ones(model_and_params):
    # row 0: document a (7) and b (10) packed, then right padding; row 1: b left-padded.
    # b must read the same in both: the state and the conv window restart at b, padding
    # (segment 0) leaves them untouched.
    cfg, params = model_and_params
    rng = np.random.RandomState(1)
    a, b = rng.randint(1, 64, 7), rng.randint(1, 64, 10)
    tokens = np.zeros((BATCH, LENGTH), np.int32)
    segments = np.zeros((BATCH, LENGTH), np.int32)
    tokens[0, :17], segments[0, :17] = np.concatenate([a, b]), [1] * 7 + [2] * 10
    tokens[1, 11:], segments[1, 11:] = b, 1
    got = forward(cfg)(params, jnp.asarray(tokens), jnp.asarray(segments))
    assert_close_at_scale(got[0, 7:17], got[1, 11:], rtol=1e-5)
    # and not trivially: without the packing information b reads a (and row 1 reads padding)
    unpacked = plain(cfg, params, tokens)
    assert float(jnp.max(jnp.abs(unpacked[0, 7:17] - got[1, 11:]))) > 1e-3


def test_bidirectional_reads_the_future_and_causal_does_not():
    cfg, params = model_and_params_of(2)  # the reversed mixer is the same code for both versions
    bi = dataclasses.replace(cfg, bidirectional=True)
    other = nn.unbox(init(cfg)(jax.random.PRNGKey(7)))
    bi_params = {**params, "blocks": {**params["blocks"], "mixer_reverse": other["blocks"]["mixer"]}}
    shapes = jax.eval_shape(init_fn(bi), jax.random.PRNGKey(0))
    assert jax.tree.structure(nn.unbox(shapes)) == jax.tree.structure(bi_params)
    tokens = random_tokens(2)
    tokens[1] = tokens[0]
    tokens[1, -1] = (tokens[0, -1] + 1) % 64  # row 1: only the last token changed
    got = plain(bi, bi_params, tokens)
    assert float(jnp.max(jnp.abs(got[0, 0] - got[1, 0]))) > 1e-6
    causal = plain(cfg, params, tokens)
    np.testing.assert_array_equal(causal[0, :-1], causal[1, :-1])
    # reversing the input while swapping the two mixers' weights reverses the output
    swapped = {**params, "blocks": {**params["blocks"], "mixer": other["blocks"]["mixer"],
                                    "mixer_reverse": params["blocks"]["mixer"]}}
    flipped = plain(bi, swapped, tokens[:, ::-1].copy())[:, ::-1]
    assert_close_at_scale(flipped, got, rtol=1e-5)
    with pytest.raises(ValueError, match="bidirectional"):
        MambaCache.create(bi, 1)


# ----------------------------------------------------------------------------- sharding, flops, registry


def test_sharded_forward_equals_single_device():
    cfg, params = model_and_params_of(2)  # heads over the tensor axis (Mamba-1's d_inner: the same rule)
    mesh = make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4])
    boxed = jax.eval_shape(init_fn(cfg), jax.random.PRNGKey(0))
    shardings = tree_shardings(params, param_logical_axes(boxed), mesh, PARAM_RULES)
    # (layers, heads, head_dim, embed): heads split over the tensor axis
    assert shardings["blocks"]["mixer"]["out_proj"].spec[1] == "tensor"
    tokens = random_tokens(4)
    want = plain(cfg, params, tokens)
    with jax.set_mesh(mesh):
        sharded = fast_jit(lambda p, t: Mamba(cfg).apply({"params": p}, t).logits)
        got = sharded(jax.device_put(params, shardings), jnp.asarray(tokens))
    assert_close_at_scale(got, want, rtol=reduction_rtol(cfg.d_inner * cfg.n_layers))


def test_flops_and_registry():
    cfg = PRESETS["mamba-130m"]
    d, di, n, r, k = 768, 1536, 16, 48, 4
    per_layer = d * 2 * di + k * di + di * (r + 2 * n) + r * di + di * d
    assert cfg.matmul_params() == 24 * per_layer + 50280 * d
    assert model_flops_per_token(cfg, 2048) == 3 * (2 * cfg.matmul_params() + 6 * 24 * di * n)
    assert 125e6 < cfg.num_params() < 135e6  # "130m"
    assert 120e6 < PRESETS["mamba2-130m"].num_params() < 135e6
    for name in ("mamba-tiny", "mamba2-tiny"):
        family = configs.model_family(name)
        assert family.module_cls is Mamba and family.data is configs.TEXT and family.task is configs.next_token_task
        assert configs.get_config(name).model == name
    with pytest.raises(ValueError, match="version"):
        MambaConfig(version=3)
    with pytest.raises(ValueError, match="head_dim"):
        MambaConfig(version=2, d_model=64, head_dim=48)
    with pytest.raises(ValueError):
        MambaConfig(scan="fastest")
