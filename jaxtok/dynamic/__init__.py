"""Dynamic batch-level BPE: merge a batch's frequent adjacent subwords on device
("Retrofitting (Large) Language Models with Dynamic Tokenization")."""

from jaxtok.dynamic.merge import MergeImpl, MergeResult, dynamic_bpe, merge_batch, result_merges, result_units
from jaxtok.dynamic.reference import dynamic_bpe_counter, dynamic_bpe_reference

__all__ = ["MergeImpl", "MergeResult", "dynamic_bpe", "dynamic_bpe_counter", "dynamic_bpe_reference", "merge_batch",
           "result_merges", "result_units"]
