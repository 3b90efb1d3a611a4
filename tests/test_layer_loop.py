"""Every layer loop (``scan``, ``scan`` unrolled k, ``unrolled``) and remat policy (``none``,
``full``, ``dots_saveable``) gives the loss and gradients of the plain ``scan``, with and without
jit, on one parameter layout; decoding with each loop equals the full forward."""

import dataclasses
import functools

import chex
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import linen as nn

from jaxtok.decode.generate import generate
from jaxtok.models import llama, tokenformer
from jaxtok.models.llama import KVCache
from jaxtok.nn.layers import PER_LAYER, split_layers

FAMILIES = {
    "llama": (llama, llama.Llama, "llama-tiny"),
    "tokenformer": (tokenformer, tokenformer.TokenFormer, "tokenformer-tiny"),
}
OPTIONS = [  # (layer_loop, scan_unroll, remat)
    ("scan", 2, False),
    ("unrolled", 1, False),
    ("scan", 1, "full"),
    ("scan", 1, "dots_saveable"),
    ("unrolled", 1, True),
    ("unrolled", 1, "dots_saveable"),
]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    mod, cls, preset = FAMILIES[request.param]
    config = dataclasses.replace(mod.PRESETS[preset], n_layers=2)
    params = nn.unbox(mod.init_params(config, jax.random.key(0)))
    tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, config.vocab_size)
    return cls, config, params, tokens


def _loss_fn(cls, config, tokens):
    def loss(params):
        logits = cls(config).apply({"params": params}, tokens[:, :-1]).logits
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    return loss


@functools.cache
def _setup(name):
    mod, cls, preset = FAMILIES[name]
    config = dataclasses.replace(mod.PRESETS[preset], n_layers=2)
    params = nn.unbox(mod.init_params(config, jax.random.key(0)))
    tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, config.vocab_size)
    ref = jax.jit(jax.value_and_grad(_loss_fn(cls, config, tokens)))(params)
    return cls, config, params, tokens, ref


class LoopsGiveTheLossAndGradientsOfScan(chex.TestCase):
    """Every option under jit; without jit (slow: op by op) the two new code paths, the Python
    loop under jax.checkpoint and the named-matmul policy inside the scan."""

    @chex.variants(with_jit=True)
    @parameterized.parameters(*[("llama", o) for o in OPTIONS],
                              ("tokenformer", ("unrolled", 1, "dots_saveable")))
    def test_loop_and_remat(self, family, option):
        self._check(family, option)

    @chex.variants(without_jit=True)
    @parameterized.parameters(("llama", ("unrolled", 1, True)), ("tokenformer", ("scan", 1, "dots_saveable")))
    def test_loop_and_remat_eager(self, family, option):
        self._check(family, option)

    def _check(self, family, option):
        cls, config, params, tokens, (ref_loss, ref_grads) = _setup(family)
        loop, unroll, remat = option
        other = dataclasses.replace(config, layer_loop=loop, scan_unroll=unroll, remat=remat)
        loss, grads = self.variant(jax.value_and_grad(_loss_fn(cls, other, tokens)))(params)
        chex.assert_trees_all_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        chex.assert_trees_all_close(grads, ref_grads, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loop", ["scan", "unrolled"])
def test_same_parameter_layout_for_every_loop(family, loop):
    cls, config, _, _ = family
    mod = llama if cls is llama.Llama else tokenformer
    shapes = jax.eval_shape(lambda: mod.init_params(config, jax.random.key(0)))
    other = jax.eval_shape(lambda: mod.init_params(dataclasses.replace(config, layer_loop=loop), jax.random.key(0)))
    assert jax.tree.structure(shapes) == jax.tree.structure(other)
    assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(shapes), jax.tree.leaves(other)))
    assert all(leaf.shape[0] == config.n_layers for leaf in jax.tree.leaves(nn.unbox(shapes)["blocks"]))


@pytest.mark.parametrize("loop", ["scan", "unrolled"])
def test_cached_decode_with_each_loop_equals_full_forward(family, loop):
    cls, config, params, tokens = family
    model = cls(dataclasses.replace(config, layer_loop=loop))
    full = cls(config).apply({"params": params}, tokens).logits
    t = tokens.shape[1]

    @jax.jit
    def step(p, toks, cache):
        out = model.apply({"params": p}, toks, cache=cache)
        return out.logits, out.cache

    logits, cache = step(params, tokens[:, :t - 3], KVCache.create(config, tokens.shape[0], t))
    pieces = [logits]
    # the one-token steps read split per-layer weights (what generate does for "unrolled")
    step_params = split_layers(params) if loop == "unrolled" else params
    for i in range(t - 3, t):
        logits, cache = step(step_params, tokens[:, i:i + 1], cache)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5, rtol=1e-5)


def test_generate_tokens_equal_for_every_loop(family):
    cls, config, params, tokens = family
    prompts = [tokens[0, :5].tolist(), tokens[1, :9].tolist()]
    outs = {(p, d): generate(cls(config), params, prompts, max_new_tokens=6, eos_id=-1, pad_id=0,
                             prefill_loop=p, decode_loop=d)
            for p, d in [("scan", "scan"), ("scan", "unrolled")]}
    first = next(iter(outs.values()))
    assert all(out == first for out in outs.values())


def test_split_layers_keeps_values():
    config = llama.PRESETS["llama-tiny"]
    params = nn.unbox(llama.init_params(config, jax.random.key(0)))
    split = split_layers(params)
    assert len(split["blocks"][PER_LAYER]) == config.n_layers
    np.testing.assert_array_equal(split["blocks"][PER_LAYER][1]["q"]["kernel"], params["blocks"]["q"]["kernel"][1])
    assert split["embedding"] is params["embedding"]


@pytest.mark.parametrize("field,value", [("layer_loop", "while"), ("scan_unroll", 0), ("remat", "some")])
def test_unknown_loop_settings_fail_early(field, value):
    for mod, _, preset in FAMILIES.values():
        with pytest.raises(ValueError, match=field):
            dataclasses.replace(mod.PRESETS[preset], **{field: value})


def _primitive_counts(jaxpr) -> dict[str, int]:
    """Primitive name -> count over a closed jaxpr and every sub-jaxpr (scan/while/pjit/remat)."""
    counts: dict[str, int] = {}

    def walk(jx):
        for eqn in jx.eqns:
            counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    return counts


@pytest.mark.parametrize("loop", ["scan", "unrolled"])
def test_loop_choice_reaches_the_compiled_program(family, loop):
    """``unrolled`` really is a straight-line program (no scan over layers, one copy of each
    layer's matmuls per layer), forward and backward; ``scan`` keeps the layers in one scan."""
    cls, config, params, tokens = family
    other = dataclasses.replace(config, layer_loop=loop)
    jaxpr = jax.make_jaxpr(jax.grad(_loss_fn(cls, other, tokens)))(params)
    counts = _primitive_counts(jaxpr)
    if loop == "unrolled":
        assert counts.get("scan", 0) == 0, counts
    else:
        assert counts.get("scan", 0) >= 2, counts  # forward and backward scans over the layers
    # the stacked layer matmuls are as many in the program as their loop writes them
    dots = counts.get("dot_general", 0)
    scan_config = dataclasses.replace(config, layer_loop="scan")
    ref = _primitive_counts(jax.make_jaxpr(jax.grad(_loss_fn(cls, scan_config, tokens)))(params))
    if loop == "unrolled":
        assert dots > ref.get("dot_general", 0), (dots, ref.get("dot_general", 0))
