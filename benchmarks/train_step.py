"""Training throughput on CPU: the jaxtok train step against the same Llama + AdamW in PyTorch.

    python benchmarks/train_step.py                      # `default` preset model, batch 8 x 256, both dtypes
    python benchmarks/train_step.py --steps 3 --repeats 9 --dtypes bfloat16 --torch-adamw foreach

The model is the ``default`` pretrain preset's (``train.configs.default()``: a 4-layer d=256 Llama,
4 heads / 4 KV heads of 64, SwiGLU 768, tied embeddings, vocab 4096). jaxtok runs its real
``Trainer.train_step`` (one jitted, donated step: forward, backward, global-norm clipping, AdamW
with warmup + cosine, weight decay on matrices only, plus its grad/param-norm metrics) on a
one-device mesh. The torch side is a hand-written eager Llama with the same layout and numerics
(RMSNorm in float32, half-split RoPE in float32, grouped-query SDPA, SwiGLU, tied output layer,
mean token cross-entropy over ``loss_mask``), ``clip_grad_norm_(1.0)`` and ``torch.optim.AdamW``
with the same betas/eps/decay mask and the same learning-rate schedule. Both start from the very
same weights: jaxtok's initial parameters (normal(0.02) matrices, unit norm scales) are copied into
the torch model, and the step-0 loss, the gradient norm and the parameters after one update are
compared (Adam's first update is about lr * sign(grad), so an element whose tiny gradient flips
sign between the two differs by up to 2 * lr: expected in bfloat16).

dtypes: ``float32`` everywhere; ``bfloat16`` is mixed precision with float32 master parameters
and float32 optimizer state on both sides: jaxtok ``LlamaConfig(dtype='bfloat16',
param_dtype='float32')`` (bf16 matmul inputs, float32 accumulation), torch
``torch.autocast('cpu', dtype=torch.bfloat16)`` around the forward pass with float32 parameters.

Timing: per dtype each side takes one warm-up step (jaxtok compiles there), then ``--repeats``
rounds of ``--steps`` steps, alternating jaxtok and torch each round so load from other processes
hits both alike; every step waits for its loss (as ``fit`` does). Medians (and best) over rounds.
Threads: torch.set_num_threads(os.cpu_count()); XLA:CPU sizes its pool to the usable cores.
``OMP_WAIT_POLICY`` is set to PASSIVE for torch unless already set (``--torch-omp-wait default``
restores libgomp's default spinning): on a shared machine (load above the core count) spinning
OpenMP threads wait on a descheduled partner at every op, and torch's step became 2-10x slower
than with one thread (measured here: bf16 step 0.6 s passive vs 1.3-5.5 s active, 0.48 s on one
thread). On an idle machine passive costs torch a few percent; export OMP_WAIT_POLICY to choose.
Layer loop and remat: ``--layer-loop`` / ``--scan-unroll`` / ``--remat`` set the jaxtok model
(``LlamaConfig.layer_loop`` etc.) of the comparison with torch. ``--options`` adds a jaxtok-only
table, per dtype, of several ``loop[:unroll][+remat]`` options (e.g. ``scan,unrolled,scan:2,
unrolled+dots_saveable``), timed interleaved, with compile time and the compiled step's
``memory_analysis()`` (temporaries, arguments, outputs).

MFU: model FLOPs per token from the config (``jaxtok.train.flops.model_flops_per_token``:
6·N_matmul + 12·L·W·T) x tokens/s over the peak of ``jaxtok.train.flops.peak_flops`` (on CPU a
4096² matmul probe in the compute dtype, cached per CPU model in the jaxtok cache).
The last line is machine-readable, speedup = torch time / jaxtok time:
``RESULT f32_speedup=... bf16_speedup=... loss_diff=... ... mfu_f32=... mfu_bf16=...``
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import subprocess
import sys
import time

import jax
import numpy as np

from jaxtok.models.llama import Llama
from jaxtok.sharding import make_mesh
from jaxtok.train import configs
from jaxtok.train.flops import mfu, model_flops_per_token, peak_flops
from jaxtok.train.trainer import OptimizerConfig, Trainer, lm_task

TOTAL_STEPS = 1000  # sets the cosine schedule; irrelevant for speed


# ---------------------------------------------------------------------------------------------
# Data


def make_batch(batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens, one document per row (positions 0..T-1, segment 1), every target scored."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(batch, seq_len + 1), dtype=np.int32)
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy()
    ones = np.ones((batch, seq_len), np.int32)
    return {"tokens": ids[:, :-1].copy(), "targets": ids[:, 1:].copy(), "positions": positions,
            "segment_ids": ones, "loss_mask": ones.copy(), "num_bytes": np.full((batch,), 4 * seq_len, np.int32)}


# ---------------------------------------------------------------------------------------------
# jaxtok


class JaxSide:
    def __init__(self, model_config, opt: OptimizerConfig, batch: dict[str, np.ndarray], seed: int):
        self.trainer = Trainer(lm_task(Llama(model_config)), opt, make_mesh(), total_steps=TOTAL_STEPS, seed=seed)
        self.state = self.trainer.init_state(jax.random.key(seed))
        self.batch = self.trainer.device_batch(batch)

    def compile(self) -> tuple[float, object]:
        """Seconds to lower and compile the train step, and its ``memory_analysis()``."""
        start = time.perf_counter()
        with jax.set_mesh(self.trainer.mesh):
            compiled = self.trainer._train_step.lower(self.state, self.batch, None).compile()
        return time.perf_counter() - start, compiled.memory_analysis()

    def params(self) -> dict:
        return jax.tree.map(lambda x: np.array(x, dtype=np.float32), self.state.params)  # a copy (donation)

    def step(self) -> dict[str, float]:
        self.state, metrics = self.trainer.train_step(self.state, self.batch)
        return {k: float(v) for k, v in jax.device_get(metrics).items()}

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.state, metrics = self.trainer.train_step(self.state, self.batch)
            metrics["loss"].block_until_ready()


# ---------------------------------------------------------------------------------------------
# torch


def build_torch(torch):
    nn, F = torch.nn, torch.nn.functional

    class RMSNorm(nn.Module):
        def __init__(self, d: int, eps: float):
            super().__init__()
            self.eps, self.weight = eps, nn.Parameter(torch.ones(d))

        def forward(self, x):
            x32 = x.float()
            normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
            return (normed * self.weight.float()).to(x.dtype)

    def rope(x, cos, sin):
        """Half-split rotary embedding in float32; x (B, T, H, D), cos/sin (B, T, 1, D/2)."""
        half = x.shape[-1] // 2
        x32 = x.float()
        x1, x2 = x32[..., :half], x32[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    class Block(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            d, h, kv, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
            self.h, self.kv, self.hd = h, kv, hd
            self.attn_norm, self.mlp_norm = RMSNorm(d, cfg.rms_eps), RMSNorm(d, cfg.rms_eps)
            self.q, self.k = nn.Linear(d, h * hd, bias=False), nn.Linear(d, kv * hd, bias=False)
            self.v, self.o = nn.Linear(d, kv * hd, bias=False), nn.Linear(h * hd, d, bias=False)
            self.gate, self.up = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
            self.down = nn.Linear(f, d, bias=False)

        def forward(self, x, cos, sin):
            b, t, _ = x.shape
            hx = self.attn_norm(x)
            q = rope(self.q(hx).view(b, t, self.h, self.hd), cos, sin).transpose(1, 2)
            k = rope(self.k(hx).view(b, t, self.kv, self.hd), cos, sin).transpose(1, 2)
            v = self.v(hx).view(b, t, self.kv, self.hd).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv != self.h)
            x = x + self.o(out.transpose(1, 2).reshape(b, t, self.h * self.hd))
            hx = self.mlp_norm(x)
            return x + self.down(F.silu(self.gate(hx)) * self.up(hx))

    class TorchLlama(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.cfg = cfg
            self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
            self.final_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
            for p in self.parameters():  # jaxtok's init: normal(0.02) matrices, unit norms
                if p.ndim >= 2:
                    nn.init.normal_(p, std=0.02)

        def forward(self, tokens, positions):
            cfg = self.cfg
            half = cfg.head_dim // 2
            freqs = 1.0 / (cfg.rope_theta ** (torch.arange(half, dtype=torch.float32) * 2.0 / cfg.head_dim))
            angles = positions.float()[..., None] * freqs
            cos, sin = angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]
            x = self.embedding(tokens)
            for block in self.blocks:
                x = block(x, cos, sin)
            return F.linear(self.final_norm(x), self.embedding.weight)  # tied output layer

    return TorchLlama


def load_jax_params(model, params: dict, cfg) -> None:
    """Copies jaxtok's (stacked, einsum-layout) parameters into the torch model."""
    import torch

    d = cfg.d_model
    blocks = params["blocks"]
    with torch.no_grad():
        model.embedding.weight.copy_(torch.from_numpy(params["embedding"]))
        model.final_norm.weight.copy_(torch.from_numpy(params["final_norm"]["scale"]))
        for i, block in enumerate(model.blocks):
            def kernel(name, i=i):
                return blocks[name]["kernel"][i]

            block.attn_norm.weight.copy_(torch.from_numpy(blocks["attn_norm"]["scale"][i]))
            block.mlp_norm.weight.copy_(torch.from_numpy(blocks["mlp_norm"]["scale"][i]))
            for name in ("q", "k", "v"):  # (d, heads, hd) -> (heads*hd, d)
                getattr(block, name).weight.copy_(torch.from_numpy(kernel(name).reshape(d, -1).T.copy()))
            block.o.weight.copy_(torch.from_numpy(kernel("o").reshape(-1, d).T.copy()))  # (h, hd, d) -> (d, h*hd)
            for name in ("gate", "up", "down"):  # (in, out) -> (out, in)
                getattr(block, name).weight.copy_(torch.from_numpy(kernel(name).T.copy()))
    assert sum(p.numel() for p in model.parameters()) == sum(x.size for x in jax.tree.leaves(params))


def torch_params_as_jax(model, cfg) -> dict:
    """The torch parameters back in jaxtok's layout (for comparing one update)."""
    d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def npy(t):
        return t.detach().float().numpy()

    stack = {name: [] for name in ("q", "k", "v", "o", "gate", "up", "down", "attn_norm", "mlp_norm")}
    for block in model.blocks:
        stack["q"].append(npy(block.q.weight).T.reshape(d, h, hd))
        stack["k"].append(npy(block.k.weight).T.reshape(d, kv, hd))
        stack["v"].append(npy(block.v.weight).T.reshape(d, kv, hd))
        stack["o"].append(npy(block.o.weight).T.reshape(h, hd, d))
        for name in ("gate", "up", "down"):
            stack[name].append(npy(getattr(block, name).weight).T)
        stack["attn_norm"].append(npy(block.attn_norm.weight))
        stack["mlp_norm"].append(npy(block.mlp_norm.weight))
    blocks = {name: ({"scale": np.stack(v)} if name.endswith("norm") else {"kernel": np.stack(v)})
              for name, v in stack.items()}
    return {"embedding": npy(model.embedding.weight), "final_norm": {"scale": npy(model.final_norm.weight)},
            "blocks": blocks}


def schedule_factor(opt: OptimizerConfig, total_steps: int):
    """jaxtok's ``lr_schedule`` / peak lr as a function of the optimizer step (0 = first update)."""
    warm, end = opt.warmup_steps, opt.end_lr_fraction
    decay = max(total_steps if opt.decay_steps is None else opt.decay_steps, warm + 1)

    def factor(count: int) -> float:
        step = count + 1
        if step <= warm:
            return min(step / max(warm, 1), 1.0)
        progress = min(max((step - warm) / (decay - warm), 0.0), 1.0)
        return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class TorchSide:
    def __init__(self, torch, model_config, opt: OptimizerConfig, batch: dict[str, np.ndarray], params: dict,
                 dtype: str, adamw: str, compile_model: bool = False):
        self.torch = torch
        self.model = build_torch(torch)(model_config)
        load_jax_params(self.model, params, model_config)
        self.model.train()
        self.forward = torch.compile(self.model) if compile_model else self.model
        decay = [p for p in self.model.parameters() if p.ndim >= 2]  # jaxtok's decay_mask: matrices only
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        kw = {"fused": True} if adamw == "fused" else {"foreach": adamw == "foreach"}
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": opt.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=opt.lr, betas=(opt.b1, opt.b2), eps=opt.eps, **kw)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule_factor(opt, TOTAL_STEPS))
        self.clip = opt.clip_norm
        self.tokens = torch.from_numpy(batch["tokens"]).long()
        self.positions = torch.from_numpy(batch["positions"]).long()
        targets = torch.from_numpy(batch["targets"]).long()
        self.targets = torch.where(torch.from_numpy(batch["loss_mask"]) > 0, targets, -100).reshape(-1)
        self.dtype = dtype

    def step(self) -> dict[str, float]:
        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == "bfloat16"):
            logits = self.forward(self.tokens, self.positions)
        # mean token cross-entropy over scored tokens, in float32 (as jaxtok's token_nll)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), self.targets,
                                                 ignore_index=-100)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip) if self.clip else None
        self.opt.step()
        self.sched.step()
        return {"loss": loss.item(), "grad_norm": grad_norm.item() if grad_norm is not None else float("nan")}

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()  # loss.item() synchronises, like the jaxtok side's wait


# ---------------------------------------------------------------------------------------------
# The comparison


def max_abs_diff(a: dict, b: dict) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def timed(fn, *args) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def run_dtype(dtype: str, torch, base_config, opt: OptimizerConfig, batch, args) -> dict:
    model_config = dataclasses.replace(base_config, dtype=dtype, param_dtype="float32")
    jx = JaxSide(model_config, opt, batch, args.seed)
    params0 = jx.params()
    tc = TorchSide(torch, model_config, opt, batch, params0, dtype, args.torch_adamw, args.torch_compile)
    row = {}
    # warm-up = step 0 on both sides, from identical weights: compare loss, grad norm and update
    t_j, m_j = timed(jx.step)
    t_t, m_t = timed(tc.step)
    row["first"] = (t_j, t_t)
    row["loss"] = (m_j["loss"], m_t["loss"])
    row["loss_diff"] = abs(m_j["loss"] - m_t["loss"])
    row["grad_norm"] = (m_j["grad_norm"], m_t["grad_norm"])
    row["grad_norm_rel_diff"] = abs(m_j["grad_norm"] - m_t["grad_norm"]) / m_j["grad_norm"]
    row["param_diff"] = max_abs_diff(jx.params(), torch_params_as_jax(tc.model, model_config))
    row["lr0"] = opt.lr * schedule_factor(opt, TOTAL_STEPS)(0)
    tc.run(1)  # torch's second step too (allocator, autograd caches); jaxtok is warm after one
    jx.run(1)
    samples_j, samples_t = [], []
    for _ in range(args.repeats):  # interleaved
        samples_j.append(timed(jx.run, args.steps)[0] / args.steps)
        samples_t.append(timed(tc.run, args.steps)[0] / args.steps)
    row["step"] = (statistics.median(samples_j), statistics.median(samples_t))
    row["best"] = (min(samples_j), min(samples_t))
    row["spread"] = tuple((max(s) - min(s)) / statistics.median(s) for s in (samples_j, samples_t))
    # each torch round against the jaxtok round just before it (similar load from other processes)
    row["paired"] = statistics.median(t / j for j, t in zip(samples_j, samples_t))
    return row


def profile_step(dtype: str, base_config, opt: OptimizerConfig, batch, args, top: int = 14) -> None:
    """jaxtok's train step op by op (benchmarks/decode_profile.py's thunk trace): where the time
    goes besides the matrix products."""
    from decode_profile import op_times, product_names

    jx = JaxSide(dataclasses.replace(base_config, dtype=dtype, param_dtype="float32"), opt, batch, args.seed)
    with jax.set_mesh(jx.trainer.mesh):
        hlo = jx.trainer._train_step.lower(jx.state, jx.batch, None).compile().as_text()
    jx.run(2)
    groups, counts = op_times(lambda: jx.run(1), product_names(hlo), 5)
    total = sum(groups.values())
    products = sum(ms for key, ms in groups.items() if key.startswith("product"))
    print(f"\n{dtype} train step op by op: {total:.1f} ms of thunks per step, matrix products "
          f"{products:.1f} ms ({products / total:.0%})")
    for key, ms in sorted(groups.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{ms:8.2f} ms {ms / total:6.1%} {counts[key] / 5:6.0f} calls  {key[:90]}")


def parse_option(text: str) -> dict:
    """``loop[:unroll][+remat]`` -> LlamaConfig fields (``scan:2``, ``unrolled+dots_saveable``)."""
    loop, _, remat = text.partition("+")
    loop, _, unroll = loop.partition(":")
    return {"layer_loop": loop, "scan_unroll": int(unroll or 1), "remat": remat or "none"}


def run_options(dtype: str, base_config, opt: OptimizerConfig, batch, args, options: list[str]) -> dict:
    """jaxtok only: step time (interleaved rounds), compile time and memory of each option."""
    sides, rows = {}, {}
    for name in options:
        config = dataclasses.replace(base_config, dtype=dtype, param_dtype="float32", **parse_option(name))
        side = JaxSide(config, opt, batch, args.seed)
        compile_s, memory = side.compile()
        side.run(2)
        sides[name], rows[name] = side, {"compile": compile_s, "memory": memory, "samples": []}
    for _ in range(args.repeats):
        for name, side in sides.items():
            rows[name]["samples"].append(timed(side.run, args.steps)[0] / args.steps)
    for row in rows.values():
        row["step"], row["best"] = statistics.median(row["samples"]), min(row["samples"])
    return rows


def print_options(dtype: str, rows: dict, tokens: int, flops_per_token: float, peak) -> None:
    print(f"\njaxtok layer loop / remat options, {dtype} (interleaved rounds; memory from the compiled step's "
          "memory_analysis())")
    head = (f"{'option':28} {'ms/step':>8} {'(best)':>8} {'tokens/s':>9} {'MFU':>6} {'compile s':>9} "
            f"{'temp MiB':>9} {'args MiB':>9} {'out MiB':>8}")
    print(head)
    print("-" * len(head))
    mib = 2 ** 20
    for name, row in rows.items():
        m = row["memory"]
        print(f"{name:28} {row['step'] * 1e3:>8.1f} {row['best'] * 1e3:>8.1f} {tokens / row['step']:>9.0f} "
              f"{mfu(tokens / row['step'], flops_per_token, peak):>6.1%} {row['compile']:>9.1f} "
              f"{m.temp_size_in_bytes / mib:>9.1f} {m.argument_size_in_bytes / mib:>9.1f} "
              f"{m.output_size_in_bytes / mib:>8.1f}")


def matmul_repro(torch, tokens: int, cfg, repeats: int = 20) -> None:
    """The train step's matmul shapes alone, jax (jit, float32 accumulation) against torch, both
    dtypes: shows how much of the gap is XLA:CPU's GEMM kernels themselves."""
    import jax.numpy as jnp

    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    shapes = [("x·W_qkvo", tokens, d, d), ("x·W_gate/up", tokens, d, f), ("h·W_down", tokens, f, d),
              ("x·E^T (logits)", tokens, d, v), ("dW = x^T·g (d x f)", d, tokens, f),
              ("dx = g·E (logits)", tokens, v, d)]
    print(f"\nMatmul reproducer (M x K x N, ms per product, best of {repeats}; jax: jit, "
          "preferred_element_type=float32; torch: torch.matmul, bf16 under autocast's bf16 operands)")
    head = f"{'product':22} {'M x K x N':>18} {'jax f32':>8} {'torch f32':>9} {'jax bf16':>9} {'torch bf16':>10}"
    print(head)
    print("-" * len(head))

    def best(fn, *operands):
        fn(*operands)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*operands)
            times.append(time.perf_counter() - t0)
        return min(times) * 1e3

    product = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))

    for name, m, k, n in shapes:
        row = []
        for dtype in ("float32", "bfloat16"):
            row.append(best(lambda x, y: product(x, y).block_until_ready(),
                            jnp.ones((m, k), dtype), jnp.ones((k, n), dtype)))
            tdtype = getattr(torch, dtype)
            row.append(best(torch.matmul, torch.ones(m, k, dtype=tdtype), torch.ones(k, n, dtype=tdtype)))
        print(f"{name:22} {f'{m}x{k}x{n}':>18} {row[0]:>8.2f} {row[1]:>9.2f} {row[2]:>9.2f} {row[3]:>10.2f}")


def cpu_description() -> str:
    """``lscpu``'s model name, cores and flags that matter for matmuls."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU (no lscpu)"
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs, {' '.join(isa)}"


def print_table(rows: dict, args, tokens: int, threads: tuple[int, int], adamw: str) -> None:
    print(f"\nTrain step on CPU ('default' preset model), batch {args.batch} x seq {args.seq_len} = {tokens} tokens; "
          f"threads: jax {threads[0]}, torch {threads[1]}; median (best) of {args.repeats} rounds x "
          f"{args.steps} steps; torch {'torch.compile' if args.torch_compile else 'eager'} + AdamW({adamw})")
    head = f"{'dtype':9} {'metric':30} {'jaxtok':>11} {'torch':>11} {'speedup':>8} {'(best)':>8}"
    print(head)
    print("-" * len(head))
    for dtype, row in rows.items():
        (j, t), (bj, bt) = row["step"], row["best"]
        print(f"{dtype:9} {'step time, ms: median (best)':30} {j * 1e3:>11.1f} {t * 1e3:>11.1f} {t / j:>7.2f}x "
              f"{bt / bj:>7.2f}x")
        print(f"{dtype:9} {'  best round, ms':30} {bj * 1e3:>11.1f} {bt * 1e3:>11.1f}")
        print(f"{dtype:9} {'  median of paired rounds':30} {'':>11} {'':>11} {row['paired']:>7.2f}x")
        print(f"{dtype:9} {'tokens/s (median)':30} {tokens / j:>11.0f} {tokens / t:>11.0f}")
        print(f"{dtype:9} {'MFU (model FLOPs / peak)':30} {row['mfu'][0]:>11.1%} {row['mfu'][1]:>11.1%}   "
              f"peak {row['peak'].flops_per_s / 1e9:.0f} GFLOP/s ({row['peak'].source})")
        print(f"{dtype:9} {'round spread (max-min)/median':30} {row['spread'][0]:>11.0%} {row['spread'][1]:>11.0%}")
        fj, ft = row["first"]
        print(f"{dtype:9} {'first step (compile), s':30} {fj:>11.2f} {ft:>11.2f}")
        lj, lt = row["loss"]
        print(f"{dtype:9} {'step-0 loss':30} {lj:>11.5f} {lt:>11.5f}   |diff| {row['loss_diff']:.1e}")
        gj, gt = row["grad_norm"]
        print(f"{dtype:9} {'step-0 grad norm':30} {gj:>11.5f} {gt:>11.5f}   rel diff {row['grad_norm_rel_diff']:.1e}")
        print(f"{dtype:9} {'max |param diff| after step 1':30} {row['param_diff']:>11.1e} "
              f"{'':>11}   (lr of step 1: {row['lr0']:.1e})")
        print()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1, help="train steps per timed round")
    p.add_argument("--repeats", type=int, default=9, help="timed rounds per side (interleaved)")
    p.add_argument("--batch", type=int, default=None, help="rows per step (default: the preset's, 8)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: the preset's, 256)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32,bfloat16")
    p.add_argument("--torch-adamw", choices=("fused", "foreach", "for-loop"), default="fused",
                   help="torch.optim.AdamW implementation (fused: its fastest on CPU)")
    p.add_argument("--torch-compile", action="store_true",
                   help="torch.compile the torch model (inductor; needs a C++ compiler, minutes of compile)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of both sides (default os.cpu_count(); fewer pins the process to that many cores)")
    p.add_argument("--torch-omp-wait", choices=("passive", "active", "default"),
                   default=os.environ.get("OMP_WAIT_POLICY", "passive").lower(),
                   help="OMP_WAIT_POLICY for torch's OpenMP threads (default: $OMP_WAIT_POLICY, else passive; "
                        "'default' leaves the environment alone)")
    p.add_argument("--layer-loop", default=None,
                   help="jaxtok layer loop of the comparison: scan | unrolled (default: the preset's)")
    p.add_argument("--scan-unroll", type=int, default=None, help="layers per scan iteration (default: the preset's)")
    p.add_argument("--remat", default=None, help="none | full | dots_saveable (default: the preset's)")
    p.add_argument("--options", default="",
                   help="comma-separated jaxtok-only options loop[:unroll][+remat] to compare, e.g. "
                        "scan,unrolled,scan:2,unrolled+dots_saveable")
    p.add_argument("--matmul-repro", action="store_true",
                   help="also time the step's matmul shapes alone, jax against torch")
    p.add_argument("--profile", action="store_true",
                   help="also print jaxtok's step op by op (XLA:CPU thunk trace) per dtype")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or not set(dtypes) <= {"float32", "bfloat16"}:
        p.error(f"--dtypes takes float32 and/or bfloat16, got {args.dtypes!r}")
    if args.steps < 1 or args.repeats < 1 or (args.threads is not None and args.threads < 1):
        p.error("need --steps >= 1, --repeats >= 1 and --threads >= 1")

    if args.torch_omp_wait != "default":
        os.environ["OMP_WAIT_POLICY"] = args.torch_omp_wait.upper()  # read by libgomp when torch loads
    import torch

    preset = configs.default()
    args.batch = args.batch or preset.data.global_batch
    args.seq_len = args.seq_len or preset.data.seq_len
    base_config = preset.model_config(vocab_size=preset.tokenizer_vocab)
    loop_fields = {"layer_loop": args.layer_loop, "scan_unroll": args.scan_unroll, "remat": args.remat}
    base_config = dataclasses.replace(base_config, **{k: v for k, v in loop_fields.items() if v is not None})
    if args.seq_len > base_config.max_seq_len:
        base_config = dataclasses.replace(base_config, max_seq_len=args.seq_len)
    opt = preset.optimizer
    threads = os.cpu_count() if args.threads is None else args.threads
    if threads < len(os.sched_getaffinity(0)):
        # before the first jax call: XLA:CPU sizes its thread pool to the usable cores
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
    torch.set_num_threads(threads)
    jax_threads = len(os.sched_getaffinity(0))
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}, {len(jax.devices())} device), torch "
          f"{torch.__version__}; os.cpu_count() {os.cpu_count()}; usable cores {jax_threads}; torch threads "
          f"{torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"CPU: {cpu_description()}")
    c = base_config
    print(f"model: d_model {c.d_model}, {c.n_layers} layers, {c.n_heads} heads / {c.n_kv_heads} kv heads x "
          f"{c.head_dim}, d_ff {c.d_ff}, vocab {c.vocab_size}, {c.num_params() / 1e6:.2f} M params; AdamW lr "
          f"{opt.lr} (warmup {opt.warmup_steps}, cosine), betas ({opt.b1}, {opt.b2}), eps {opt.eps}, "
          f"wd {opt.weight_decay} (matrices), clip {opt.clip_norm}; jaxtok layer_loop {c.layer_loop} "
          f"(unroll {c.scan_unroll}), remat {c.remat}")
    batch = make_batch(args.batch, args.seq_len, base_config.vocab_size, args.seed)

    tokens = args.batch * args.seq_len
    flops_per_token = model_flops_per_token(base_config, args.seq_len)
    print(f"model FLOPs per token (training, 6·N_matmul + 12·L·W·T): {flops_per_token / 1e6:.1f} M "
          f"(N_matmul {base_config.matmul_params() / 1e6:.2f} M, T {args.seq_len})")
    rows, option_rows = {}, {}
    for dtype in ("float32", "bfloat16"):
        if dtype not in dtypes:
            continue
        peak = peak_flops(dtype)
        rows[dtype] = run_dtype(dtype, torch, base_config, opt, batch, args)
        rows[dtype]["peak"] = peak
        rows[dtype]["mfu"] = tuple(mfu(tokens / s, flops_per_token, peak) for s in rows[dtype]["step"])
        if args.options:
            option_rows[dtype] = run_options(dtype, base_config, opt, batch, args,
                                             [o.strip() for o in args.options.split(",") if o.strip()])
    print_table(rows, args, tokens, (jax_threads, torch.get_num_threads()), args.torch_adamw)
    for dtype, opt_rows in option_rows.items():
        print_options(dtype, opt_rows, tokens, flops_per_token, rows[dtype]["peak"])
    if args.matmul_repro:
        matmul_repro(torch, tokens, base_config)
    if args.profile:
        for dtype in dtypes:
            profile_step(dtype, base_config, opt, batch, args)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (on {os.cpu_count()} cores)")

    def get(dtype, fn, fmt):
        return format(fn(rows[dtype]), fmt) if dtype in rows else "nan"

    def speedup(r):
        return r["step"][1] / r["step"][0]

    def jax_tps(r):
        return tokens / r["step"][0]

    def torch_tps(r):
        return tokens / r["step"][1]

    print(f"RESULT f32_speedup={get('float32', speedup, '.2f')} bf16_speedup={get('bfloat16', speedup, '.2f')} "
          f"f32_speedup_paired={get('float32', lambda r: r['paired'], '.2f')} "
          f"bf16_speedup_paired={get('bfloat16', lambda r: r['paired'], '.2f')} "
          f"loss_diff={get('float32', lambda r: r['loss_diff'], '.1e')} "
          f"loss_diff_bf16={get('bfloat16', lambda r: r['loss_diff'], '.1e')} "
          f"jax_tokens_per_s_f32={get('float32', jax_tps, '.0f')} "
          f"torch_tokens_per_s_f32={get('float32', torch_tps, '.0f')} "
          f"jax_tokens_per_s_bf16={get('bfloat16', jax_tps, '.0f')} "
          f"torch_tokens_per_s_bf16={get('bfloat16', torch_tps, '.0f')} "
          f"mfu_f32={get('float32', lambda r: r['mfu'][0], '.3f')} "
          f"mfu_bf16={get('bfloat16', lambda r: r['mfu'][0], '.3f')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
