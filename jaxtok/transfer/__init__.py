"""Tokenizer transfer: re-embed a pretrained LM for a new tokenizer (see ``api.transfer``)."""

from jaxtok.transfer.api import (
    EMBEDDING_SLOTS,
    EmbeddingSlots,
    TransferredLM,
    embedding_matrices,
    register_embedding_slots,
    transfer,
    transfer_to_folder,
    with_embeddings,
)
from jaxtok.transfer.decompose import Decomposition, TransferError, decompose, vocabulary
from jaxtok.transfer.export import export_hf_folder
from jaxtok.transfer.methods import METHODS, MethodContext, parse_options
from jaxtok.transfer.train_tokenizer import train_tokenizer

__all__ = [
    "EMBEDDING_SLOTS", "Decomposition", "EmbeddingSlots", "METHODS", "MethodContext", "TransferError",
    "TransferredLM", "decompose", "embedding_matrices", "export_hf_folder", "parse_options",
    "register_embedding_slots", "train_tokenizer", "transfer", "transfer_to_folder", "vocabulary",
    "with_embeddings",
]
