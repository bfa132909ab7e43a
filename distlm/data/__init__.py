"""Pretraining data: corpus readers, tokenizer, sharded token cache (Ray Data or in-process), resumable sampling."""

from distlm.data.corpus import DataError, corpus_files, corpus_manifest, iter_documents
from distlm.data.sampler import ResumableSampler
from distlm.data.shards import is_validation
from distlm.data.tokenizer import EOS_TOKEN, load_tokenizer, train_tokenizer
from distlm.data.tokens import PreparedData, TokenBlocks, cache_key, find_prepared, prepare_data

__all__ = [
    "EOS_TOKEN",
    "DataError",
    "PreparedData",
    "ResumableSampler",
    "TokenBlocks",
    "cache_key",
    "corpus_files",
    "corpus_manifest",
    "find_prepared",
    "is_validation",
    "iter_documents",
    "load_tokenizer",
    "prepare_data",
    "train_tokenizer",
]
