"""Input pipeline: corpus (TFDS) -> tokenizer -> packed windows -> per-host batches."""
from gpt.data.corpus import CORPORA, TextCorpus, documents, split_document
from gpt.data.pipeline import count_tokens, make_eval_batches, make_train_iterator, unigram_entropy
from gpt.data.tokenizers import HF_PREFIX, TOKENIZERS, Tokenizer, get_tokenizer, save_hf

__all__ = [
    "CORPORA", "HF_PREFIX", "TOKENIZERS", "TextCorpus", "Tokenizer", "count_tokens", "documents",
    "get_tokenizer", "make_eval_batches", "make_train_iterator", "save_hf", "split_document",
    "unigram_entropy",
]
