"""Meshes, logical-axis rules and sharded forward passes on the 8-device CPU mesh."""

import dataclasses

import jax
import numpy as np
import pytest
from _tolerance import assert_close_at_scale, reduction_rtol
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxtok.models.llama import PRESETS, Llama, init_params
from jaxtok.sharding import ACTIVATION_RULES, PARAM_RULES, logical_to_spec, make_mesh, parse_mesh_shape, tree_shardings
from jaxtok.train.trainer import place_params

# 8 kv heads / 8 heads so tensor parallelism really splits heads in the tiny model
CFG = dataclasses.replace(PRESETS["llama-tiny"], n_heads=8, n_kv_heads=4, head_dim=8)


def test_parse_and_make_mesh():
    assert parse_mesh_shape("data=2,tensor=4") == {"data": 2, "fsdp": 1, "tensor": 4}
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh({"fsdp": -1}).shape)["fsdp"] == 8
    assert dict(make_mesh().shape)["data"] == 8
    for bad in ["data=3", "pipeline=2", "data=x", "data"]:
        with pytest.raises(ValueError):
            make_mesh(bad)


def test_rules_replicate_dims_that_do_not_divide():
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    # SmolLM2: 9 heads cannot split over tensor=2, the embedding dim 576 can over fsdp=2
    assert logical_to_spec(("embed", "heads", "head_dim"), (576, 9, 64), mesh, PARAM_RULES) == P("fsdp", None, None)
    assert logical_to_spec(("embed", "mlp"), (576, 1536), mesh, PARAM_RULES) == P("fsdp", "tensor")
    # batch uses both data axes; an odd batch falls back to the axes that divide it
    assert logical_to_spec(("batch", "length"), (8, 16), mesh, ACTIVATION_RULES) == P(("data", "fsdp"), None)
    assert logical_to_spec(("batch", "length"), (2, 16), mesh, ACTIVATION_RULES) == P("data", None)
    # a mesh axis is never used twice in one spec
    assert logical_to_spec(("mlp", "vocab"), (8, 8), mesh, ACTIVATION_RULES) == P("tensor", None)


def sharded_forward(mesh_shape: str, params, tokens):
    mesh = make_mesh(mesh_shape)
    boxed = jax.eval_shape(lambda: init_params(CFG, jax.random.key(0)))
    p_shard = tree_shardings(params, nn.get_partition_spec(boxed), mesh, PARAM_RULES)
    batch_shard = NamedSharding(mesh, logical_to_spec(("batch", "length"), tokens.shape, mesh, ACTIVATION_RULES))
    out_shard = NamedSharding(mesh, logical_to_spec(("batch", "length", "vocab"), (*tokens.shape, CFG.vocab_size),
                                                    mesh, ACTIVATION_RULES))
    # host -> mesh through the library's own placement (per-device slices by index): where a
    # wrong spec or index really scrambles numbers; a layout XLA picks inside jit cannot
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, p_shard)
    params = place_params(params, abstract)
    tokens = jax.device_put(tokens, batch_shard)

    def forward(p, t):
        return Llama(CFG).apply({"params": p}, t).logits

    with jax.set_mesh(mesh):
        logits = jax.jit(forward, in_shardings=(p_shard, batch_shard), out_shardings=out_shard)(params, tokens)
    return params, logits


@pytest.mark.parametrize("mesh_shape", ["data=8", "fsdp=8", "data=2,fsdp=2,tensor=2", "fsdp=2,tensor=4"])
def test_sharded_forward_equals_single_device(mesh_shape):
    params = nn.unbox(init_params(CFG, jax.random.key(0)))
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, CFG.vocab_size)
    single = jax.jit(lambda p, t: Llama(CFG).apply({"params": p}, t).logits)(params, tokens)
    sharded_params, sharded = sharded_forward(mesh_shape, params, tokens)
    # logits: sums over at most d_ff = 128 terms, chained through 2 layers
    assert_close_at_scale(sharded, single, rtol=reduction_rtol(CFG.d_ff * CFG.n_layers), err_msg=mesh_shape)
    mesh = dict(parse_mesh_shape(mesh_shape))
    q = sharded_params["blocks"]["q"]["kernel"]  # (layers, embed, heads, head_dim)
    expected_q = P(None, "fsdp" if mesh["fsdp"] > 1 else None, "tensor" if mesh["tensor"] > 1 else None, None)
    assert q.sharding.spec == expected_q
    # each device holds 1/(fsdp*tensor) of the weight
    shard_shape = q.addressable_shards[0].data.shape
    assert np.prod(shard_shape) * mesh["fsdp"] * mesh["tensor"] == np.prod(q.shape)
    if mesh["data"] * mesh["fsdp"] > 1:
        assert len({str(s.index) for s in sharded.addressable_shards}) > 1
