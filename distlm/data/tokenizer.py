"""Tokenizers: train a byte-level BPE on the corpus, or load any local Hugging Face tokenizer."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from distlm.config import ConfigError

if TYPE_CHECKING:  # transformers is imported where it is used: the driver's start-up does without it
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"


def train_tokenizer(documents: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a GPT-2 style byte-level BPE; `<|endoftext|>` is its only special token.

    Byte-level means every string is encodable (no unknown tokens) and decode(encode(s)) == s.
    """
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        # All 256 byte symbols, even those absent from the corpus, so any input encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        # Spaces are content in code: never "clean up" " ." into ".".
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: str | Path) -> None:
    """save_pretrained, naming the class every transformers release can load.

    transformers 5 writes "TokenizersBackend", which 4.x cannot resolve; both load
    "PreTrainedTokenizerFast" for a tokenizer.json-backed tokenizer.
    """
    tokenizer.save_pretrained(directory)
    config_path = Path(directory) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2))


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local save_pretrained directory (never from the Hub)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(
            f"data.tokenizer={path} is not a directory: give a local Hugging Face tokenizer directory "
            "(save_pretrained layout), or unset data.tokenizer to train one"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises many types (OSError, ValueError, KeyError, ...)
        raise ConfigError(
            f"data.tokenizer={path} could not be loaded as a Hugging Face tokenizer ({type(e).__name__}: {e}): "
            "point it at a directory written by tokenizer.save_pretrained(), or unset it to train one"
        ) from e


__all__ = ["EOS_TOKEN", "load_tokenizer", "save_tokenizer", "train_tokenizer"]
