"""TokenSelect on this CPU: what sparse decode attention saves, and what it costs SmolLM2-135M.

    python benchmarks/sparse_attention.py            # full size (the issue's): ~30-40 min on a quiet 2-core CPU
    python benchmarks/sparse_attention.py --quick    # every section at toy sizes, a few minutes
    --plot docs/tokenselect_quality.png              # also draw (d)'s bits per byte vs k

Sections (all ratios measured within this one run; jnp paths, the CPU's fast path):

(a) attention: one decode query (SmolLM2's 9 query / 3 key-value heads, head dim 64) over caches of
    ``--lengths`` tokens, dense (every key) vs attention over n_init + k + n_local + 1 selected
    slots (gather + softmax), one list per layer and one per key/value head.
(b) step: scoring (q.K over the whole cache, per-head softmax, vote, top-k) + sparse attention,
    vs dense; with the selection cache, a hit skips the scoring: the cached step time is
    ``hit_rate * hit + (1 - hit_rate) * miss`` with the hit rate SmolLM2 shows in (c) at
    ``--threshold``.
(c) end-to-end greedy decoding of SmolLM2 after a ``--decode-context`` prompt (real text, prefilled
    densely once): dense vs TokenSelect tokens/s, and TokenSelect with the selection cache (hit rate).
(d) quality: bits per byte on ``--docs`` long English man pages (``--doc-tokens`` tokens each, the
    whole document in one window), dense vs TokenSelect (chunked prefill) at each of ``--ks``, per
    layer and (at ``--k``) per key/value head.
(e) needle in a haystack: a 5-digit pass key hidden at ``--depths`` of ``--needle-lengths`` tokens of
    man-page filler, then "What is the pass key?": dense vs TokenSelect greedy answers.

Last line: ``RESULT attn_speedup_64k=… step_speedup_64k=… step_speedup_64k_cached=… cache_hit_rate=…
decode_speedup_8k=… bpb_ratio=… needle_dense=… needle_sparse=…`` (64k / 8k: the largest
``--lengths`` / the ``--decode-context``; bpb_ratio at ``--k``, shared per layer).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see smollm2_forward.py: spinning threads on a shared CPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from smollm2_forward import cpu_description  # noqa: E402

from jaxtok.data.manpages import strip_roff  # noqa: E402
from jaxtok.decode import generate as gen  # noqa: E402
from jaxtok.decode import tokenselect as ts  # noqa: E402
from jaxtok.evaluate import evaluate_bpb  # noqa: E402
from jaxtok.kernels.sparse_decode_attention import sparse_decode_attention_reference  # noqa: E402
from jaxtok.models.llama import KVCache, Llama  # noqa: E402
from jaxtok.models.registry import load_pretrained_lm  # noqa: E402
from jaxtok.nn import attention as attn  # noqa: E402
from jaxtok.nn.layers import split_layers  # noqa: E402
from jaxtok.train.observe import save_figure  # noqa: E402

H, K, D = 9, 3, 64  # SmolLM2's attention
MAN1 = Path("/usr/share/man/man1")


def timed(fn, *args, reps: int) -> float:
    """Median seconds of ``fn(*args)`` (compiled by a first call)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


# --- (a) + (b): attention and the selecting step at one layer ---------------------------------

def layer_case(s: int, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((1, 1, H, D)), dtype)
    k = jnp.asarray(rng.standard_normal((1, s, K, D)), dtype)
    v = jnp.asarray(rng.standard_normal((1, s, K, D)), dtype)
    kpos = jnp.arange(s, dtype=jnp.int32)[None]
    return q, k, v, kpos, jnp.full((1, 1), s - 1, jnp.int32)


def attention_section(args, cfg: ts.TokenSelectConfig, hit_rate: float | None):
    dtype = jnp.dtype(args.dtype)
    dense = jax.jit(lambda q, k, v, kp, qp: attn.attention_reference(
        q, k, v, attn.attention_mask(qp, kp, None, None, True), D ** -0.5))
    gathered = jax.jit(sparse_decode_attention_reference)
    end = lambda s: s - 1  # noqa: E731 (the query's own slot)
    step = jax.jit(lambda q, k, v, kp, qp, c: ts.attend(q, k, v, qp, kp, kp.shape[1] - 1, c,
                                                         attn.AttentionImpl.AUTO)[0], static_argnums=5)
    cached = jax.jit(lambda q, k, v, kp, qp, state, c: ts.attend(q, k, v, qp, kp, kp.shape[1] - 1, c,
                                                                  attn.AttentionImpl.AUTO, state)[0],
                     static_argnums=6)
    rows = {}
    for s in args.lengths:
        q, k, v, kpos, qpos = layer_case(s, dtype)
        t_dense = timed(dense, q, k, v, kpos, qpos, reps=args.reps)
        row = {"dense_ms": 1e3 * t_dense}
        for share in ("layer", "kv_head"):
            c = dataclasses.replace(cfg, share=share)
            slots = ts.select(q, k, kpos, qpos, end(s), c)
            row[f"attn_{share}_ms"] = 1e3 * timed(gathered, q, k, v, kpos, qpos, slots, reps=args.reps)
            row[f"step_{share}_ms"] = 1e3 * timed(step, q, k, v, kpos, qpos, c, reps=args.reps)
        c = dataclasses.replace(cfg, cache_threshold=args.threshold)
        top = ts.select(q, k, kpos, qpos, end(s), c)[..., c.n_init:c.n_init + c.k]
        hit = (q[:, 0].astype(jnp.float32), top, jnp.int32(0), jnp.int32(1))  # the same query again
        miss = (-q[:, 0].astype(jnp.float32), top, jnp.int32(0), jnp.int32(1))
        row["step_hit_ms"] = 1e3 * timed(cached, q, k, v, kpos, qpos, hit, c, reps=args.reps)
        row["step_miss_ms"] = 1e3 * timed(cached, q, k, v, kpos, qpos, miss, c, reps=args.reps)
        rows[s] = row
        print(f"  S={s:6d}: dense {row['dense_ms']:.3f} ms | attention over {c.n_init + c.k + c.n_local + 1} "
              f"selected: per layer {row['attn_layer_ms']:.3f} ms ({t_dense * 1e3 / row['attn_layer_ms']:.1f}x), "
              f"per kv head {row['attn_kv_head_ms']:.3f} ms ({t_dense * 1e3 / row['attn_kv_head_ms']:.1f}x) | "
              f"scoring + attention {row['step_layer_ms']:.3f} ms ({t_dense * 1e3 / row['step_layer_ms']:.2f}x), "
              f"per kv head {row['step_kv_head_ms']:.3f} ms | selection cache hit {row['step_hit_ms']:.3f} ms, "
              f"miss {row['step_miss_ms']:.3f} ms", flush=True)
    return rows


def cached_speedup(row, hit_rate):
    t = hit_rate * row["step_hit_ms"] + (1 - hit_rate) * row["step_miss_ms"]
    return row["dense_ms"] / t


# --- text -------------------------------------------------------------------------------------

def man_texts(min_chars: int) -> list[tuple[str, str]]:
    """(name, running text) of the largest English man pages, largest first."""
    out = []
    for path in sorted(MAN1.glob("*.1.gz"), key=lambda p: (-p.stat().st_size, p.name))[:40]:
        text = strip_roff(gzip.decompress(path.read_bytes()).decode("utf-8", "replace"))
        if len(text) >= min_chars:
            out.append((path.name.removesuffix(".1.gz"), text))
    return out


def truncate_to_tokens(tokenizer, text: str, n: int) -> str:
    """The prefix of ``text`` that tokenizes to at most ``n`` tokens."""
    enc = tokenizer.hf.encode(text, add_special_tokens=False)
    return text if len(enc.ids) <= n else text[:enc.offsets[n - 1][1]]


# --- (c) end-to-end decoding --------------------------------------------------------------------

def decode_section(args, loaded, cfg: ts.TokenSelectConfig, texts):
    model = Llama(loaded.config)
    decode_model = gen.with_layer_loop(model, gen.DECODE_LAYER_LOOP)
    tok, params = loaded.tokenizer, loaded.params
    ctx, steps = args.decode_context, args.decode_steps
    ids = tok.hf.encode(" ".join(t for _, t in texts), add_special_tokens=False).ids[:ctx - steps]
    tokens = jnp.asarray(ids, jnp.int32)[None]
    positions = jnp.arange(len(ids), dtype=jnp.int32)[None]
    prefill = jax.jit(lambda p, t, pos: model.apply({"params": p}, t, positions=pos,
                                                    cache=KVCache.create(model.config, 1, t.shape[1]),
                                                    last_logits_only=True))
    out = prefill(params, tokens, positions)
    cache = gen._grow(out.cache, steps)
    first = jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32)
    split = split_layers(params)

    def loop(sparse):
        kw = {} if sparse is None else {"sparse": sparse}

        @jax.jit
        def go(split, cache, first):
            def body(i, carry):
                cache, last = carry
                o = decode_model.apply({"params": split}, last[:, None], positions=(len(ids) + i)[None, None],
                                       cache=cache, **kw)
                return o.cache, jnp.argmax(o.logits[:, -1], -1).astype(jnp.int32)

            return jax.lax.fori_loop(0, steps, body, (cache, first))

        return go

    results = {}
    for name, sparse in (("dense", None), ("tokenselect", cfg),
                         ("tokenselect_cached", dataclasses.replace(cfg, cache_threshold=args.threshold))):
        c = cache
        if sparse is not None and sparse.cache_threshold is not None:
            mc = model.config
            c = cache.replace(selection=ts.SelectionState.create(sparse, mc.n_layers, 1, mc.n_heads, mc.n_kv_heads,
                                                                 mc.head_dim))
        go = loop(sparse)
        jax.block_until_ready(go(split, c, first))  # compile
        start = time.perf_counter()
        final_cache, _ = jax.block_until_ready(go(split, c, first))
        seconds = time.perf_counter() - start
        results[name] = steps / seconds
        extra = ""
        if final_cache.selection is not None:
            sel = final_cache.selection
            results["hit_rate"] = float(jnp.sum(sel.hits) / jnp.maximum(jnp.sum(sel.steps), 1))
            extra = f", selection-cache hits {results['hit_rate']:.1%} of layer steps"
        print(f"  {name}: {results[name]:.2f} tokens/s after a {len(ids)}-token prompt{extra}", flush=True)
    return results


# --- (d) quality --------------------------------------------------------------------------------

def quality_section(args, loaded, cfg: ts.TokenSelectConfig, texts):
    model = Llama(loaded.config)
    tok = loaded.tokenizer
    docs = [(name, truncate_to_tokens(tok, text, args.doc_tokens)) for name, text in texts[:args.docs]]
    window = args.doc_tokens  # the whole document in one window (a multiple of the chunk)

    def bpb(sparse):
        nll_fn = None if sparse is None else ts.make_nll_fn(model, sparse)
        apply = lambda p, t, pos: model.apply({"params": p}, t, positions=pos).logits  # noqa: E731
        res = [evaluate_bpb(apply, loaded.params, tok, text, window=window, stride=window, batch_size=1,
                            progress=False, nll_fn=nll_fn) for _, text in docs]
        return sum(r.nats for r in res) / np.log(2) / sum(r.bytes for r in res), [r.bpb for r in res]

    dense, per_doc = bpb(None)
    print(f"  dense: {dense:.4f} bits/byte over {len(docs)} documents of {args.doc_tokens} tokens "
          f"({', '.join(f'{n} {b:.3f}' for (n, _), b in zip(docs, per_doc))})", flush=True)
    curve = {}
    for k in args.ks:
        value, _ = bpb(dataclasses.replace(cfg, k=k))
        curve[k] = value
        print(f"  TokenSelect k={k:5d} (per layer): {value:.4f} bits/byte ({value / dense:.4f} x dense)", flush=True)
    kv_head, _ = bpb(dataclasses.replace(cfg, share="kv_head"))
    print(f"  TokenSelect k={cfg.k:5d} (per kv head): {kv_head:.4f} bits/byte ({kv_head / dense:.4f} x dense)")
    at_k = curve[cfg.k] if cfg.k in curve else bpb(cfg)[0]
    return dense, curve, at_k, kv_head


def plot_quality(dense: float, curve: dict, kv_head: float, k: int, n_fixed: int, doc_tokens: int, path: Path):
    """Bits per byte vs the number of selected tokens k (log axis), dense as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ks = sorted(curve)
    ax.plot(ks, [curve[x] for x in ks], "o-", label="TokenSelect, one selection per layer")
    ax.plot([k], [kv_head], "s", label="TokenSelect, one selection per kv head")
    ax.axhline(dense, color="k", ls="--", label=f"dense attention ({dense:.4f})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"selected tokens k (+ {n_fixed} initial and local) of {doc_tokens}")
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title("SmolLM2-135M on long man pages, chunked prefill")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
    print(f"  wrote {path}")


# --- (e) needle in a haystack --------------------------------------------------------------------

def needle_prompt(tok, filler: str, length: int, depth: float, key: int) -> list[int]:
    needle = f" The secret pass key is {key}. Remember it: {key} is the pass key. "
    question = "\nWhat is the secret pass key? The secret pass key is"
    budget = length - len(tok.encode(needle)) - len(tok.encode(question))
    filler_ids = tok.hf.encode(filler, add_special_tokens=False).ids[:budget]
    cut = int(depth * len(filler_ids))
    return filler_ids[:cut] + tok.encode(needle) + filler_ids[cut:] + tok.encode(question)


def needle_section(args, loaded, cfg: ts.TokenSelectConfig, texts):
    model = Llama(loaded.config)
    tok = loaded.tokenizer
    filler = " ".join(t for _, t in texts[::-1])  # other pages first than the quality set's
    rng = np.random.default_rng(0)
    found = {"dense": 0, "tokenselect": 0}
    total = 0
    for length in args.needle_lengths:
        for depth in args.depths:
            key = int(rng.integers(10_000, 100_000))
            ids = needle_prompt(tok, filler, length, depth, key)
            row = []
            for name, sparse in (("dense", None), ("tokenselect", cfg)):
                out = gen.generate(model, loaded.params, [ids], max_new_tokens=8, eos_id=tok.eos_id,
                                   pad_id=tok.pad_id, sparse=sparse)
                ok = str(key) in tok.decode(out[0])
                found[name] += ok
                row.append(f"{name} {'found' if ok else 'missed'}")
            total += 1
            print(f"  {len(ids):5d} tokens, needle at {depth:.0%}: {', '.join(row)}", flush=True)
    return {name: n / total for name, n in found.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy sizes for every section (checks it end to end)")
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[8192, 16384, 32768, 65536])
    p.add_argument("--k", type=int, default=2048)
    p.add_argument("--n-init", type=int, default=128)
    p.add_argument("--n-local", type=int, default=512)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--threshold", type=float, default=0.9, help="selection-cache cosine threshold")
    p.add_argument("--decode-context", type=int, default=8192)
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--doc-tokens", type=int, default=8192)
    p.add_argument("--ks", type=lambda s: [int(x) for x in s.split(",")], default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--needle-lengths", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 4096, 8000])
    p.add_argument("--depths", type=lambda s: [float(x) for x in s.split(",")], default=[0.1, 0.5, 0.9])
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--sections", default="abcde", help="which sections to run (letters)")
    p.add_argument("--plot", type=Path, default=None, help="write the quality curve of (d) to this PNG")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.k, args.n_init, args.n_local, args.chunk = [2048, 8192], 256, 16, 64, 128
        args.decode_context, args.decode_steps, args.docs, args.doc_tokens = 1024, 8, 2, 1024
        args.ks, args.needle_lengths, args.depths, args.reps = [64, 256], [1024], [0.5], 5
    cfg = ts.TokenSelectConfig(k=args.k, n_init=args.n_init, n_local=args.n_local, chunk=args.chunk)
    print(f"CPU: {cpu_description()}; jax {jax.__version__}; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores; TokenSelect k={cfg.k} n_init={cfg.n_init} n_local={cfg.n_local} "
          f"chunk={cfg.chunk}; {args.dtype}", flush=True)
    result = {}
    rows = {}
    if "a" in args.sections or "b" in args.sections:
        print("(a, b) one layer, one decode query:")
        rows = attention_section(args, cfg, None)
        top = rows[max(rows)]
        result["attn_speedup_64k"] = top["dense_ms"] / top["attn_layer_ms"]
        result["step_speedup_64k"] = top["dense_ms"] / top["step_layer_ms"]
    needs_model = any(c in args.sections for c in "cde")
    if needs_model:
        loaded = load_pretrained_lm("smollm2-135m", dtype=args.dtype, param_dtype=args.dtype)
        texts = man_texts(min_chars=4 * args.doc_tokens)
    if "c" in args.sections:
        print(f"(c) SmolLM2-135M greedy decoding, {args.decode_steps} tokens:")
        dec = decode_section(args, loaded, cfg, texts)
        result["decode_speedup_8k"] = dec["tokenselect"] / dec["dense"]
        result["decode_speedup_8k_cached"] = dec["tokenselect_cached"] / dec["dense"]
        result["cache_hit_rate"] = dec["hit_rate"]
        if rows:
            result["step_speedup_64k_cached"] = cached_speedup(rows[max(rows)], dec["hit_rate"])
            print(f"  (b) with SmolLM2's hit rate {dec['hit_rate']:.1%}: scoring + attention at S={max(rows)} "
                  f"with the selection cache {result['step_speedup_64k_cached']:.2f}x dense")
    if "d" in args.sections:
        print("(d) bits per byte, long documents:")
        dense, curve, at_k, kv_head = quality_section(args, loaded, cfg, texts)
        if args.plot:
            plot_quality(dense, curve, kv_head, cfg.k, cfg.n_init + cfg.n_local, args.doc_tokens, args.plot)
        result["bpb_ratio"] = at_k / dense
        result["bpb_ratio_kv_head"] = kv_head / dense
    if "e" in args.sections:
        print("(e) needle in a haystack:")
        found = needle_section(args, loaded, cfg, texts)
        result["needle_dense"], result["needle_sparse"] = found["dense"], found["tokenselect"]
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print("RESULT " + " ".join(f"{k}={v:.3f}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
