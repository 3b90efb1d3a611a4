"""A ``jaxtok pretrain`` run directory as a loaded LM (latest good checkpoint + its tokenizer).

The model family comes from the config saved in the checkpoint (``train.configs.model_family``),
so any family registered there (Llama, TokenFormer, later Mamba) loads without a case here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
from tokenizers import Tokenizer

from jaxtok.io.cache import ModelFileError
from jaxtok.io.gguf_io import LoadedLM
from jaxtok.tokenization import TextTokenizer

CHECKPOINT_DIR = "checkpoints"  # = jaxtok.train.pretrain.CHECKPOINT_DIR (not imported: that pulls in the trainer)
TOKENIZER_FILE = "tokenizer.json"


def is_run_dir(path: str | Path) -> bool:
    """A folder with ``checkpoints/`` (families with a tokenizer also keep ``tokenizer.json``;
    tokenizer-free ones, the word-pooled byte LM, do not)."""
    return (Path(path) / CHECKPOINT_DIR).is_dir()


def _roles(tokenizer: Tokenizer, bos_token: str | None, pretrained) -> TextTokenizer:
    if pretrained is not None and pretrained.tokenizer.hf.to_str() == tokenizer.to_str():
        return dataclasses.replace(pretrained.tokenizer, hf=tokenizer)
    bos = tokenizer.token_to_id(bos_token) if bos_token else None
    return TextTokenizer(hf=tokenizer, bos_id=bos, eos_id=bos, pad_id=bos, doc_start_id=bos)


def load_run_dir(run_dir: str | Path) -> LoadedLM:
    """Parameters of the newest good checkpoint in ``run_dir`` (on one device) with the run's
    tokenizer; the document separator of the run's data is its bos/eos/document-start token."""
    from jaxtok.sharding import make_mesh
    from jaxtok.train import pretrain
    from jaxtok.train.checkpoint import Checkpointer
    from jaxtok.train.configs import model_family, saved_config
    from jaxtok.train.trainer import Trainer

    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise ModelFileError(f"{run_dir}: not a jaxtok pretrain run directory (needs {CHECKPOINT_DIR}/)")
    _, config = saved_config(run_dir / CHECKPOINT_DIR)
    tokenizer = None
    if model_family(config.model).data.uses_tokenizer:
        if not (run_dir / TOKENIZER_FILE).is_file():
            raise ModelFileError(f"{run_dir}: {TOKENIZER_FILE} is missing (a {config.model} run keeps one)")
        tokenizer = Tokenizer.from_file(str(run_dir / TOKENIZER_FILE))
        tokenizer.no_padding()
        tokenizer.no_truncation()
    # a run continued from a pretrained model has that model's shape (and maybe its tokenizer)
    pretrained = pretrain._load_pretrained(config)
    task, _, model_config = pretrain.build_task(config, tokenizer, pretrained)
    mesh = make_mesh(None, jax.devices()[:1])
    trainer = Trainer(task, config.optimizer, mesh, total_steps=config.steps, seed=config.seed)
    with Checkpointer(run_dir / CHECKPOINT_DIR, keep=config.keep) as checkpointer:
        restored = checkpointer.restore_latest(trainer.abstract_state)
    if restored is None:
        raise ModelFileError(f"{run_dir / CHECKPOINT_DIR}: no usable checkpoint")
    if tokenizer is None:  # a byte family reads and writes UTF-8 bytes
        from jaxtok.data.words import byte_text_tokenizer

        text_tokenizer = byte_text_tokenizer()
    else:
        text_tokenizer = _roles(tokenizer, config.data.bos_token, pretrained)
    return LoadedLM(config=model_config, params=restored.state.params, tokenizer=text_tokenizer, path=run_dir)
