"""Pretraining data: corpus readers, tokenizer, cached token files, resumable sampling."""

from distlm.data.corpus import DataError, corpus_files, corpus_manifest, iter_documents
from distlm.data.sampler import ResumableSampler
from distlm.data.tokenizer import EOS_TOKEN, load_tokenizer, train_tokenizer
from distlm.data.tokens import PreparedData, TokenBlocks, cache_key, prepare_data

__all__ = [
    "EOS_TOKEN",
    "DataError",
    "PreparedData",
    "ResumableSampler",
    "TokenBlocks",
    "cache_key",
    "corpus_files",
    "corpus_manifest",
    "iter_documents",
    "load_tokenizer",
    "prepare_data",
    "train_tokenizer",
]
