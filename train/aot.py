"""Ahead-of-time compilation of the sharded train step for hardware this machine does not have.

``jax.experimental.topologies`` describes a TPU slice (libtpu compiles for it on a CPU host), so
a full-size config is checked before a pod is booked: memory that does not fit is a compile-time
error, and ``memory_analysis()`` / ``cost_analysis()`` report what the step needs.

    python -m jaxtok.train.aot --model smollm2-135m --topology v5e:2x2 --mesh fsdp=4 --batch 16 --seq-len 2048
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import topologies

from jaxtok.sharding import make_mesh

# topology name -> chips per host, as get_topology_desc wants them
_CHIPS_PER_HOST = {"v4": (2, 2, 1), "v5p": (2, 2, 1), "v5e": (2, 2, 1), "v6e": (2, 2, 1)}


def tpu_devices(topology: str, num_slices: int = 1) -> list[Any]:
    """Abstract devices of a TPU slice such as ``v5e:2x2`` (needs ``pip install libtpu``)."""
    generation = topology.split(":")[0]
    if generation not in _CHIPS_PER_HOST:
        raise ValueError(f"unknown TPU generation in {topology!r}; known: {sorted(_CHIPS_PER_HOST)}")
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topology, chip_config_name="default",
        chips_per_host_bounds=_CHIPS_PER_HOST[generation], num_slices=num_slices,
        wrap=(False, False, False))
    return list(desc.devices)


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """What compiling one train step for a target found."""

    num_params: int
    memory: dict[str, int]
    flops: float | None

    def summary(self) -> dict[str, Any]:
        return {"num_params": self.num_params, **self.memory, "flops": self.flops}


def _memory(compiled) -> dict[str, int]:
    stats = compiled.memory_analysis()
    names = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
             "alias_size_in_bytes", "generated_code_size_in_bytes")
    return {n: int(getattr(stats, n)) for n in names if hasattr(stats, n)}


def compile_train_step(model: str, devices: list[Any], mesh: str, batch: int, seq_len: int,
                       dtype: str = "bfloat16", remat: bool = True) -> CompiledStep:
    """Compiles the trainer's sharded step for ``model`` (a preset) on ``devices``; nothing is
    allocated: parameters, optimizer state and batch are abstract."""
    from jaxtok.train import OptimizerConfig, Trainer, lm_task
    from jaxtok.train.configs import model_family

    family = model_family(model)
    config = dataclasses.replace(family.presets[model], dtype=dtype, param_dtype="float32")
    if remat and "remat" in {f.name for f in dataclasses.fields(config)}:
        config = dataclasses.replace(config, remat=True)
    mesh_obj = make_mesh(mesh, devices)
    trainer = Trainer(lm_task(family.module_cls(config)), OptimizerConfig(), mesh_obj, total_steps=1000)
    batch_struct = {name: jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=trainer.batch_sharding)
                    for name in ("tokens", "targets", "positions", "segment_ids", "loss_mask")}
    batch_struct["num_bytes"] = jax.ShapeDtypeStruct((batch,), jnp.int32)
    # some lowerings ask for the default device: make it one of the target's
    with jax.default_device(devices[0]):
        compiled = trainer.lower_train_step(batch_struct).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    num_params = sum(x.size for x in jax.tree.leaves(trainer.abstract_state.params))
    return CompiledStep(num_params=num_params, memory=_memory(compiled),
                        flops=float(cost["flops"]) if cost and "flops" in cost else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--topology", default="v5e:2x2")
    parser.add_argument("--mesh", default="fsdp=-1")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    devices = tpu_devices(args.topology)
    result = compile_train_step(args.model, devices, args.mesh, args.batch, args.seq_len, args.dtype)
    print(json.dumps({"model": args.model, "topology": args.topology, "mesh": args.mesh, **result.summary()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
