"""Tests for distlm.data: corpus readers, tokenizer, token cache, TokenBlocks, ResumableSampler."""

from __future__ import annotations

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
from transformers import AutoTokenizer

from distlm.config import ConfigError, DataConfig
from distlm.data import (
    EOS_TOKEN,
    DataError,
    ResumableSampler,
    TokenBlocks,
    cache_key,
    corpus_files,
    iter_documents,
    load_tokenizer,
    prepare_data,
    train_tokenizer,
)
from distlm.data import tokens as tokens_mod
from distlm.data.tokens import COMPLETE, split_documents

CODE_SAMPLE = 'def héllo(name: str) -> str:\n    """Grüß dich 🎉 — 你好"""\n\treturn f"hi {name}!"  # done\r\n'


def _code_doc(i: int) -> str:
    return (
        f"def function_{i}(x, y={i}):\n"
        f'    """Return the sum of x and y times {i}."""\n'
        f"    result = x + y * {i}\n"
        f"    if result > {i * 7}:\n"
        f"        return result - {i}\n"
        f"    return result\n\n"
        f"class Widget{i}:\n    value = {i!r}\n"
    )


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(path: Path, lines: list[str]) -> Path:
    return _write(path, "\n".join(lines) + "\n")


def _text_corpus(root: Path, n: int = 24) -> Path:
    for i in range(n):
        _write(root / f"doc_{i:03d}.txt", _code_doc(i) * (1 + i % 3))
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
    docs = [_code_doc(i) for i in range(50)]
    tok = train_tokenizer(docs, vocab_size=400)
    assert len(tok) <= 400
    assert tok.eos_token == tok.bos_token == tok.pad_token == tok.unk_token == EOS_TOKEN
    samples = [CODE_SAMPLE, _code_doc(7), "  leading spaces , and ( odd ) spacing .\n\n", "\x00\x7f ~"]
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


# ---------------------------------------------------------------- prepare_data


def _read_tokens(path: str, dtype: str) -> np.ndarray:
    return np.fromfile(path, dtype=dtype)


def test_prepare_data_matches_direct_encode(tmp_path):
    cfg = _cfg(
        tmp_path, format="text", paths=[str(_text_corpus(tmp_path / "corpus"))], vocab_size=300, val_fraction=0.2
    )
    prepared = prepare_data(cfg, seed=3, progress=False)

    final = Path(cfg.cache_dir) / prepared.key[:16]
    assert prepared.key == cache_key(cfg, seed=3)
    assert (final / COMPLETE).is_file() and Path(prepared.train_path).parent == final
    assert prepared.dtype == "uint16"
    assert json.loads((final / "meta.json").read_text())["num_train_tokens"] == prepared.num_train_tokens

    tok = AutoTokenizer.from_pretrained(prepared.tokenizer_dir)
    assert prepared.vocab_size == len(tok) and prepared.eos_token_id == tok.eos_token_id
    expected: dict[bool, list[int]] = {False: [], True: []}
    for is_val, doc in split_documents(iter_documents(cfg), seed=3, val_fraction=0.2):
        expected[is_val] += tok.encode(doc, add_special_tokens=False) + [tok.eos_token_id]
    assert expected[True], "val_fraction=0.2 over 24 documents must give validation documents"
    assert prepared.num_train_tokens == len(expected[False])
    assert prepared.num_val_tokens == len(expected[True])
    assert _read_tokens(prepared.train_path, prepared.dtype).tolist() == expected[False]
    assert _read_tokens(prepared.val_path, prepared.dtype).tolist() == expected[True]
    # No temporary build dirs are left behind.
    assert sorted(p.name for p in Path(cfg.cache_dir).iterdir()) == [final.name]


def test_second_prepare_is_a_cache_hit(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, format="text", paths=[str(_text_corpus(tmp_path / "corpus"))], vocab_size=300)
    first = prepare_data(cfg, progress=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("a cache hit must not read documents or tokenize")

    monkeypatch.setattr(tokens_mod, "iter_documents", forbidden)
    monkeypatch.setattr(tokens_mod, "train_tokenizer", forbidden)
    monkeypatch.setattr(tokens_mod, "load_tokenizer", forbidden)
    monkeypatch.setattr(tokens_mod, "_build", forbidden)
    assert prepare_data(cfg, progress=False) == first


def test_cache_key_tracks_content_and_settings(tmp_path):
    corpus = _text_corpus(tmp_path / "corpus")
    cfg = _cfg(tmp_path, format="text", paths=[str(corpus)], vocab_size=300)
    key = cache_key(cfg)
    assert cache_key(cfg) == key
    assert cache_key(cfg, seed=1) != key
    assert cache_key(_cfg(tmp_path, format="text", paths=[str(corpus)], vocab_size=301)) != key
    assert cache_key(_cfg(tmp_path, format="text", paths=[str(corpus)], vocab_size=300, val_fraction=0.1)) != key
    # The key does not depend on where the data lives, only on names and bytes.
    moved = shutil.copytree(corpus, tmp_path / "elsewhere" / "corpus")
    assert cache_key(_cfg(tmp_path, format="text", paths=[str(moved)], vocab_size=300)) == key

    first = prepare_data(cfg, progress=False)
    _write(corpus / "doc_005.txt", "def changed():\n    pass\n")
    second = prepare_data(cfg, progress=False)
    assert second.key != first.key and second.train_path != first.train_path
    assert Path(first.train_path).is_file()  # the old cache entry is untouched


def test_incomplete_cache_dirs_are_not_trusted(tmp_path):
    cfg = _cfg(tmp_path, format="text", paths=[str(_text_corpus(tmp_path / "corpus"))], vocab_size=300)
    key = cache_key(cfg)
    cache = Path(cfg.cache_dir)
    # A crashed build's temp dir, and a final-looking dir without the COMPLETE marker.
    _write(cache / f".{key[:16]}.tmp-crashed" / "train.bin", "garbage")
    _write(cache / key[:16] / "train.bin", "garbage")
    _write(cache / key[:16] / "meta.json", "{}")

    prepared = prepare_data(cfg, progress=False)
    assert (cache / key[:16] / COMPLETE).is_file()
    tok = AutoTokenizer.from_pretrained(prepared.tokenizer_dir)
    total = sum(len(tok.encode(d)) + 1 for d in iter_documents(cfg))
    assert prepared.num_train_tokens + prepared.num_val_tokens == total
    assert len(_read_tokens(prepared.train_path, prepared.dtype)) == prepared.num_train_tokens


def test_crash_during_build_leaves_no_cache(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, format="text", paths=[str(_text_corpus(tmp_path / "corpus"))], vocab_size=300)

    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(tokens_mod, "_chunks", crash)
    with pytest.raises(RuntimeError, match="killed"):
        prepare_data(cfg, progress=False)
    assert list(Path(cfg.cache_dir).iterdir()) == []

    monkeypatch.undo()
    prepared = prepare_data(cfg, progress=False)
    assert prepared.num_train_tokens > 0


def test_concurrent_prepares_agree(tmp_path):
    cfg = _cfg(tmp_path, format="text", paths=[str(_text_corpus(tmp_path / "corpus"))], vocab_size=300)
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
    assert [p.name for p in Path(cfg.cache_dir).iterdir()] == [results[0].key[:16]]
    assert len(_read_tokens(results[0].train_path, results[0].dtype)) == results[0].num_train_tokens


def test_losing_the_publish_race_uses_the_winner(tmp_path):
    cfg = _cfg(tmp_path, format="text", paths=[str(_text_corpus(tmp_path / "corpus"))], vocab_size=300)
    prepared = prepare_data(cfg, progress=False)
    final = Path(prepared.train_path).parent
    loser = shutil.copytree(final, tmp_path / "loser_build")
    (loser / "train.bin").write_bytes(b"")
    tokens_mod._publish(loser, final)
    assert (final / "train.bin").stat().st_size > 0  # the winner's files are kept


def test_prepare_with_a_given_tokenizer_and_jsonl(tmp_path):
    tok = train_tokenizer([_code_doc(i) for i in range(30)], vocab_size=300)
    tok.save_pretrained(tmp_path / "tok")
    lines = [json.dumps({"text": _code_doc(i)}) for i in range(10)]
    path = _jsonl(tmp_path / "data.jsonl", lines)
    cfg = _cfg(tmp_path, format="jsonl", paths=[str(path)], tokenizer=str(tmp_path / "tok"), val_fraction=0.1)
    prepared = prepare_data(cfg, progress=False)
    assert prepared.num_val_tokens > 0  # at least one val document is guaranteed
    expected = sum(len(tok.encode(_code_doc(i))) + 1 for i in range(10))
    assert prepared.num_train_tokens + prepared.num_val_tokens == expected

    key = cache_key(cfg)
    _write(tmp_path / "tok" / "extra.txt", "changes the tokenizer spec")
    assert cache_key(cfg) != key


def test_prepare_data_reports_corpus_errors(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", ['{"text": "a"}', '{"text": "b"}', '{"body": "c"}'])
    cfg = _cfg(tmp_path, format="jsonl", paths=[str(path)], vocab_size=300)
    with pytest.raises(DataError, match=r"bad\.jsonl line 3: field 'text' is missing"):
        prepare_data(cfg, progress=False)
    assert list(Path(cfg.cache_dir).iterdir()) == []


def test_split_documents_guarantees_both_splits():
    docs = [str(i) for i in range(2)]
    assert [v for v, _ in split_documents(docs, seed=0, val_fraction=0.01)] == [False, True]
    assert [v for v, _ in split_documents(docs, seed=0, val_fraction=0.0)] == [False, False]
    assert [v for v, _ in split_documents(["only"], seed=0, val_fraction=0.4)] == [False]
    many = [d for _, d in split_documents(map(str, range(1000)), seed=5, val_fraction=0.1)]
    assert many == [str(i) for i in range(1000)]  # order is kept
    n_val = sum(v for v, _ in split_documents(map(str, range(1000)), seed=5, val_fraction=0.1))
    assert 60 < n_val < 140
    assert list(split_documents(map(str, range(50)), 1, 0.2)) == list(split_documents(map(str, range(50)), 1, 0.2))


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
