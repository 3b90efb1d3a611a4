"""Device meshes and the logical-axis rules that place parameters and activations on them.

Every parameter and constrained activation carries logical axis names (``vocab``, ``embed``,
``heads`` ...). One rules table per kind (parameters vs activations, as levanter keeps them apart)
maps names to mesh axes ``data``, ``fsdp``, ``tensor``. A mesh axis that does not divide a
dimension is dropped for that dimension (replicated) instead of failing: SmolLM2 has 9 heads,
which no even tensor-parallel degree divides.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Where parameters live: FSDP shards the embedding dimension, tensor parallelism the wide ones.
PARAM_RULES: Rules = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("param_tokens", "tensor"),
    ("state", None),
    ("inner", "tensor"),  # Mamba's expanded channels (d_inner)
    ("groups", None),  # Mamba-2's B/C groups (few; replicated)
    ("conv", None),  # conv taps
    ("layers", None),
    ("pos", None),
    ("norm", None),
)

# Where activations live: the batch is split over every data-like axis.
ACTIVATION_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("param_tokens", "tensor"),
    ("state", None),
    ("inner", "tensor"),
)


def parse_mesh_shape(text: str) -> dict[str, int]:
    """Parses ``data=2,fsdp=2,tensor=2`` (missing axes are 1; one -1 takes the devices left)."""
    shape = {axis: 1 for axis in MESH_AXES}
    if not text:
        return shape
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise ValueError(f"bad mesh item {item!r}: expected one of {MESH_AXES} as name=int")
        try:
            shape[name] = int(value)
        except ValueError:
            raise ValueError(f"bad mesh size in {item!r}: not an integer") from None
        if shape[name] < 1 and shape[name] != -1:
            raise ValueError(f"bad mesh size in {item!r}: must be >= 1 (or -1: the devices left)")
    return shape


def make_mesh(shape: Mapping[str, int] | str | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over ``devices`` with axes (data, fsdp, tensor), all of type Auto.

    ``shape`` may omit axes (size 1); with no shape every device goes to ``data``. One size of -1
    takes the devices that remain.
    """
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(shape, str):
        shape = parse_mesh_shape(shape)
    sizes = {axis: 1 for axis in MESH_AXES}
    if shape is None:
        sizes["data"] = len(devices)
    else:
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"unknown mesh axes {sorted(unknown)}; valid: {MESH_AXES}")
        sizes.update(shape)
        free = [a for a, s in sizes.items() if s == -1]
        if len(free) > 1:
            raise ValueError("at most one mesh axis may be -1")
        if free:
            rest = math.prod(s for a, s in sizes.items() if s != -1)
            sizes[free[0]] = len(devices) // rest
    total = math.prod(sizes.values())
    if total != len(devices):
        raise ValueError(
            f"mesh {sizes} needs {total} devices but {len(devices)} are available"
        )
    grid = np.asarray(devices, dtype=object).reshape(tuple(sizes[a] for a in MESH_AXES))
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _mesh_axis_size(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[n] for n in names)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int] | None,
    mesh: Mesh,
    rules: Rules,
) -> PartitionSpec:
    """Maps logical names to a PartitionSpec, replicating dims that a mesh axis does not divide
    and never using one mesh axis twice."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical_axes):
        target = table.get(name) if name is not None else None
        if target is not None:
            names = (target,) if isinstance(target, str) else tuple(target)
            names = tuple(n for n in names if n in mesh.shape and n not in used and mesh.shape[n] > 1)
            if shape is not None:
                # keep the longest prefix of mesh axes whose product divides the dimension
                while names and shape[i] % _mesh_axis_size(mesh, names) != 0:
                    names = names[:-1]
            used.update(names)
            target = None if not names else (names[0] if len(names) == 1 else names)
        spec.append(target)
    return PartitionSpec(*spec)


def param_logical_axes(boxed_tree: Any) -> Any:
    """Logical axis names of an ``init`` output (boxed by ``nn.with_logical_partitioning``)."""
    return nn.get_partition_spec(boxed_tree)


def tree_shardings(abstract_tree: Any, logical_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree of arrays (or ShapeDtypeStructs) with logical PartitionSpecs."""

    def one(leaf, logical):
        axes = tuple(logical) if logical is not None else (None,) * len(leaf.shape)
        return NamedSharding(mesh, logical_to_spec(axes, leaf.shape, mesh, rules))

    return jax.tree.map(one, abstract_tree, logical_tree, is_leaf=lambda x: isinstance(x, PartitionSpec))


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules: Rules = ACTIVATION_RULES):
    """Sharding constraint by logical names under the ambient mesh (``jax.set_mesh``); a no-op
    when no mesh is set, so models also run unsharded."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(logical_axes, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, spec)
