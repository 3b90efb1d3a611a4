"""SmolLM2-135M on CPU: prefill and greedy decoding, jaxtok against transformers (torch), in one run.

    python benchmarks/smollm2_forward.py                 # 512-token prompt, 128 new tokens, both dtypes
    python benchmarks/smollm2_forward.py --repeats 5 --dtypes float32 --torch-cache dynamic

Both sides load the same GGUF file and use the same number of CPU threads. Per dtype, each side
is warmed up first (jaxtok's first call compiles; first call minus steady time is reported as
compile time), then the two are timed interleaved, jaxtok then torch, ``--repeats`` times; the
table shows medians (and the best run, which load from other processes disturbs least).

* prefill: ``generate`` with one new token — the prompt (exactly ``--prompt-len`` tokens of
  sample text) through the model into the KV cache, plus the first greedy token.
* generate: ``generate`` with exactly ``--new-tokens`` greedy tokens (EOS can't stop either side).
* decode: generate − prefill, i.e. the ``--new-tokens`` − 1 one-token steps.
* forward: the prompt through the model without a cache, logits at every position; the float32
  logit difference between the two frameworks is taken on this output.

Threads: torch.set_num_threads(n) with n the usable cores, the size of XLA:CPU's pool. Torch's
OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE`` unless set; ``--torch-omp-wait``): on a
shared machine spinning threads wait on a descheduled partner at every op, which slowed torch's
decoding here ~11-13x and would show a false win. Passive is not free: at load ~1.5 it cost
torch ~10% in decoding and up to ~30% in bf16 prefill here (``--torch-omp-wait active`` to compare).

bfloat16: for jaxtok, parameters stored in bf16 and compute in bf16 with float32 accumulation; for
torch, ``model.to(torch.bfloat16)``.

Layer loops: ``--prefill-loop`` / ``--decode-loop`` are ``generate``'s (defaults: its
``PREFILL_LAYER_LOOP`` / ``DECODE_LAYER_LOOP``); ``--compare-loops`` adds a jaxtok-only table of
prefill and per-step decode time and compile time for scan/unrolled decoding.

Decode roofline: a decode step reads every weight once (tied output layer = the embedding
matrix; the input lookup's one row is not counted) and the whole allocated KV cache (keys and
values of every layer over prompt + new-token slots; empty slots are read too, then masked). The
machine's read bandwidth is measured in the same run: a jitted row-sum over a float32 buffer of
``--bandwidth-mib`` (default 1 GiB, larger than the last-level cache), best of 5, counting only
the bytes read. roof = (bytes per step / bandwidth) / measured time per step.

The last line is machine-readable (speedup = torch / jaxtok):
``RESULT prefill_speedup=… decode_speedup=… prefill_speedup_bf16=… decode_speedup_bf16=… max_logit_diff=…
decode_roof_f32=… decode_roof_bf16=…``
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxtok.decode import generate as generation  # noqa: E402
from jaxtok.decode.generate import generate  # noqa: E402
from jaxtok.models.llama import Llama  # noqa: E402
from jaxtok.models.registry import load_pretrained_lm  # noqa: E402

TIMED = ("prefill", "generate", "forward")


def prompt_ids(tokenizer, length: int) -> list[int]:
    """Exactly ``length`` token ids of real text: jaxtok/assets/sample.txt, repeated."""
    text = (importlib.resources.files("jaxtok.assets") / "sample.txt").read_text(encoding="utf-8")
    ids = tokenizer.encode(text)
    return (ids * (length // len(ids) + 1))[:length]


class JaxSide:
    def __init__(self, loaded, dtype: str, ids: list[int], new_tokens: int, prefill_loop=None, decode_loop=None):
        config = dataclasses.replace(loaded.config, dtype=dtype, param_dtype=dtype)
        # what load_pretrained_lm(..., dtype=dtype, param_dtype=dtype) does, without re-reading the file
        self.params = jax.tree.map(lambda x: jnp.asarray(x, dtype=dtype), loaded.params)
        self.model = Llama(config)
        self.ids, self.new_tokens, self.pad_id = ids, new_tokens, loaded.tokenizer.pad_id
        self.loops = {"prefill_loop": prefill_loop, "decode_loop": decode_loop}
        self.tokens = jnp.asarray([ids], jnp.int32)
        self._forward = jax.jit(lambda params, tokens: self.model.apply({"params": params}, tokens).logits)

    def _generate(self, n: int) -> list[int]:
        # eos_id=-1 never occurs, so exactly n tokens come out
        return generate(self.model, self.params, [self.ids], max_new_tokens=n, eos_id=-1, pad_id=self.pad_id,
                        **self.loops)[0]

    def prefill(self):
        return self._generate(1)

    def generate(self):
        return self._generate(self.new_tokens)

    def forward(self):
        return np.asarray(self._forward(self.params, self.tokens))


class TorchSide:
    def __init__(self, model, torch, dtype: str, ids: list[int], new_tokens: int, cache: str):
        self.torch, self.model = torch, model.to(getattr(torch, dtype))
        self.ids = torch.tensor([ids])
        self.mask = torch.ones_like(self.ids)
        self.new_tokens = new_tokens
        self.cache_kw = {"cache_implementation": "static"} if cache == "static" else {}

    def _generate(self, n: int) -> list[int]:
        with self.torch.inference_mode():
            out = self.model.generate(self.ids, attention_mask=self.mask, do_sample=False, max_new_tokens=n,
                                      min_new_tokens=n, pad_token_id=self.model.config.eos_token_id,
                                      **self.cache_kw)
        return out[0, self.ids.shape[1]:].tolist()

    def prefill(self):
        return self._generate(1)

    def generate(self):
        return self._generate(self.new_tokens)

    def forward(self):
        with self.torch.inference_mode():
            return self.model(self.ids).logits.float().numpy()


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def cpu_description() -> str:
    """``lscpu``'s model name, CPU count, last-level cache and matmul-relevant flags."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU (no lscpu)"
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)}
    flags = fields.get("Flags", "").split()
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return (f"{fields.get('Model name', '?')}, {fields.get('CPU(s)', '?')} CPUs, L3 {fields.get('L3 cache', '?')}, "
            f"{' '.join(isa)}")


def read_bandwidth(mib: int, repeats: int = 5) -> float:
    """Bytes/s of a jitted row-sum over a float32 buffer of ``mib`` MiB (bytes read only, best run);
    many rows, so XLA:CPU splits the reduction over its threads."""
    rows = 4096
    cols = mib * 2 ** 20 // 4 // rows
    buf = jnp.ones((rows, cols), jnp.float32)
    reduce = jax.jit(lambda x: jnp.sum(x, axis=1))
    reduce(buf).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        reduce(buf).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return buf.size * 4 / best


def decode_bytes(config, itemsize: int, cache_len: int) -> tuple[int, int]:
    """(weight bytes, KV-cache bytes) read by one decode step."""
    weights = config.num_params() * itemsize
    cache = 2 * config.n_layers * cache_len * config.n_kv_heads * config.head_dim * itemsize
    return weights, cache


def run_loops(dtype, loaded, ids, args) -> dict:
    """jaxtok only: prefill and decode time per (prefill loop, decode loop), compile included."""
    rows = {}
    for prefill_loop, decode_loop in (("scan", "scan"), ("scan", "unrolled"), ("unrolled", "unrolled")):
        jx = JaxSide(loaded, dtype, ids, args.new_tokens, prefill_loop, decode_loop)
        first = [timed(jx.prefill)[0], timed(jx.generate)[0]]
        pre, gen = [], []
        for _ in range(args.repeats):
            pre.append(timed(jx.prefill)[0])
            gen.append(timed(jx.generate)[0])
        p, g = statistics.median(pre), statistics.median(gen)
        rows[(prefill_loop, decode_loop)] = {"prefill": p, "decode": (g - p) / max(args.new_tokens - 1, 1),
                                             "compile": (first[0] - p, first[1] - g)}
    return rows


def run_dtype(dtype, loaded, ref_model, torch, ids, args) -> dict:
    jx = JaxSide(loaded, dtype, ids, args.new_tokens, args.prefill_loop, args.decode_loop)
    tc = TorchSide(ref_model, torch, dtype, ids, args.new_tokens, args.torch_cache)
    row, outs = {}, {}
    for name in TIMED:  # warm-up; jaxtok compiles here
        (tj, oj), (tt, ot) = timed(getattr(jx, name)), timed(getattr(tc, name))
        row[f"first_{name}"], outs[name] = (tj, tt), (oj, ot)
    jax_tokens, torch_tokens = outs["generate"]
    row["tokens_equal"] = next((i for i, (a, b) in enumerate(zip(jax_tokens, torch_tokens)) if a != b),
                               len(jax_tokens))
    row["max_logit_diff"] = float(np.abs(outs["forward"][0] - outs["forward"][1]).max())
    samples = {name: ([], []) for name in TIMED}
    for _ in range(args.repeats):  # interleaved: load from other processes hits both sides alike
        for name, (tj, tt) in samples.items():
            tj.append(timed(getattr(jx, name))[0])
            tt.append(timed(getattr(tc, name))[0])
    # decode of one repeat = its generate - its prefill (taken seconds apart)
    samples["decode"] = tuple([g - p for g, p in zip(*pair)] for pair in zip(samples["generate"], samples["prefill"]))
    for name, (tj, tt) in samples.items():
        row[name] = (statistics.median(tj), statistics.median(tt))
        row[f"best_{name}"] = (min(tj), min(tt))
    return row


def print_table(rows, args, threads):
    n, steps = args.new_tokens, max(args.new_tokens - 1, 1)
    print(f"\nSmolLM2-135M on CPU: prompt {args.prompt_len} tokens, {n} new tokens, {threads} threads, "
          f"median (best) of {args.repeats}; torch cache: {args.torch_cache}")
    head = f"{'dtype':9} {'phase':36} {'jaxtok':>9} {'torch':>9} {'speedup':>8} {'(best)':>8}"
    print(head)
    print("-" * len(head))
    labels = [("prefill", f"prefill {args.prompt_len} (gen. 1 token), s", 1),
              ("decode", f"decode {steps} steps, s", 1),
              ("decode", "  per step, ms", 1000 / steps),
              ("generate", f"generate {n} (prefill + decode), s", 1),
              ("forward", f"forward {args.prompt_len}, all logits, s", 1)]
    for dtype, row in rows.items():
        for key, label, scale in labels:
            (j, t), (bj, bt) = row[key], row[f"best_{key}"]
            print(f"{dtype:9} {label:36} {j * scale:>9.3f} {t * scale:>9.3f} {t / j:>7.2f}x {bt / bj:>7.2f}x")
        for name in ("prefill", "generate", "forward"):
            (fj, ft), steady = row[f"first_{name}"], row[name][0]
            print(f"{dtype:9} {'first ' + name + ' call, s':36} {fj:>9.2f} {ft:>9.2f}   "
                  f"jaxtok compile ~ {max(fj - steady, 0):.1f} s")
        print(f"{dtype:9} greedy tokens identical to torch's: first {row['tokens_equal']} of {n}; "
              f"max |logit diff| (forward): {row['max_logit_diff']:.2e}")
        w, c = row["bytes"]
        print(f"{dtype:9} decode roofline: {w / 1e6:.0f} MB weights + {c / 1e6:.1f} MB KV cache per step; read "
              f"bandwidth {row['bandwidth'] / 1e9:.1f} GB/s -> roof {row['roof_ms']:.1f} ms/step; measured "
              f"{row['decode'][0] * 1000 / steps:.1f} ms -> {row['roof']:.0%} of the roof "
              f"(torch {row['roof_torch']:.0%})")
        print()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32,bfloat16")
    p.add_argument("--torch-cache", choices=("dynamic", "static"), default="static",
                   help="transformers KV cache for generate (static: cache_implementation='static')")
    p.add_argument("--prefill-loop", default=generation.PREFILL_LAYER_LOOP,
                   help="jaxtok layer loop of the prompt pass: scan | unrolled (default: generate's)")
    p.add_argument("--decode-loop", default=generation.DECODE_LAYER_LOOP,
                   help="jaxtok layer loop of the decode steps: scan | unrolled (default: generate's)")
    p.add_argument("--compare-loops", action="store_true",
                   help="also time jaxtok prefill/decode for each layer loop (jaxtok only; compiles 3 programs)")
    p.add_argument("--bandwidth-mib", type=int, default=1024, help="buffer of the read-bandwidth probe")
    p.add_argument("--torch-omp-wait", choices=("passive", "active", "default"),
                   default=os.environ.get("OMP_WAIT_POLICY", "passive").lower(),
                   help="OMP_WAIT_POLICY for torch's OpenMP threads (default: $OMP_WAIT_POLICY, else passive; "
                        "'default' leaves the environment alone)")
    args = p.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or not set(dtypes) <= {"float32", "bfloat16"}:
        p.error(f"--dtypes takes float32 and/or bfloat16, got {args.dtypes!r}")
    if args.new_tokens < 2 or args.prompt_len < 1 or args.repeats < 1:
        p.error("need --new-tokens >= 2, --prompt-len >= 1, --repeats >= 1")

    if args.torch_omp_wait != "default":
        os.environ["OMP_WAIT_POLICY"] = args.torch_omp_wait.upper()  # read by libgomp when torch loads
    import torch
    import transformers

    threads = len(os.sched_getaffinity(0))  # XLA:CPU sizes its thread pool to the usable cores
    torch.set_num_threads(threads)
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, "
          f"transformers {transformers.__version__}; threads: jax {threads}, torch {torch.get_num_threads()} "
          f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}); load average {os.getloadavg()[0]:.1f}")
    print(f"CPU: {cpu_description()}; jaxtok layer loops: prefill {args.prefill_loop or 'config'}, decode "
          f"{args.decode_loop or 'config'}")

    loaded = load_pretrained_lm("smollm2-135m")
    ids = prompt_ids(loaded.tokenizer, args.prompt_len)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(loaded.path.parent), gguf_file=loaded.path.name, dtype=torch.float32).eval()

    bandwidth = read_bandwidth(args.bandwidth_mib)
    print(f"read bandwidth (row-sum over {args.bandwidth_mib} MiB float32): {bandwidth / 1e9:.1f} GB/s")
    cache_len = -(-args.prompt_len // 16) * 16 + args.new_tokens  # generate's padded prompt + new slots
    steps = max(args.new_tokens - 1, 1)
    rows, loop_rows = {}, {}
    for dtype in ("float32", "bfloat16"):  # float32 first: torch's model is converted in place
        if dtype in dtypes:
            row = rows[dtype] = run_dtype(dtype, loaded, ref_model, torch, ids, args)
            row["bytes"] = decode_bytes(loaded.config, jnp.dtype(dtype).itemsize, cache_len)
            row["bandwidth"] = bandwidth
            row["roof_ms"] = sum(row["bytes"]) / bandwidth * 1e3
            row["roof"] = row["roof_ms"] / (row["decode"][0] * 1e3 / steps)
            row["roof_torch"] = row["roof_ms"] / (row["decode"][1] * 1e3 / steps)
            if args.compare_loops:
                loop_rows[dtype] = run_loops(dtype, loaded, ids, args)
    print_table(rows, args, threads)
    for dtype, lr in loop_rows.items():
        print(f"jaxtok layer loops, {dtype} (median of {args.repeats}; compile = first call - steady)")
        for (pl, dl), r in lr.items():
            print(f"  prefill {pl:8} decode {dl:8}: prefill {r['prefill'] * 1e3:7.0f} ms, decode "
                  f"{r['decode'] * 1e3:6.1f} ms/step, compile prefill {r['compile'][0]:5.1f} s / generate "
                  f"{r['compile'][1]:5.1f} s")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (on {os.cpu_count()} cores)")

    def speedup(dtype, key):
        if dtype not in rows:
            return "nan"
        j, t = rows[dtype][key]
        return f"{t / j:.2f}"

    diff = f"{rows['float32']['max_logit_diff']:.2e}" if "float32" in rows else "nan"

    def roof(dtype):
        return f"{rows[dtype]['roof']:.2f}" if dtype in rows else "nan"

    print(f"RESULT prefill_speedup={speedup('float32', 'prefill')} decode_speedup={speedup('float32', 'decode')} "
          f"prefill_speedup_bf16={speedup('bfloat16', 'prefill')} "
          f"decode_speedup_bf16={speedup('bfloat16', 'decode')} max_logit_diff={diff} "
          f"decode_roof_f32={roof('float32')} decode_roof_bf16={roof('bfloat16')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
