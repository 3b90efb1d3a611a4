"""Speculative decoding of SmolLM2-135M on this CPU: MAT and wall-clock speedup over jaxtok's own
greedy decoding, per drafter and tree template, and transformers' prompt-lookup decoding on the
same prompts as the outside anchor.

    python benchmarks/speculative.py                               # 30 prompts, both dtypes, 128 tokens
    python benchmarks/speculative.py --dtypes bfloat16 --per-category 2 --templates p16,p32

Prompts: benchmarks/speculative_prompts.json, Spec-Bench's six categories (multi-turn chat,
translation, summarisation, QA, math, RAG), through the chat template. Per dtype, every method
runs every prompt once, greedy, ``--max-new-tokens`` at most (EOS stops earlier; each method's
output is checked against plain greedy, and every difference is located: a flip where plain
greedy's top-2 logit margin is below ``FLIP_MARGIN`` is reordered arithmetic — 1e-4 in float32;
in bfloat16 the logits themselves are bf16, 0.125 apart at their magnitude (16-32), so a margin of
two bf16 steps (0.25) or less is a tie at that precision — anything else a bug).
Token Recycling's adjacency matrix and the Lookahead trie are hot: kept across the prompts, in
order, as in the papers. Compilation is kept out of the timings: prompts are padded to multiples
of ``--pad`` (a few compiled shapes), and each shape is compiled by a warm-up call first
(drafter state reset afterwards).

Columns: MAT = tokens emitted per verification pass (accepted + bonus, prefill not counted);
speedup = greedy seconds / method seconds over the same prompts (one run, interleaved per
prompt, so load from other processes hits all methods alike). The step-time split (draft,
forward, accept, update) comes from the host loop: every Lookahead run, and Token Recycling's best
template re-run on the host for ``--split-prompts`` prompts.

transformers: ``generate(do_sample=False)`` vs ``generate(..., prompt_lookup_num_tokens=k)`` on the
same token ids, its own speedup (its greedy / its prompt lookup).

Last line: ``RESULT recycling_<dtype>_mat=… recycling_<dtype>_speedup=… lookahead_<dtype>_mat=…
lookahead_<dtype>_speedup=… pld_hf_<dtype>_speedup=… best_template=… flips=… mismatches=…``
(recycling = its best template by speedup).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see smollm2_forward.py: spinning threads on a shared CPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from smollm2_forward import cpu_description  # noqa: E402

from jaxtok.decode import drafters as dr  # noqa: E402
from jaxtok.decode import generate as gen  # noqa: E402
from jaxtok.decode import speculative as sp  # noqa: E402
from jaxtok.models.llama import Llama  # noqa: E402
from jaxtok.models.registry import load_pretrained_lm  # noqa: E402

PROMPTS = Path(__file__).parent / "speculative_prompts.json"
FLIP_MARGIN = {"float32": 1e-4, "bfloat16": 0.25}


def load_prompts(tokenizer, per_category: int) -> list[tuple[str, list[int]]]:
    entries = json.loads(PROMPTS.read_text())["prompts"]
    taken: dict[str, int] = {}
    out = []
    for e in entries:
        if taken.get(e["category"], 0) < per_category:
            taken[e["category"]] = taken.get(e["category"], 0) + 1
            out.append((e["category"], tokenizer.encode(tokenizer.apply_chat_template(e["messages"]))))
    return out


def greedy(model, params, ids, n, eos, pad, multiple):
    """jaxtok's generate (its own jitted prefill + while_loop), prompts padded to ``multiple``."""
    tokens, positions = gen.left_pad([ids], pad, multiple)
    run = gen._generate_jit_cpu if gen._skip_float_normalization(model, params) else gen._generate_jit
    models = (gen.with_layer_loop(model, gen.PREFILL_LAYER_LOOP), gen.with_layer_loop(model, gen.DECODE_LAYER_LOOP))
    out = np.asarray(run(*models, params, jnp.asarray(tokens), jnp.asarray(positions), jax.random.key(0),
                         max_new_tokens=n, sampling=gen.SamplingConfig(), eos_id=eos, pad_id=pad))[0].tolist()
    return out[:out.index(eos) + 1] if eos in out else out


def first_difference(model, params, ids, want, got):
    """(index, plain greedy's top-2 margin there) or None when identical (a prefix of a longer
    output counts as identical only when the shorter one ended at the budget)."""
    i = next((j for j, (a, b) in enumerate(zip(want, got)) if a != b), None)
    if i is None:
        return None if len(want) == len(got) else (min(len(want), len(got)), float("nan"))
    logits = model.apply({"params": params}, jnp.asarray([ids + want[:i]])).logits[0, -1]
    top = jax.lax.top_k(logits, 2)[0]
    return i, float(top[0] - top[1])


def run_dtype(dtype, args, prompts, lm):
    model = Llama(lm.config)
    params = lm.params
    tok = lm.tokenizer
    eos, pad, n = tok.eos_id, tok.pad_id, args.max_new_tokens
    methods = [f"recycling:{t}" for t in args.templates] + (["lookahead"] if args.lookahead_size else [])

    def fresh(method):
        if method == "lookahead":
            return dr.LookaheadTrie(tree_size=args.lookahead_size, max_depth=args.lookahead_depth)
        return dr.TokenRecycling(lm.config.vocab_size, dr.template(method.split(":")[1]))

    drafters = {m: fresh(m) for m in methods}
    # warm-up: one call per padded shape and method compiles it; then the drafters start cold
    buckets = {}
    for _, ids in prompts:
        buckets.setdefault(-(-len(ids) // args.pad), ids)
    t0 = time.perf_counter()
    for ids in buckets.values():
        greedy(model, params, ids, n, eos, pad, args.pad)
        for m in methods:
            sp.speculative_generate(model, params, ids, drafters[m], max_new_tokens=n, eos_id=eos, pad_id=pad,
                                    pad_multiple=args.pad)
    drafters = {m: fresh(m) for m in methods}
    print(f"  {dtype}: compiled {len(buckets)} prompt shapes x {1 + len(methods)} methods in "
          f"{time.perf_counter() - t0:.0f}s", file=sys.stderr)

    rows = []
    for idx, (category, ids) in enumerate(prompts):
        t0 = time.perf_counter()
        want = greedy(model, params, ids, n, eos, pad, args.pad)
        row = dict(category=category, prompt_tokens=len(ids), greedy=dict(seconds=time.perf_counter() - t0,
                                                                           tokens=len(want)))
        for m in methods:
            t0 = time.perf_counter()
            res = sp.speculative_generate(model, params, ids, drafters[m], max_new_tokens=n, eos_id=eos, pad_id=pad,
                                          pad_multiple=args.pad)
            seconds = time.perf_counter() - t0
            diff = first_difference(model, params, ids, want, res.tokens)
            row[m] = dict(seconds=seconds, tokens=len(res.tokens), passes=res.forward_passes, mat=res.mat,
                          split=res.seconds, diff=diff)
        rows.append(row)
        print(f"  {dtype} {idx + 1}/{len(prompts)} {category:13} greedy {row['greedy']['seconds']:.1f}s " +
              " ".join(f"{m} {row[m]['seconds']:.1f}s mat {row[m]['mat']:.2f}" for m in methods), file=sys.stderr)

    # the step-time split of the best recycling template, on the host loop (hot matrix)
    split = None
    rec = [m for m in methods if m.startswith("recycling")]
    if rec and args.split_prompts:
        best = max(rec, key=lambda m: sum(r["greedy"]["seconds"] for r in rows) / sum(r[m]["seconds"] for r in rows))
        d = drafters[best]
        sp.speculative_generate(model, params, prompts[0][1], d, max_new_tokens=n, eos_id=eos, pad_id=pad,
                                pad_multiple=args.pad, loop="host")  # compile
        split = dict(prefill=0.0, draft=0.0, forward=0.0, accept=0.0, update=0.0)
        for _, ids in prompts[:args.split_prompts]:
            res = sp.speculative_generate(model, params, ids, d, max_new_tokens=n, eos_id=eos, pad_id=pad,
                                          pad_multiple=args.pad, loop="host")
            for k, v in res.seconds.items():
                split[k] += v
    return dict(rows=rows, methods=methods, recycling_split=split)


def hf_prompt_lookup(args, prompts, lm, dtype):
    """transformers: its greedy and its prompt-lookup decoding on the same ids."""
    import torch
    import transformers

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    path = lm.path
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=getattr(torch, dtype)).eval()
    out = []
    with torch.inference_mode():
        ids0 = torch.tensor([prompts[0][1]])
        model.generate(ids0, do_sample=False, max_new_tokens=8, pad_token_id=lm.tokenizer.eos_id)  # warm
        for _, ids in prompts:
            x = torch.tensor([ids])
            kw = dict(attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=args.max_new_tokens,
                      pad_token_id=lm.tokenizer.eos_id)
            t0 = time.perf_counter()
            plain = model.generate(x, **kw)[0, len(ids):].tolist()
            t1 = time.perf_counter()
            pld = model.generate(x, prompt_lookup_num_tokens=args.pld_tokens, **kw)[0, len(ids):].tolist()
            t2 = time.perf_counter()
            out.append(dict(greedy=t1 - t0, pld=t2 - t1, identical=plain == pld, tokens=len(plain)))
    return out


def summarize(dtype, result, hf):
    rows, methods = result["rows"], result["methods"]
    greedy_s = sum(r["greedy"]["seconds"] for r in rows)
    greedy_tok = sum(r["greedy"]["tokens"] for r in rows)
    print(f"\n{dtype}: {len(rows)} prompts, greedy {greedy_tok} tokens in {greedy_s:.1f}s "
          f"({greedy_tok / greedy_s:.1f} tokens/s)")
    cats = sorted({r["category"] for r in rows})
    print(f"{'method':18} {'MAT':>5} {'speedup':>8} {'tok/s':>6} {'flips':>5} {'bugs':>5}  MAT per category: " +
          " ".join(f"{c[:8]:>8}" for c in cats))
    summary = {}
    for m in methods:
        passes = sum(r[m]["passes"] for r in rows)
        emitted = sum(r[m]["tokens"] - 1 for r in rows)
        secs = sum(r[m]["seconds"] for r in rows)
        diffs = [r[m]["diff"] for r in rows if r[m]["diff"] is not None]
        flips = sum(1 for d in diffs if d[1] <= FLIP_MARGIN[dtype])
        bugs = len(diffs) - flips
        per_cat = []
        for c in cats:
            cr = [r for r in rows if r["category"] == c]
            per_cat.append(sum(r[m]["tokens"] - 1 for r in cr) / max(1, sum(r[m]["passes"] for r in cr)))
        mat = emitted / max(passes, 1)
        summary[m] = dict(mat=mat, speedup=greedy_s / secs, flips=flips, bugs=bugs,
                          per_category=dict(zip(cats, per_cat)))
        print(f"{m:18} {mat:5.2f} {greedy_s / secs:8.2f} {sum(r[m]['tokens'] for r in rows) / secs:6.1f} {flips:5d} "
              f"{bugs:5d}  {'':18}" + " ".join(f"{x:8.2f}" for x in per_cat))
    la = [r["lookahead"]["split"] for r in rows if "lookahead" in r]
    for name, split in (("recycling (host loop)", result["recycling_split"]),
                        ("lookahead", {k: sum(s[k] for s in la) for k in la[0]} if la else None)):
        if split:
            total = sum(split.values())
            print(f"step-time split, {name}: " + ", ".join(f"{k} {v / total:.1%}" for k, v in split.items()))
    if hf:
        g, p = sum(h["greedy"] for h in hf), sum(h["pld"] for h in hf)
        print(f"transformers {dtype}: greedy {g:.1f}s, prompt lookup {p:.1f}s, speedup {g / p:.2f}, "
              f"identical outputs {sum(h['identical'] for h in hf)}/{len(hf)}")
        summary["pld_hf"] = dict(speedup=g / p)
    return summary


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--templates", default="p8,p16,p32", help="Token Recycling tree templates")
    p.add_argument("--lookahead-size", type=int, default=16, help="Lookahead tree nodes (0: skip)")
    p.add_argument("--lookahead-depth", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--per-category", type=int, default=5)
    p.add_argument("--pad", type=int, default=256, help="prompts padded to a multiple (compiled shapes)")
    p.add_argument("--split-prompts", type=int, default=3)
    p.add_argument("--pld-tokens", type=int, default=10, help="transformers' prompt_lookup_num_tokens")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--json", default=None, help="write all rows here")
    args = p.parse_args()
    args.templates = [t for t in args.templates.split(",") if t]
    print(f"CPU: {cpu_description()}; jax {jax.__version__}; load average {os.getloadavg()}")
    results, keys = {}, []
    for dtype in args.dtypes.split(","):
        lm = load_pretrained_lm("smollm2-135m", dtype=dtype, param_dtype=dtype)
        prompts = load_prompts(lm.tokenizer, args.per_category)
        result = run_dtype(dtype, args, prompts, lm)
        hf = None if args.no_transformers else hf_prompt_lookup(args, prompts, lm, dtype)
        summary = summarize(dtype, result, hf)
        results[dtype] = dict(result=result, hf=hf, summary=summary)
        short = "bf16" if dtype == "bfloat16" else "f32"
        rec = {m: s for m, s in summary.items() if m.startswith("recycling")}
        if rec:
            best = max(rec, key=lambda m: rec[m]["speedup"])
            keys += [f"recycling_{short}_mat={rec[best]['mat']:.2f}",
                     f"recycling_{short}_speedup={rec[best]['speedup']:.2f}",
                     f"recycling_{short}_template={best.split(':')[1]}"]
        if "lookahead" in summary:
            keys += [f"lookahead_{short}_mat={summary['lookahead']['mat']:.2f}",
                     f"lookahead_{short}_speedup={summary['lookahead']['speedup']:.2f}"]
        if "pld_hf" in summary:
            keys.append(f"pld_hf_{short}_speedup={summary['pld_hf']['speedup']:.2f}")
        keys.append(f"{short}_flips={sum(s.get('flips', 0) for s in summary.values())}")
        keys.append(f"{short}_mismatches={sum(s.get('bugs', 0) for s in summary.values())}")
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1, default=str))
        tmp.replace(args.json)  # atomic
    print(f"load average at the end {os.getloadavg()}")
    print("RESULT " + " ".join(keys))


if __name__ == "__main__":
    main()
