"""Generation on a tiny model: greedy equals an argmax loop over full forwards; sampling filters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxtok.decode.generate import SamplingConfig, generate, left_pad, sample_token
from jaxtok.models.llama import PRESETS, Llama, init_params

CFG = PRESETS["llama-tiny"]


@pytest.fixture(scope="module")
def params():
    return nn.unbox(init_params(CFG, jax.random.key(0)))


def greedy_by_full_forward(params, prompt, n):
    seq = list(prompt)
    fwd = jax.jit(lambda p, t: Llama(CFG).apply({"params": p}, t).logits)
    for _ in range(n):
        # right-padded to one length (one compile); causal, so the padding cannot leak backwards
        padded = seq + [0] * (len(prompt) + n - len(seq))
        seq.append(int(fwd(params, jnp.asarray([padded]))[0, len(seq) - 1].argmax()))
    return seq[len(prompt):]


def test_greedy_batch_with_padding_equals_reference_loop(params):
    prompts = [[5, 17, 42, 9, 100, 3], [7, 8]]  # different lengths: the second is left-padded
    out = generate(Llama(CFG), params, prompts, max_new_tokens=6, eos_id=-1, pad_id=0)
    for prompt, got in zip(prompts, out):
        assert got == greedy_by_full_forward(params, prompt, 6)


def test_stops_after_eos(params):
    prompt = [5, 17, 42]
    reference = greedy_by_full_forward(params, prompt, 5)
    eos = reference[2]
    out = generate(Llama(CFG), params, [prompt], max_new_tokens=5, eos_id=eos, pad_id=0)[0]
    assert out == reference[:reference.index(eos) + 1]


def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 200)
    def support(sampling):
        return {int(x) for x in jax.vmap(lambda k: sample_token(logits, k, sampling))(keys).ravel()}

    assert support(SamplingConfig(1.0, top_k=1)) == {0}
    assert support(SamplingConfig(1.0, top_k=2)) == {0, 1}
    # top-p 0.7: 0.5 alone is below 0.7, so tokens 0 and 1 remain
    assert support(SamplingConfig(1.0, top_p=0.7)) == {0, 1}
    full = np.asarray(jax.vmap(lambda k: sample_token(logits, k, SamplingConfig(1.0)))(keys)).ravel()
    assert set(full.tolist()) <= {0, 1, 2, 3} and (full == 0).mean() > 0.35
    assert int(sample_token(logits, keys[0], SamplingConfig())[0]) == 0


def test_left_pad_and_errors(params):
    tokens, positions = left_pad([[1, 2, 3], [4]], pad_id=0, multiple=4)
    np.testing.assert_array_equal(tokens, [[0, 1, 2, 3], [0, 0, 0, 4]])
    np.testing.assert_array_equal(positions, [[-1, 0, 1, 2], [-1, -1, -1, 0]])
    with pytest.raises(ValueError):
        left_pad([[]], pad_id=0)
    with pytest.raises(ValueError, match="context"):
        generate(Llama(CFG), params, [[1]], max_new_tokens=CFG.max_seq_len, eos_id=2)
    with pytest.raises(ValueError):
        SamplingConfig(temperature=-1.0)
