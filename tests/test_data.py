"""Tests for distlm.data: corpus readers, tokenizer, token cache, TokenBlocks, ResumableSampler."""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import assert_same_cache, code_doc, reference_streams, token_stream
from transformers import AutoTokenizer

from distlm.config import ConfigError, DataConfig
from distlm.data import (
    EOS_TOKEN,
    DataError,
    ResumableSampler,
    TokenBlocks,
    cache_key,
    corpus_files,
    corpus_manifest,
    find_prepared,
    is_validation,
    iter_documents,
    load_tokenizer,
    prepare_data,
    train_tokenizer,
)
from distlm.data import pipeline as pipeline_mod
from distlm.data import shards as shards_mod
from distlm.data import tokens as tokens_mod
from distlm.data.corpus import documents, plan_units, read_unit
from distlm.data.tokens import COMPLETE, training_sample

CODE_SAMPLE = 'def héllo(name: str) -> str:\n    """Grüß dich 🎉 — 你好"""\n\treturn f"hi {name}!"  # done\r\n'


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(path: Path, lines: list[str]) -> Path:
    return _write(path, "\n".join(lines) + "\n")


def _text_corpus(root: Path, n: int = 24) -> Path:
    for i in range(n):
        _write(root / f"doc_{i:03d}.txt", code_doc(i) * (1 + i % 3))
    return root


def _cfg(tmp_path: Path, **kw) -> DataConfig:
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return DataConfig(**kw)


# ---------------------------------------------------------------- corpus readers


def test_text_files_and_directories(tmp_path):
    _write(tmp_path / "d" / "b.txt", "bee")
    _write(tmp_path / "d" / "sub" / "a.md", "ay")
    _write(tmp_path / "d" / "skip.json", "{}")
    _write(tmp_path / "d" / "empty.txt", "")
    single = _write(tmp_path / "single.txt", "one")
    cfg = _cfg(tmp_path, format="text", paths=[str(single), str(tmp_path / "d"), str(tmp_path / "d" / "b.txt")])

    files = corpus_files(cfg)
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["single.txt", "d/b.txt", "d/empty.txt", "d/sub/a.md"]
    assert corpus_files(cfg) == files
    # The empty file yields no document; b.txt listed twice is read once.
    assert list(iter_documents(cfg)) == ["one", "bee", "ay"]


def test_jsonl_files_and_directories(tmp_path):
    _jsonl(
        tmp_path / "d" / "a.jsonl", [json.dumps({"body": "first", "id": 1}), "", "  ", json.dumps({"body": "second"})]
    )
    _jsonl(tmp_path / "d" / "nested" / "b.jsonl", [json.dumps({"body": "third"})])
    _write(tmp_path / "d" / "notes.txt", "ignored")
    cfg = _cfg(tmp_path, format="jsonl", paths=[str(tmp_path / "d")], text_field="body")
    assert [p.name for p in corpus_files(cfg)] == ["a.jsonl", "b.jsonl"]
    assert list(iter_documents(cfg)) == ["first", "second", "third"]

    cfg_file = _cfg(tmp_path, format="jsonl", paths=[str(tmp_path / "d" / "nested" / "b.jsonl")], text_field="body")
    assert list(iter_documents(cfg_file)) == ["third"]


def test_parquet_files_and_directories(tmp_path):
    texts = [f"row {i}" for i in range(2500)]  # several record batches
    (tmp_path / "d").mkdir()
    pq.write_table(pa.table({"text": texts, "n": list(range(2500))}), tmp_path / "d" / "a.parquet", row_group_size=700)
    pq.write_table(pa.table({"text": ["x", None, "y"]}), tmp_path / "d" / "b.parquet")
    cfg = _cfg(tmp_path, format="parquet", paths=[str(tmp_path / "d")])
    assert [p.name for p in corpus_files(cfg)] == ["a.parquet", "b.parquet"]
    assert list(iter_documents(cfg)) == texts + ["x", "y"]

    cfg_file = _cfg(tmp_path, format="parquet", paths=[str(tmp_path / "d" / "b.parquet")])
    assert list(iter_documents(cfg_file)) == ["x", "y"]


def test_stdlib_corpus_files():
    from distlm.data.corpus import stdlib_dir

    root = stdlib_dir()
    names = [p.relative_to(root).as_posix() for p in corpus_files(DataConfig())]
    assert {"os.py", "json/__init__.py"} <= set(names)
    assert names == sorted(names)
    skipped = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages"}
    assert not any(skipped.intersection(name.split("/")) for name in names)


@pytest.mark.parametrize(
    "lines, lineno, problem",
    [
        (['{"text": "ok"}', "{not json"], 2, "not valid JSON"),
        (['{"text": "ok"}', "", '{"body": "x"}'], 3, "field 'text' is missing"),
        (['{"text": 42}'], 1, "not a string"),
        (['{"text": "ok"}', '["text"]'], 2, "expected a JSON object"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, lines, lineno, problem):
    path = _jsonl(tmp_path / "data" / "bad.jsonl", lines)
    cfg = _cfg(tmp_path, format="jsonl", paths=[str(path)])
    with pytest.raises(DataError) as err:
        list(iter_documents(cfg))
    message = str(err.value)
    assert str(path) in message and f"line {lineno}" in message and problem in message
    assert isinstance(err.value, ConfigError)


def test_missing_field_message_says_the_fix(tmp_path):
    path = _jsonl(tmp_path / "x.jsonl", ['{"content": "x"}'])
    with pytest.raises(DataError, match=r"x\.jsonl line 1: field 'text' is missing: .*data\.text_field"):
        list(iter_documents(_cfg(tmp_path, format="jsonl", paths=[str(path)])))


@pytest.mark.parametrize("fmt, name", [("text", "empty.txt"), ("jsonl", "empty.jsonl")])
def test_empty_file_is_an_error(tmp_path, fmt, name):
    path = _write(tmp_path / name, "" if fmt == "text" else "\n\n")
    with pytest.raises(DataError, match="no documents") as err:
        list(iter_documents(_cfg(tmp_path, format=fmt, paths=[str(path)])))
    assert str(path) in str(err.value)


def test_empty_directory_is_an_error(tmp_path):
    (tmp_path / "nothing_here").mkdir()
    _write(tmp_path / "nothing_here" / "wrong.csv", "a,b")
    cfg = _cfg(tmp_path, format="text", paths=[str(tmp_path / "nothing_here")])
    with pytest.raises(DataError, match="no corpus files") as err:
        corpus_files(cfg)
    assert "nothing_here" in str(err.value) and "*.txt" in str(err.value)


def test_missing_parquet_column(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"content": ["a"], "id": [1]}), path)
    with pytest.raises(DataError) as err:
        list(iter_documents(_cfg(tmp_path, format="parquet", paths=[str(path)])))
    message = str(err.value)
    assert str(path) in message and "'text' is missing" in message and "content, id" in message


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        corpus_files(_cfg(tmp_path, format="text", paths=[str(tmp_path / "nope")]))


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_plain_autotokenizer(tmp_path):
    docs = [code_doc(i) for i in range(50)]
    tok = train_tokenizer(docs, vocab_size=400)
    assert len(tok) <= 400
    assert tok.eos_token == tok.bos_token == tok.pad_token == tok.unk_token == EOS_TOKEN
    samples = [CODE_SAMPLE, code_doc(7), "  leading spaces , and ( odd ) spacing .\n\n", "\x00\x7f ~"]
    for text in samples:
        assert tok.decode(tok.encode(text)) == text

    tok.save_pretrained(tmp_path / "tok")
    plain = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert plain.eos_token_id == tok.eos_token_id == plain.convert_tokens_to_ids(EOS_TOKEN)
    for text in samples:
        assert plain.encode(text) == tok.encode(text)
        assert plain.decode(plain.encode(text)) == text
    assert isinstance(load_tokenizer(tmp_path / "tok").encode(CODE_SAMPLE), list)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    _write(tmp_path / "junk" / "tokenizer.json", "{ broken")
    with pytest.raises(ConfigError, match="could not be loaded"):
        load_tokenizer(tmp_path / "junk")


# ---------------------------------------------------------------- documents and shards


def test_documents_are_the_same_however_the_corpus_is_cut(tmp_path):
    """Units cut JSONL by byte ranges, parquet by row groups, arrow by rows: any cut reads
    every document once, in order, with the same identity (source, position)."""
    lines = [json.dumps({"text": code_doc(i) if i % 7 else ""}) for i in range(60)]
    _jsonl(tmp_path / "j" / "a.jsonl", lines[:45] + ["", "  "] + lines[45:])
    _jsonl(tmp_path / "j" / "b.jsonl", [json.dumps({"text": "tail"})])
    texts = [f"row {i}" if i % 5 else None for i in range(300)]
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"text": texts}), tmp_path / "p" / "a.parquet", row_group_size=40)
    (tmp_path / "h").mkdir()
    with pa.ipc.new_stream(str(tmp_path / "h" / "data.arrow"), pa.schema([("text", pa.large_string())])) as writer:
        for b in range(0, 300, 64):
            writer.write_batch(pa.record_batch([pa.array(texts[b : b + 64], pa.large_string())], names=["text"]))
    for fmt, root in [("jsonl", "j"), ("parquet", "p"), ("hf", "h")]:
        cfg = _cfg(tmp_path, format=fmt, paths=[str(tmp_path / root)])
        whole = list(documents(cfg))
        for unit_bytes in (97, 700, 1500):
            units = plan_units(cfg, unit_bytes)
            assert len(units) > 1
            assert [d for u in units for d in read_unit(cfg, u)] == whole
    jsonl = list(documents(_cfg(tmp_path, format="jsonl", paths=[str(tmp_path / "j")])))
    assert [t for _, _, t in jsonl] == [json.loads(line)["text"] for line in lines if json.loads(line)["text"]] + [
        "tail"
    ]
    assert jsonl[1][:2] == ("j/a.jsonl", len(lines[0]) + 1 + len(lines[1]) + 1)  # the byte offset of its line
    parquet = list(documents(_cfg(tmp_path, format="parquet", paths=[str(tmp_path / "p")])))
    assert [(pos, t) for _, pos, t in parquet] == [(i, t) for i, t in enumerate(texts) if t]


def test_jsonl_error_line_numbers_from_any_range(tmp_path):
    lines = [json.dumps({"text": code_doc(i)}) for i in range(40)]
    lines[33] = '{"text": 5}'
    cfg = _cfg(tmp_path, format="jsonl", paths=[str(_jsonl(tmp_path / "bad.jsonl", lines))])
    for unit in plan_units(cfg, 500):
        try:
            list(read_unit(cfg, unit))
        except DataError as e:
            assert "bad.jsonl line 34: field 'text' is int" in str(e)
            break
    else:
        pytest.fail("the bad line was not reported")


def test_split_is_deterministic_by_document_identity():
    ids = [("f.jsonl", i * 100) for i in range(4000)]
    split = [is_validation(5, s, p, 0.1) for s, p in ids]
    assert split == [is_validation(5, s, p, 0.1) for s, p in ids]
    assert 300 < sum(split) < 500
    assert split != [is_validation(6, s, p, 0.1) for s, p in ids]  # the seed picks the split
    assert not any(is_validation(5, s, p, 0.0) for s, p in ids)


# ---------------------------------------------------------------- prepare_data


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name != ".file-digests.json")


def test_prepare_data_matches_direct_encode(tmp_path):
    cfg = _cfg(
        tmp_path,
        format="text",
        paths=[str(_text_corpus(tmp_path / "corpus"))],
        vocab_size=300,
        val_fraction=0.2,
        shard_mb=0.002,
    )
    prepared = prepare_data(cfg, seed=3, progress=False)

    final = Path(cfg.cache_dir) / prepared.key[:16]
    assert prepared.key == cache_key(cfg, seed=3)
    assert (final / COMPLETE).is_file() and Path(prepared.train_path).parent == final
    assert prepared.dtype == "uint16"
    assert json.loads((final / "meta.json").read_text())["num_train_tokens"] == prepared.num_train_tokens
    build = json.loads((final / "build.json").read_text())
    assert build["engine"] == "local"
    assert build["shards"] == len(list((final / "shards").glob("*.json"))) > 3

    tok = AutoTokenizer.from_pretrained(prepared.tokenizer_dir)
    assert prepared.vocab_size == len(tok) and prepared.eos_token_id == tok.eos_token_id
    expected = reference_streams(cfg, prepared.tokenizer_dir, seed=3)
    assert expected[True], "val_fraction=0.2 over 24 documents must give validation documents"
    assert prepared.num_train_tokens == len(expected[False])
    assert prepared.num_val_tokens == len(expected[True])
    assert token_stream(prepared.train_path, prepared.dtype) == expected[False]
    assert token_stream(prepared.val_path, prepared.dtype) == expected[True]
    # TokenBlocks over the shards: block i is tokens [i*L, (i+1)*L) of the stream, across shard files.
    blocks = TokenBlocks(prepared.train_path, prepared.dtype, seq_len=37)
    assert len(blocks) == len(expected[False]) // 37
    assert torch.cat([blocks[i] for i in range(len(blocks))]).tolist() == expected[False][: len(blocks) * 37]
    # No temporary build dirs are left behind.
    assert _entries(Path(cfg.cache_dir)) == [final.name]


@pytest.mark.parametrize("n_docs, val_fraction", [(2, 0.01), (2, 0.45), (3, 0.45), (1, 0.3)])
def test_small_corpora_get_both_splits(tmp_path, n_docs, val_fraction):
    """As with one file: with >= 2 documents both splits exist, whatever the hash says."""
    corpus = _text_corpus(tmp_path / "corpus", n=n_docs)
    for seed in range(4):
        cfg = _cfg(tmp_path, format="text", paths=[str(corpus)], vocab_size=300, val_fraction=val_fraction)
        prepared = prepare_data(cfg, seed=seed, progress=False)
        expected = reference_streams(cfg, prepared.tokenizer_dir, seed)
        assert token_stream(prepared.train_path, prepared.dtype) == expected[False] != []
        assert token_stream(prepared.val_path, prepared.dtype) == expected[True]
        assert bool(expected[True]) == (n_docs >= 2)


def test_second_prepare_is_a_cache_hit(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, format="text", paths=[str(_text_corpus(tmp_path / "corpus"))], vocab_size=300)
    first = prepare_data(cfg, progress=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("a cache hit must not read documents or tokenize")

    for name in ("read_unit", "train_tokenizer", "load_tokenizer", "_build"):
        monkeypatch.setattr(tokens_mod, name, forbidden)
    assert prepare_data(cfg, progress=False) == first
    assert find_prepared(cfg) == first
    assert find_prepared(_cfg(tmp_path, format="text", paths=[str(tmp_path / "corpus")], vocab_size=301)) is None


def test_cache_key_tracks_content_and_settings(tmp_path):
    corpus = _text_corpus(tmp_path / "corpus")
    cfg = _cfg(tmp_path, format="text", paths=[str(corpus)], vocab_size=300)
    key = cache_key(cfg)
    assert cache_key(cfg) == key
    assert cache_key(cfg, seed=1) != key
    assert cache_key(_cfg(tmp_path, format="text", paths=[str(corpus)], vocab_size=301)) != key
    assert cache_key(_cfg(tmp_path, format="text", paths=[str(corpus)], vocab_size=300, val_fraction=0.1)) != key
    assert cache_key(_cfg(tmp_path, format="text", paths=[str(corpus)], vocab_size=300, tokenizer_sample_mb=9)) != key
    # The shard size and the engine change how the tokens are written, not what they are.
    assert (
        cache_key(_cfg(tmp_path, format="text", paths=[str(corpus)], vocab_size=300, shard_mb=1, engine="ray")) == key
    )
    # The key does not depend on where the data lives, only on names and bytes.
    moved = shutil.copytree(corpus, tmp_path / "elsewhere" / "corpus")
    assert cache_key(_cfg(tmp_path, format="text", paths=[str(moved)], vocab_size=300)) == key

    first = prepare_data(cfg, progress=False)
    # Same size, new bytes: the remembered digest is not reused (the file's ctime changed).
    doc = corpus / "doc_005.txt"
    doc.write_text(doc.read_text().replace("result", "RESULT"))
    second = prepare_data(cfg, progress=False)
    assert second.key != first.key and second.train_path != first.train_path
    assert Path(first.train_path).is_file()  # the old cache entry is untouched


def test_incomplete_cache_dirs_are_not_trusted(tmp_path):
    cfg = _cfg(tmp_path, format="text", paths=[str(_text_corpus(tmp_path / "corpus"))], vocab_size=300, shard_mb=0.002)
    key = cache_key(cfg)
    cache = Path(cfg.cache_dir)
    clean = prepare_data(dataclasses.replace(cfg, cache_dir=str(tmp_path / "clean")), progress=False)
    # A crashed build's temp dir, a final-looking dir without the COMPLETE marker, and a partial
    # build whose shard 0 claims more tokens than its file holds (a torn write).
    _write(cache / f".{key[:16]}.tmp-crashed" / "train.bin", "garbage")
    _write(cache / key[:16] / "train.index.json", "[]")
    partial = cache / f".{key[:16]}.partial" / "shards"
    _write(partial / "00000.train.bin", "xx")
    _write(partial / "00000.val.bin", "")
    _write(
        partial / "00000.json", json.dumps({"id": 0, "docs": {"train": 1, "val": 0}, "tokens": {"train": 5, "val": 0}})
    )
    # Temp files of writers killed mid-write.
    _write(partial / ".00003.train.bin.tmp-dead", "half")
    _write(partial.parent / ".tokenizer.tmp-dead" / "tokenizer.json", "{")

    prepared = prepare_data(cfg, progress=False)
    assert (cache / key[:16] / COMPLETE).is_file()
    assert not list((cache / key[:16]).rglob(".*"))
    assert json.loads((cache / key[:16] / "build.json").read_text())["reused_shards"] == 0
    assert token_stream(prepared.train_path, prepared.dtype) == token_stream(clean.train_path, clean.dtype)
    assert token_stream(prepared.val_path, prepared.dtype) == token_stream(clean.val_path, clean.dtype)


def test_crash_during_build_resumes_with_the_finished_shards(tmp_path, monkeypatch):
    """A build that dies after some shards leaves no cache a run would use; the next run
    tokenizes only the missing shards and ends with the same files as a build never stopped."""
    corpus = str(_text_corpus(tmp_path / "corpus"))
    cfg = _cfg(tmp_path, format="text", paths=[corpus], vocab_size=300, shard_mb=0.002)
    real = shards_mod.tokenize_unit
    calls: list[int] = []

    def dies_on_the_fourth(unit, job, *args, **kwargs):
        calls.append(unit["id"])
        if len(calls) == 4:
            raise RuntimeError("killed mid-build")
        return real(unit, job, *args, **kwargs)

    monkeypatch.setattr(pipeline_mod, "tokenize_unit", dies_on_the_fourth)
    with pytest.raises(RuntimeError, match="killed"):
        prepare_data(cfg, progress=False)
    cache = Path(cfg.cache_dir)
    assert not any((p / COMPLETE).exists() for p in cache.iterdir() if p.is_dir())
    assert _entries(cache) == [f".{cache_key(cfg)[:16]}.partial"]

    # The corpus moves (same names and bytes, so the same key): the partial build still fits it.
    moved = tmp_path / "moved" / "corpus"
    shutil.copytree(corpus, moved)
    shutil.rmtree(corpus)
    cfg = dataclasses.replace(cfg, paths=[str(moved)])
    calls.clear()
    prepared = prepare_data(cfg, progress=False)
    build = json.loads((Path(prepared.train_path).parent / "build.json").read_text())
    assert build["reused_shards"] == 3 and calls[0] == 3 and len(calls) == build["shards"] - 3
    assert _entries(cache) == [prepared.key[:16]]

    uninterrupted = dataclasses.replace(cfg, cache_dir=str(tmp_path / "c2"))
    monkeypatch.undo()
    assert_same_cache(
        Path(prepare_data(uninterrupted, progress=False).train_path).parent, Path(prepared.train_path).parent
    )


def test_one_plan_per_build_whoever_plans(tmp_path):
    """Two runs on one partial build with different CPU counts (a local and a Ray run) would
    cut the corpus differently: the first plan written is the one both follow."""
    cfg = _cfg(tmp_path, format="text", paths=[str(_text_corpus(tmp_path / "corpus", n=40))])
    manifest = corpus_manifest(cfg)
    total = sum(p.stat().st_size for _, p in manifest)
    coarse, fine = (dataclasses.replace(cfg, shard_mb=total / n / 2**20) for n in (3, 10))
    (tmp_path / "partial").mkdir()
    first = tokens_mod._plan(coarse, manifest, total, 1, tmp_path / "partial")
    assert tokens_mod._plan(fine, manifest, total, 64, tmp_path / "partial") == first
    (tmp_path / "other").mkdir()
    assert len(tokens_mod._plan(fine, manifest, total, 64, tmp_path / "other")) > len(first) > 1


def test_concurrent_prepares_agree(tmp_path):
    cfg = _cfg(tmp_path, format="text", paths=[str(_text_corpus(tmp_path / "corpus"))], vocab_size=300, shard_mb=0.002)
    results: list = []
    errors: list = []

    def run() -> None:
        try:
            results.append(prepare_data(cfg, progress=False))
        except Exception as e:  # collected so the main thread can fail with it
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3
    assert all(r == results[0] for r in results)
    assert _entries(Path(cfg.cache_dir)) == [results[0].key[:16]]
    assert len(token_stream(results[0].train_path, results[0].dtype)) == results[0].num_train_tokens


def test_losing_the_publish_race_uses_the_winner(tmp_path):
    cfg = _cfg(tmp_path, format="text", paths=[str(_text_corpus(tmp_path / "corpus"))], vocab_size=300)
    prepared = prepare_data(cfg, progress=False)
    final = Path(prepared.train_path).parent
    loser = shutil.copytree(final, tmp_path / "loser_build")
    (loser / "train.index.json").write_text("[]")
    tokens_mod._publish(loser, final)
    assert json.loads((final / "train.index.json").read_text())  # the winner's files are kept


def test_prepare_with_a_given_tokenizer_and_jsonl(tmp_path):
    tok = train_tokenizer([code_doc(i) for i in range(30)], vocab_size=300)
    tok.save_pretrained(tmp_path / "tok")
    lines = [json.dumps({"text": code_doc(i)}) for i in range(10)]
    path = _jsonl(tmp_path / "data.jsonl", lines)
    cfg = _cfg(tmp_path, format="jsonl", paths=[str(path)], tokenizer=str(tmp_path / "tok"), val_fraction=0.1)
    prepared = prepare_data(cfg, progress=False)
    assert prepared.num_val_tokens > 0  # at least one val document is guaranteed
    expected = sum(len(tok.encode(code_doc(i))) + 1 for i in range(10))
    assert prepared.num_train_tokens + prepared.num_val_tokens == expected

    key = cache_key(cfg)
    _write(tmp_path / "tok" / "extra.txt", "changes the tokenizer spec")
    assert cache_key(cfg) != key


def test_prepare_data_reports_corpus_errors(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", ['{"text": "a"}', '{"text": "b"}', '{"body": "c"}'])
    cfg = _cfg(tmp_path, format="jsonl", paths=[str(path)], vocab_size=300)
    with pytest.raises(DataError, match=r"bad\.jsonl line 3: field 'text' is missing"):
        prepare_data(cfg, progress=False)
    assert _entries(Path(cfg.cache_dir)) == []  # a bad file fails the same way again: nothing is kept


def test_tokenizer_sample_is_bounded_and_spread(tmp_path):
    corpus = _text_corpus(tmp_path / "corpus", n=60)
    cfg = _cfg(tmp_path, format="text", paths=[str(corpus)], val_fraction=0.1)
    units = plan_units(cfg, 600)
    train_docs = [t for s, p, t in documents(cfg) if not is_validation(0, s, p, 0.1)]
    assert list(training_sample(cfg, 0, units, 1 << 30)) == train_docs  # fits: every train document
    budget = sum(len(t) for t in train_docs) // 4
    sample = list(training_sample(cfg, 0, units, budget))
    assert sample == list(training_sample(cfg, 0, units, budget))
    assert budget <= sum(len(t) for t in sample) < budget + max(len(t) for t in train_docs)
    assert set(sample) <= set(train_docs)
    positions = sorted(train_docs.index(t) for t in sample)
    assert positions[0] < len(train_docs) // 4 and positions[-1] > len(train_docs) * 3 // 4  # spans the corpus


def test_hf_dataset_saved_to_disk(tmp_path):
    """A DatasetDict written by `datasets` (save_to_disk, several arrow files) and its parquet export."""
    import datasets

    rows = [code_doc(i) if i % 9 else "" for i in range(120)]
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"content": rows, "n": list(range(120))}),
            "test": datasets.Dataset.from_dict({"content": ["held out"], "n": [0]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "ds"), max_shard_size="4KB")
    assert len(list((tmp_path / "ds" / "train").glob("*.arrow"))) > 1
    cfg = _cfg(
        tmp_path, format="hf", paths=[str(tmp_path / "ds")], text_field="content", vocab_size=300, shard_mb=0.003
    )
    assert list(iter_documents(cfg)) == [
        r for r in datasets.load_from_disk(str(tmp_path / "ds"))["train"]["content"] if r
    ]
    prepared = prepare_data(cfg, progress=False)
    expected = reference_streams(cfg, prepared.tokenizer_dir, seed=0)
    assert token_stream(prepared.train_path, prepared.dtype) == expected[False]
    assert token_stream(prepared.val_path, prepared.dtype) == expected[True] != []
    assert json.loads((Path(prepared.train_path).parent / "build.json").read_text())["shards"] > 1

    assert list(
        iter_documents(_cfg(tmp_path, format="hf", paths=[str(tmp_path / "ds")], hf_split="test", text_field="content"))
    ) == ["held out"]
    with pytest.raises(DataError, match=r"without the split 'validation' \(splits: train, test\): set data\.hf_split"):
        corpus_files(_cfg(tmp_path, format="hf", paths=[str(tmp_path / "ds")], hf_split="validation"))
    with pytest.raises(DataError, match=r"column 'text' is missing \(columns: content, n\)"):
        prepare_data(_cfg(tmp_path, format="hf", paths=[str(tmp_path / "ds")]), progress=False)
    dd["train"].to_parquet(str(tmp_path / "train.parquet"))
    parquet = _cfg(tmp_path, format="parquet", paths=[str(tmp_path / "train.parquet")], text_field="content")
    assert list(iter_documents(parquet)) == list(iter_documents(cfg))


# ---------------------------------------------------------------- TokenBlocks


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_blocks(tmp_path, dtype):
    path = tmp_path / "tokens.bin"
    data = np.arange(1000, dtype=dtype) * (70 if dtype == "uint32" else 1)
    data.tofile(path)
    blocks = TokenBlocks(path, dtype, seq_len=64)
    assert len(blocks) == 1000 // 64
    for i in [0, 5, len(blocks) - 1]:
        block = blocks[i]
        assert block.dtype == torch.long and block.shape == (64,)
        assert block.tolist() == data[i * 64 : (i + 1) * 64].tolist()
    with pytest.raises(IndexError):
        blocks[len(blocks)]
    restored = pickle.loads(pickle.dumps(blocks))
    assert torch.equal(restored[3], blocks[3])
    loader = torch.utils.data.DataLoader(blocks, batch_size=4)
    assert next(iter(loader)).shape == (4, 64)


def test_token_blocks_over_pieces_equal_one_file(tmp_path, monkeypatch):
    """Blocks of a sharded stream (pieces of any length, parts of files, more files than stay
    mapped) are the blocks of the one file that concatenates the pieces."""
    rng = np.random.default_rng(0)
    pieces, stream = [], []
    for i, length in enumerate([5, 0, 130, 1, 64, 63, 200, 3]):
        data = rng.integers(0, 60000, size=length + 10, dtype=np.uint16)
        data.tofile(tmp_path / f"{i}.bin")
        pieces.append([f"{i}.bin", 7, length])
        stream += data[7 : 7 + length].tolist()
    (tmp_path / "s.index.json").write_text(json.dumps(pieces))
    np.asarray(stream, dtype=np.uint16).tofile(tmp_path / "flat.bin")
    monkeypatch.setattr(TokenBlocks, "_OPEN_FILES", 2)
    sharded = TokenBlocks(tmp_path / "s.index.json", "uint16", seq_len=16)
    flat = TokenBlocks(tmp_path / "flat.bin", "uint16", seq_len=16)
    assert len(sharded) == len(flat) == len(stream) // 16
    for i in list(range(len(flat))) + [3, 0, 20]:
        assert torch.equal(sharded[i], flat[i])
    assert torch.equal(pickle.loads(pickle.dumps(sharded))[9], flat[9])


def test_token_blocks_too_short(tmp_path):
    path = tmp_path / "tiny.bin"
    np.arange(10, dtype="uint16").tofile(path)
    with pytest.raises(DataError, match=r"has 10 tokens.*lower data\.seq_len or add data"):
        TokenBlocks(path, "uint16", seq_len=64)


# ---------------------------------------------------------------- ResumableSampler


def _global_batches(sampler: ResumableSampler, n: int) -> list[list[int]]:
    return [[i for micro in sampler.next_batch() for i in micro] for _ in range(n)]


def test_sampler_ranks_union_equals_single_process():
    n, G = 50, 8
    single = ResumableSampler(n, G, micro_batch_size=4, rank=0, world_size=1, seed=7)
    assert single.accum_steps == 2
    ranks = [ResumableSampler(n, G, micro_batch_size=2, rank=r, world_size=2, seed=7) for r in range(2)]
    assert ranks[0].accum_steps == 2
    whole = ResumableSampler(n, G, micro_batch_size=8, rank=0, world_size=1, seed=7)
    for _ in range(15):  # crosses two epoch boundaries (50 is not a multiple of 8)
        expected = [i for micro in single.next_batch() for i in micro]
        per_rank = [r.next_batch() for r in ranks]
        assert all(len(m) == 2 and all(len(b) == 2 for b in m) for m in per_rank)
        # Stream order: micro step a, then rank r within it.
        interleaved = [i for a in range(2) for r in range(2) for i in per_rank[r][a]]
        assert interleaved == expected
        assert [i for micro in whole.next_batch() for i in micro] == expected


def test_sampler_epochs_are_permutations():
    n = 12
    sampler = ResumableSampler(n, global_batch_size=4, micro_batch_size=2, rank=0, world_size=1, seed=0)
    stream = [i for batch in _global_batches(sampler, 9) for i in batch]
    epochs = [stream[e * n : (e + 1) * n] for e in range(3)]
    for e, epoch in enumerate(epochs):
        assert sorted(epoch) == list(range(n))
        assert epoch == torch.randperm(n, generator=torch.Generator().manual_seed(0 + e)).tolist()
    assert epochs[0] != epochs[1]


def test_sampler_resume_continues_identically():
    args = dict(num_samples=37, global_batch_size=12, micro_batch_size=3, world_size=2, seed=11)
    uninterrupted = ResumableSampler(rank=1, **args)
    head = [uninterrupted.next_batch() for _ in range(5)]
    tail = [uninterrupted.next_batch() for _ in range(6)]

    interrupted = ResumableSampler(rank=1, **args)
    assert [interrupted.next_batch() for _ in range(5)] == head
    state = interrupted.state_dict()
    assert state == {"position": 5, "seed": 11, "num_samples": 37, "global_batch_size": 12}

    resumed = ResumableSampler(rank=1, **args)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert [resumed.next_batch() for _ in range(6)] == tail

    # Resuming on a different world size keeps the global batches.
    reference = ResumableSampler(37, 12, micro_batch_size=12, rank=0, world_size=1, seed=11)
    reference.load_state_dict(state)
    resumed_ranks = [ResumableSampler(rank=r, **args) for r in range(2)]
    for r in resumed_ranks:
        r.load_state_dict(state)
    for _ in range(3):
        per_rank = [r.next_batch() for r in resumed_ranks]
        got = sorted(i for m in per_rank for micro in m for i in micro)
        assert got == sorted(reference.next_batch()[0])


@pytest.mark.parametrize("field", ["num_samples", "global_batch_size", "seed"])
def test_sampler_rejects_mismatched_state(field):
    sampler = ResumableSampler(40, 8, micro_batch_size=4, rank=0, world_size=1, seed=1)
    state = sampler.state_dict()
    state[field] += 8
    with pytest.raises(ConfigError, match=field):
        sampler.load_state_dict(state)


def test_sampler_rejects_indivisible_batch():
    with pytest.raises(ConfigError, match="global_batch_size=10"):
        ResumableSampler(100, 10, micro_batch_size=4, rank=0, world_size=2, seed=0)


# ---------------------------------------------------------------- the real default corpus


@pytest.mark.slow
def test_prepare_stdlib_corpus(tmp_path, monkeypatch):
    timings: dict[str, float] = {}
    real_train = tokens_mod.train_tokenizer

    def timed_train(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real_train(*args, **kwargs)
        finally:
            timings["tokenizer_training_s"] = time.perf_counter() - start

    monkeypatch.setattr(tokens_mod, "train_tokenizer", timed_train)
    cfg = DataConfig(vocab_size=1024, cache_dir=str(tmp_path / "cache"))
    start = time.perf_counter()
    prepared = prepare_data(cfg, progress=False)
    timings["first_prepare_s"] = time.perf_counter() - start
    timings["tokenization_s"] = timings["first_prepare_s"] - timings["tokenizer_training_s"]
    assert prepared.vocab_size == 1024 and prepared.dtype == "uint16"
    assert prepared.num_train_tokens > 1_000_000 and prepared.num_val_tokens > 10_000

    start = time.perf_counter()
    again = prepare_data(cfg, progress=False)
    timings["cache_hit_s"] = time.perf_counter() - start
    assert again == prepared
    assert timings["cache_hit_s"] < 5
    blocks = TokenBlocks(prepared.train_path, prepared.dtype, seq_len=128)
    assert len(blocks) == prepared.num_train_tokens // 128
    print(
        f"stdlib corpus: {prepared.num_train_tokens} train / {prepared.num_val_tokens} val tokens; "
        + ", ".join(f"{k}={v:.2f}" for k, v in timings.items())
    )
