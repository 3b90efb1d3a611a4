"""Export to Hugging Face folders (transformers loads them, same logits), atomic writes, the
``train-tokenizer`` / ``transfer`` / ``eval-bpb`` / ``pretrain`` round trip through a folder and
a run directory, and the errors for bad input."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _transfer_models import ENGLISH, GERMAN, german_tokenizer, tiny_bert, tiny_llama

from jaxtok.cli import main
from jaxtok.io.hf_folder import load_hf_folder
from jaxtok.models.bert import Bert
from jaxtok.models.llama import Llama
from jaxtok.models.registry import load_pretrained_lm
from jaxtok.transfer import TransferError, export_hf_folder, transfer


@pytest.fixture(scope="module")
def transferred():
    return transfer(tiny_llama(tie=False), german_tokenizer(), "fvt", base_name="tiny")


def test_folder_round_trip_keeps_params_and_roles(tmp_path, transferred):
    out = export_hf_folder(transferred, tmp_path / "m")
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "tokenizer.json", "tokenizer_config.json", "transfer.json"]
    record = json.loads((out / "transfer.json").read_text())
    assert record["method"] == "fvt" and record["base_model"] == "tiny"
    assert record["tokenizer_sha256"] == transferred.record["tokenizer_sha256"]
    back = load_hf_folder(out)
    assert back.config == transferred.config
    jax.tree.map(np.testing.assert_array_equal, back.params, jax.tree.map(np.asarray, transferred.params))
    for role in ("bos_id", "eos_id", "pad_id", "doc_start_id"):
        assert getattr(back.tokenizer, role) == getattr(transferred.tokenizer, role)
    assert back.tokenizer.encode(GERMAN[1]) == transferred.tokenizer.encode(GERMAN[1])


def test_existing_folder_is_refused_and_a_failed_export_leaves_it_intact(tmp_path, transferred):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(TransferError, match="not empty; pass --overwrite"):
        export_hf_folder(transferred, out)
    broken = dataclasses.replace(transferred, params={k: v for k, v in transferred.params.items() if k != "blocks"})
    with pytest.raises(KeyError):
        export_hf_folder(broken, out, overwrite=True)  # fails half-way through writing
    assert os.listdir(tmp_path) == ["m"] and os.listdir(out) == ["keep.txt"]  # no partial folder left
    export_hf_folder(transferred, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert os.listdir(tmp_path) == ["m"]


@pytest.mark.reference
def test_transformers_loads_the_llama_folder_with_equal_logits(tmp_path):
    """Tied (one matrix) and untied (both matrices) transferred models, loaded offline."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    for tie in (True, False):
        lm = transfer(tiny_llama(tie=tie), german_tokenizer(), "fvt")
        out = export_hf_folder(lm, tmp_path / f"tie-{tie}")
        model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        assert model.config.tie_word_embeddings == tie
        tok = transformers.AutoTokenizer.from_pretrained(str(out))
        ids = tok(GERMAN[2])["input_ids"]
        assert ids == lm.tokenizer.encode(GERMAN[2])
        with torch.no_grad():
            theirs = model(torch.tensor([ids])).logits.numpy()
        ours = Llama(lm.config).apply({"params": lm.params}, jnp.asarray([ids])).logits
        np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.reference
def test_transformers_loads_the_bert_folder_with_equal_hidden_states(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxtok.transfer.train_tokenizer import train_tokenizer

    base = tiny_bert()
    new = train_tokenizer(ENGLISH, "unigram", 200, base=base.tokenizer.hf)
    lm = transfer(base, new, "fvt")
    out = export_hf_folder(lm, tmp_path / "bert")
    model = transformers.AutoModel.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(model).__name__ == "BertModel"
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = tok(ENGLISH[1])["input_ids"]
    assert ids == new.encode(ENGLISH[1]).ids and ids[0] == new.token_to_id("[CLS]")
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).last_hidden_state.numpy()
    ours = Bert(lm.config).apply({"params": lm.params}, jnp.asarray([ids])).last_hidden
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-4)


def test_cli_train_transfer_eval_continue_and_omp_donor(tmp_path, capsys):
    """train-tokenizer -> transfer (fvt) -> eval-bpb on the folder -> pretrain from the folder ->
    the run directory as the OMP donor of a second transfer."""
    base_dir = export_hf_folder(tiny_llama(tie=True), tmp_path / "base")
    text = tmp_path / "de.txt"
    text.write_text("\n\n".join(GERMAN), encoding="utf-8")
    tok = tmp_path / "de.json"
    assert main(["train-tokenizer", "--text", str(text), "--kind", "bpe", "--vocab-size", "330", "--base",
                 "--model-path", str(base_dir), "--out", str(tok)]) == 0
    out = tmp_path / "fvt"
    assert main(["transfer", "--model", "tiny", "--model-path", str(base_dir), "--tokenizer", str(tok),
                 "--method", "fvt", "--out", str(out)]) == 0
    assert main(["eval-bpb", "--model-path", str(out), "--text", str(text), "--window", "64"]) == 0
    assert "RESULT bpb=" in capsys.readouterr().out
    assert main(["generate", "--model-path", str(out), "--prompt", "Grüße aus", "--raw", "--max-new-tokens", "3"]) == 0

    from jaxtok.train import configs, pretrain

    config = configs.apply_overrides(configs.get_config("tiny"), [
        f"pretrained={out}", "tokenizer=pretrained", "steps=1", "eval_every=0", "checkpoint_every=1",
        "progress=false", "data.source=text", f"data.paths={text}", "data.max_documents=none",
        "data.split_on_blank_lines=true", "data.global_batch=8", "data.seq_len=32", "optimizer.warmup_steps=0"])
    run = pretrain.run(dataclasses.replace(config, run_dir=str(tmp_path / "run")))
    donor = load_pretrained_lm("donor", run.run_dir)
    assert donor.tokenizer.hf.to_str() == load_hf_folder(out).tokenizer.hf.to_str()
    assert main(["transfer", "--model-path", str(base_dir), "--tokenizer", str(tok), "--method", "omp",
                 "--option", "k=4", "--donor", str(run.run_dir), "--out", str(tmp_path / "omp")]) == 0
    assert json.loads((tmp_path / "omp" / "transfer.json").read_text())["options"]["k"] == 4


def test_cli_errors_name_the_problem(tmp_path, capsys):
    base_dir = export_hf_folder(tiny_llama(tie=True), tmp_path / "base")
    not_tok = tmp_path / "x.json"
    not_tok.write_text('{"hello": 1}')
    common = ["transfer", "--model-path", str(base_dir), "--out", str(tmp_path / "o")]
    assert main([*common, "--tokenizer", str(not_tok)]) == 2
    assert "x.json: not a valid HF tokenizer.json" in capsys.readouterr().err
    german_tokenizer().save(str(tmp_path / "de.json"))
    assert main([*common, "--tokenizer", str(tmp_path / "de.json"), "--method", "magic"]) == 2
    assert "unknown transfer method 'magic'" in capsys.readouterr().err
    assert main([*common, "--tokenizer", str(tmp_path / "de.json"), "--option", "k=2"]) == 2
    assert "unknown option 'k' for method 'fvt'" in capsys.readouterr().err
    assert main(["transfer", "--model-path", str(base_dir), "--tokenizer", str(tmp_path / "de.json"),
                 "--out", str(base_dir)]) == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err
