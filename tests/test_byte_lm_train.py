"""The byte LM through ``jaxtok pretrain`` (family dispatch, resume), its run directory loaded
without a tokenizer.json, ``generate`` and ``jaxtok generate --model-path``, bits per byte on a text."""

import dataclasses

import jax
import numpy as np

from jaxtok import cli
from jaxtok.data.words import byte_tokenizer
from jaxtok.decode.generate import generate
from jaxtok.io.run_dir import load_run_dir
from jaxtok.models import byte_lm
from jaxtok.models.registry import module_for
from jaxtok.next_word import ByteLMContinuer, evaluate_bpb_words
from jaxtok.train import configs, pretrain

SMALL = ["steps=2", "eval_every=2", "checkpoint_every=2", "eval_batches=1", "data.max_documents=3",
         "data.global_batch=8", "data.seq_words=16", "progress=false", "model.max_word_bytes=8",
         "model.max_seq_len=32"]


def test_pretrain_resume_load_generate(tmp_path, capsys):
    run_dir = tmp_path / "run"
    config = configs.apply_overrides(configs.get_config("byte-lm-tiny"), SMALL + [f"run_dir={run_dir}"])
    assert configs.model_family(config.model).module_cls is byte_lm.ByteLM
    first = pretrain.run(config)
    assert first.summary["steps"] == 2 and np.isfinite(first.summary["last_loss"])
    assert not (run_dir / pretrain.TOKENIZER_FILE).exists()
    # the checkpoint's config reads back with the family's data class, and the run resumes
    step, saved = configs.saved_config(run_dir / pretrain.CHECKPOINT_DIR)
    assert step == 2 and saved == config
    resumed = pretrain.run(dataclasses.replace(config, steps=3), resume=True)
    assert int(jax.device_get(resumed.state.step)) == 3
    assert "resumed from step 2" in capsys.readouterr().out

    loaded = load_run_dir(run_dir)  # no tokenizer.json: the byte family reads and writes bytes
    assert isinstance(loaded.config, byte_lm.ByteLMConfig)
    model = module_for(loaded.config)
    prompt = list(b"def ")
    ids = generate(model, loaded.params, [prompt], max_new_tokens=6, eos_id=None)
    want = b"".join(byte_lm.generate_uncached(model, loaded.params, prompt, 6))[:6]
    assert bytes(ids[0]) == want
    assert ByteLMContinuer(model, loaded.params)(["def "], 6) == [want]

    assert cli.main(["generate", "--model-path", str(run_dir), "--prompt", "def ", "--max-new-tokens", "6",
                     "--raw"]) == 0
    assert capsys.readouterr().out.strip() == loaded.tokenizer.decode(list(want)).strip()
    assert cli.main(["eval-bpb", "--model-path", str(run_dir), "--text", str(text_file(tmp_path))]) == 0
    assert capsys.readouterr().out.startswith("RESULT bpb=")

    text = "x = 1\nnaïve 東京\n"
    result = evaluate_bpb_words(model, loaded.params, text, seq_words=4)
    assert result.bytes == len(text.encode()) and result.tokens == len(byte_lm.prompt_words(list(text.encode()), 8)) - 1
    assert 0 < result.bpb < 16


def text_file(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text("def f(x):\n    return x\n", encoding="utf-8")
    return path


def test_byte_tokenizer_ids_are_bytes():
    tok = byte_tokenizer()
    text = "héllo 👍\x00\n"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids == list(text.encode()) and tok.decode(ids) == text
    assert tok.token_to_id("<|endoftext|>") == 256 and tok.get_vocab_size() == 257
