import fcntl
import io
import itertools
import json
import logging
import os
import shutil
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import sentencepiece as spm

from llmfoundry_pl.config import ChatDataConfig, ConfigError, DataConfig
from llmfoundry_pl.data import TextDataModule, corpus
from llmfoundry_pl.data.corpus import prepare_corpus, resolve_sources
from llmfoundry_pl.data.datamodule import IGNORE_INDEX, RandomWindows, StepBatchSampler, SweepWindows, _TokenFile
from llmfoundry_pl.tokenizer import BOS_ID, EOS_ID, Tokenizer

TEXT = ("Now is the winter of our discontent made glorious summer by this sun of York. " * 40 + "\n") * 5


@pytest.fixture
def text_dir(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    for i in range(3):
        (d / f"doc{i}.txt").write_text(f"Document {i}.\n" + TEXT)
    return d


def data_cfg(path, cache, **kw) -> DataConfig:
    return DataConfig(path=str(path), cache_dir=str(cache), vocab_size=kw.pop("vocab_size", 300), **kw)


def test_corpus_tokens_cover_every_document_with_bos_and_eos(text_dir, tmp_path):
    tok, files = prepare_corpus(data_cfg(text_dir, tmp_path / "cache", val_fraction=0.1))
    train = np.fromfile(files.train_path, dtype=files.dtype)
    val = np.fromfile(files.val_path, dtype=files.dtype)
    assert (train == BOS_ID).sum() == 3 and (val == EOS_ID).sum() == 3  # each document's head in train, tail in val
    assert files.meta["documents"] == 3
    assert files.meta["train_tokens"] == len(train) and files.meta["val_tokens"] == len(val)
    assert files.meta["bytes"] == sum(len(p.read_bytes()) for p in text_dir.iterdir())
    assert 0.09 < len(val) / (len(train) + len(val)) < 0.12
    # the text comes back out of the token stream
    assert tok.decode(t for t in train if t not in (BOS_ID, EOS_ID)).startswith("Document 0.\nNow is the winter")


def test_processes_starting_on_a_cold_cache_build_it_once(text_dir, tmp_path, monkeypatch, caplog):
    # Every rank of a torchrun or SLURM job prepares the data before the Trainer exists: each trained a tokenizer
    # and tokenized the corpus, all at once. Now one builds; the others wait for its lock, then read what it built.
    _, built = prepare_corpus(data_cfg(text_dir, tmp_path / "built"))
    (model,) = built.directory.parent.glob("tokenizer-*.model")
    cold = tmp_path / "cold" / built.directory.parent.name
    cold.mkdir(parents=True)
    monkeypatch.setattr(corpus, "train_tokenizer", lambda *a, **k: pytest.fail("trained a tokenizer again"))
    monkeypatch.setattr(corpus, "_build_token_files", lambda *a, **k: pytest.fail("tokenized the corpus again"))
    caplog.set_level(logging.INFO, logger="llmfoundry_pl.files")
    locks = [os.open(cold / f".{name}.lock", os.O_RDWR | os.O_CREAT) for name in (model.name, built.directory.name)]
    for lock in locks:  # this test is the process that builds
        fcntl.flock(lock, fcntl.LOCK_EX)
    result = []
    other = threading.Thread(target=lambda: result.append(prepare_corpus(data_cfg(text_dir, tmp_path / "cold"))))
    other.start()

    def wait_for(name: str) -> None:
        for _ in range(600):
            if any(f"finish building {cold / name}" in r.getMessage() for r in caplog.records):
                return
            time.sleep(0.05)
        pytest.fail(f"the other process did not wait for {name}")

    wait_for(model.name)
    shutil.copyfile(model, cold / model.name)  # as the builder publishes them: whole, then the lock is released
    os.close(locks[0])
    wait_for(built.directory.name)
    shutil.copytree(built.directory, cold / built.directory.name)
    os.close(locks[1])
    other.join(timeout=60)
    tokenizer, files = result[0]
    assert files.directory == cold / built.directory.name and files.meta == built.meta
    assert tokenizer.sha256 == Tokenizer.from_file(model).sha256


def test_corpus_holds_out_short_documents_whole(tmp_path):
    # 5% of a 15-token line is its </s>: the split used to hold out nothing else, so val/loss scored </s> after </s>.
    # Now one short document in every 1/val_fraction (the first included) is held out whole, and the long ones keep
    # their tails.
    words = "the cat sat on a mat and ran far away from the quick brown fox".split()
    lines = [f"line {i}: " + " ".join(words[i % 5 :] + words[: i % 5]) for i in range(40)]
    path = tmp_path / "lines.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in [*lines, TEXT]))
    tok, files = prepare_corpus(data_cfg(path, tmp_path / "cache", val_fraction=0.05, vocab_size=320))
    val = np.fromfile(files.val_path, dtype=files.dtype)
    ends = np.flatnonzero(val == EOS_ID) + 1
    pieces = np.split(val, ends[:-1])  # each held-out piece ends with its document's </s>
    assert len(pieces) == 3 and [p[0] == BOS_ID for p in pieces] == [True, True, False]  # 2 whole lines, 1 tail
    assert [tok.decode(int(t) for t in p) for p in pieces[:2]] == [lines[0], lines[20]]
    assert len(pieces[2]) >= corpus.MIN_HELD_OUT_TAIL
    train = tok.decode(int(t) for t in np.fromfile(files.train_path, dtype=files.dtype))
    assert lines[0] not in train and lines[1] in train and "winter of our discontent" in train


def test_a_val_fraction_that_holds_out_the_only_document_names_one_that_would_not(text_dir, tmp_path):
    # One document whose 0.01% is under 64 tokens: held out whole, as the first short document is. The error was the
    # training split's "0 tokens, fewer than data.seq_len+2: lower data.seq_len", after the Trainer was set up.
    one = text_dir / "doc0.txt"
    with pytest.raises(ConfigError, match=r"data.val_fraction=0.0001 leaves nothing to train on: .* the corpus is one "
                                          r"such document; raise data.val_fraction to \S+ or more") as error:
        prepare_corpus(data_cfg(one, tmp_path / "cache", val_fraction=0.0001))
    enough = float(error.value.args[0].split("raise data.val_fraction to ")[1].split()[0])
    tok, files = prepare_corpus(data_cfg(one, tmp_path / "cache", val_fraction=enough))  # as it says
    assert files.meta["train_tokens"] > 0 and files.meta["val_tokens"] >= corpus.MIN_HELD_OUT_TAIL
    assert not list((tmp_path / "cache").rglob("*.tmp*"))  # nothing written half
    # A corpus shorter than the tail a split needs: no val_fraction helps (it said "raise data.val_fraction to 16")
    short = tmp_path / "short.txt"
    short.write_text("A short line.\n")
    with pytest.raises(ConfigError, match=r"data.path=.*short.txt is \d+ tokens long, too short to hold out a "
                                          r"validation tail of 64 tokens and train on the rest; add text"):
        prepare_corpus(data_cfg(short, tmp_path / "cache"), tok)


def test_corpus_cache_is_reused_when_nothing_changed(text_dir, tmp_path, monkeypatch):
    cfg = data_cfg(text_dir, tmp_path / "cache")
    _, first = prepare_corpus(cfg)
    monkeypatch.setattr(corpus, "_build_token_files", lambda *a: pytest.fail("rebuilt an up-to-date cache"))
    monkeypatch.setattr(corpus, "train_tokenizer", lambda *a, **k: pytest.fail("retrained an up-to-date tokenizer"))
    _, second = prepare_corpus(cfg)
    assert second.directory == first.directory


def test_a_damaged_cached_tokenizer_is_trained_again(text_dir, tmp_path):
    # (it was "not a SentencePiece model; point data.tokenizer_path at a .model file", a setting no one had given)
    cfg = data_cfg(text_dir, tmp_path / "cache")
    first, _ = prepare_corpus(cfg)
    [cached] = (tmp_path / "cache").rglob("tokenizer-*.model")
    cached.write_bytes(b"damaged")
    again, _ = prepare_corpus(cfg)
    assert again.sha256 == first.sha256 and Tokenizer.from_file(cached).sha256 == first.sha256


def test_corpus_cache_is_rebuilt_when_inputs_or_tokenizer_change(text_dir, tmp_path):
    cfg = data_cfg(text_dir, tmp_path / "cache")
    tok1, first = prepare_corpus(cfg)
    (text_dir / "doc1.txt").write_text("Changed text. " * 300)
    tok2, changed = prepare_corpus(cfg)
    assert changed.directory != first.directory
    assert changed.meta["bytes"] != first.meta["bytes"]
    _, other_vocab = prepare_corpus(data_cfg(text_dir, tmp_path / "cache", vocab_size=320))
    assert other_vocab.directory != changed.directory
    assert other_vocab.meta["tokenizer_sha256"] != tok2.sha256
    # a val_fraction that 6 significant digits cannot tell apart from 0.3 named the same folder, and reused its split
    splits = [prepare_corpus(data_cfg(text_dir, tmp_path / "cache", val_fraction=v))[1] for v in (0.3, 0.3000004)]
    assert splits[0].directory != splits[1].directory and splits[1].meta["val_fraction"] == 0.3000004


def test_corpus_interrupted_build_leaves_nothing_trusted(text_dir, tmp_path, monkeypatch):
    cfg = data_cfg(text_dir, tmp_path / "cache")

    def crash(self, texts, num_threads=-1):
        raise KeyboardInterrupt

    monkeypatch.setattr(Tokenizer, "encode_batch", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(cfg)
    # nothing half-built is left: a hidden temporary folder stayed (a new name each run, never removed: large on
    # big corpora); the tokenizer, done before, stays for the next run (with the empty lock files of build_lock)
    assert [p.suffix for p in (tmp_path / "cache").glob("corpus-*/*") if p.suffix != ".lock"] == [".model"]
    monkeypatch.undo()
    _, files = prepare_corpus(cfg)
    assert files.meta["documents"] == 3


def test_a_tokenizer_is_cached_under_its_exact_character_coverage(text_dir, tmp_path):
    # 6 digits named 1.0 and 0.9999995 alike: the second reused the tokenizer trained for the first
    for coverage in (1.0, 0.9999995):
        prepare_corpus(data_cfg(text_dir, tmp_path / "cache", character_coverage=coverage))
    assert len(list((tmp_path / "cache").glob("corpus-*/tokenizer-v300-c*.model"))) == 2


def test_long_documents_are_encoded_in_pieces_that_give_the_ids_of_the_whole(tmp_path, monkeypatch):
    # Encoded whole, a 45 MB file held 1.9 GB of Python ints; in pieces cut after newlines, the same token files.
    text = tmp_path / "book.txt"
    text.write_text(TEXT + "  双倍 spaces,\n\n\n" + "a line longer than a piece, 长行 " * 12 + "\nend 🙂")
    tokenizer, whole = prepare_corpus(data_cfg(text, tmp_path / "cache", val_fraction=0.05))
    monkeypatch.setattr(corpus, "_BATCH_CHARS", 50)  # pieces of 50 characters, and a line longer than that
    _, pieces = prepare_corpus(data_cfg(text, tmp_path / "cache_in_pieces", val_fraction=0.05), tokenizer=tokenizer)
    expected = [tokenizer.bos_id, *tokenizer.encode(text.read_text()), tokenizer.eos_id]
    for files in (whole, pieces):
        ids = [*np.fromfile(files.train_path, files.dtype), *np.fromfile(files.val_path, files.dtype)]
        assert ids == expected
    assert [len(p) for p, _ in corpus._pieces("ab\n" * 30, True, True)][:2] == [48, 42]  # after the last newline
    assert tokenizer.encodes_lines_apart and tokenizer.encodes_words_apart
    # A text of few newlines (text8 is one 100 MB line) is cut before words: before a space after another character
    one_line = tmp_path / "one_line.txt"
    one_line.write_text(" ".join(TEXT.split()) + "  two  spaces  " * 9 + "长" * 60 + " end")
    _, files = prepare_corpus(data_cfg(one_line, tmp_path / "cache_one_line", val_fraction=0.05), tokenizer=tokenizer)
    ids = [*np.fromfile(files.train_path, files.dtype), *np.fromfile(files.val_path, files.dtype)]
    assert ids == [tokenizer.bos_id, *tokenizer.encode(one_line.read_text()), tokenizer.eos_id]
    pieces = [p for p, _ in corpus._pieces(one_line.read_text(), True, True)]
    assert "".join(pieces) == one_line.read_text() and len(pieces) > 5
    assert all(p[-1] != " " and n[0] == " " for p, n in itertools.pairwise(pieces))
    assert pieces[-2].endswith("  " + "长" * 60) and len(pieces[-2]) > 50  # no cut in reach: the piece ran on
    # A tokenizer that puts "▁" before every text (Llama 2's) would put one before every piece: whole documents
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT.splitlines()), model_writer=buffer, model_type="bpe",
                                   vocab_size=80, minloglevel=2)
    prefixed = Tokenizer(buffer.getvalue())
    assert prefixed.adds_dummy_prefix and not prefixed.encodes_lines_apart and not prefixed.encodes_words_apart
    # One that squeezes spaces (remove_extra_whitespaces, SentencePiece's default) would drop a piece's first space,
    # and its NFKC normalizer makes a newline a space, squeezed at a piece's end ("Duke.\n|Good" lost a ▁)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT.splitlines()), model_writer=buffer, model_type="bpe",
                                   vocab_size=80, add_dummy_prefix=False, minloglevel=2)
    squeezing = Tokenizer(buffer.getvalue())
    assert not squeezing.encodes_words_apart and not squeezing.encodes_lines_apart
    for other in (prefixed, squeezing):
        _, files = prepare_corpus(data_cfg(text, tmp_path / f"cache_{other.sha256[:8]}", vocab_size=80), other)
        ids = [*np.fromfile(files.train_path, files.dtype), *np.fromfile(files.val_path, files.dtype)]
        assert ids == [other.bos_id, *other.encode(text.read_text()), other.eos_id]


def test_corpus_reads_jsonl_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"{i} " + TEXT}) for i in range(4)))
    _, files = prepare_corpus(data_cfg(path, tmp_path / "cache", text_field="body"))
    assert files.meta["documents"] == 4
    # Hugging Face's Dataset.to_json writes JSON Lines to a .json file: read as one text, its markup was trained on
    shutil.copy(path, tmp_path / "docs.json")
    _, files = prepare_corpus(data_cfg(tmp_path / "docs.json", tmp_path / "cache", text_field="body"))
    assert files.meta["documents"] == 4 and files.meta["bytes"] == 4 * len(TEXT) + 8  # the texts, not the JSON
    (tmp_path / "array.json").write_text(json.dumps([{"body": TEXT}], indent=2))
    with pytest.raises(ConfigError, match="array.json is JSON, but not JSON Lines"):
        prepare_corpus(data_cfg(tmp_path / "array.json", tmp_path / "cache", text_field="body"))


def test_corpus_glob_selects_files(text_dir, tmp_path):
    _, files = prepare_corpus(data_cfg(f"{text_dir}/doc[01].txt", tmp_path / "cache"))
    assert files.meta["documents"] == 2


def test_a_folder_is_read_as_a_glob_reads_it_without_hidden_files_and_through_links(tmp_path):
    # The walk read .git, .venv and Jupyter's .ipynb_checkpoints copies (the text twice) and skipped linked folders
    corpus, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere"
    for folder in (corpus / ".ipynb_checkpoints", corpus / ".git", elsewhere):
        folder.mkdir(parents=True)
    for file in (corpus / "a.txt", corpus / ".ipynb_checkpoints" / "a-checkpoint.txt", corpus / ".git" / "MSG.md",
                 corpus / ".notes.txt", elsewhere / "b.txt"):
        file.write_text(TEXT)
    (corpus / "linked").symlink_to(elsewhere)
    (elsewhere / "back").symlink_to(corpus)  # a loop: each real folder is read once
    assert resolve_sources(str(corpus)) == [corpus / "a.txt", corpus / "linked" / "b.txt"]
    (elsewhere / "back").unlink()  # (a glob would follow the loop, dozens of levels deep)
    assert resolve_sources(f"{corpus}/**/*.txt") == resolve_sources(str(corpus))


def test_corpus_path_with_brackets_in_its_name_is_that_path_not_a_glob(tmp_path):
    folder = tmp_path / "exp[1]"
    folder.mkdir()
    (folder / "a.txt").write_text(TEXT)
    _, files = prepare_corpus(data_cfg(folder, tmp_path / "cache"))
    assert files.meta["documents"] == 1


def test_corpus_cache_sees_an_edit_that_kept_size_and_modification_time(tmp_path):
    # cp -p, rsync -t and tar x put an edited file's old modification time back; a same-size edit looked unchanged
    path = tmp_path / "corpus.txt"
    path.write_text("the cat sat on the mat. " * 200)
    _, before = prepare_corpus(data_cfg(path, tmp_path / "cache"))
    stat = path.stat()
    path.write_text("the dog ran to the car. " * 200)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    tok, after = prepare_corpus(data_cfg(path, tmp_path / "cache"))
    assert after.directory != before.directory
    assert tok.decode(np.fromfile(after.train_path, dtype=after.dtype)[:8].tolist()).startswith("the dog")


def test_corpus_cache_is_keyed_by_the_jsonl_text_field(tmp_path, text_dir, monkeypatch):
    path = tmp_path / "docs.jsonl"
    lines = [{"title": f"The title of part {i}. " * 20, "body": f"{i} " + TEXT} for i in range(4)]
    path.write_text("\n".join(map(json.dumps, lines)))
    tok_title, title = prepare_corpus(data_cfg(path, tmp_path / "cache", text_field="title"))
    tok_body, body = prepare_corpus(data_cfg(path, tmp_path / "cache", text_field="body"))
    assert title.directory.parent != body.directory.parent and tok_title.sha256 != tok_body.sha256
    assert body.meta["bytes"] > title.meta["bytes"]
    # plain text has no fields: the setting must not rebuild its cache
    _, first = prepare_corpus(data_cfg(text_dir, tmp_path / "cache"))
    monkeypatch.setattr(corpus, "_build_token_files", lambda *a: pytest.fail("rebuilt an up-to-date cache"))
    _, again = prepare_corpus(data_cfg(text_dir, tmp_path / "cache", text_field="body"))
    assert again.directory == first.directory


def test_corpus_build_keeps_the_folder_another_process_published_first(text_dir, tmp_path, monkeypatch):
    # Ranks that start together on a cold cache all build the same token files: the one that finishes last must
    # keep the folder already in place (the others are reading it), not delete it and rename its own copy in.
    cfg = data_cfg(text_dir, tmp_path / "cache")
    _, published = prepare_corpus(cfg)
    inode = published.train_path.stat().st_ino
    read_meta, looks = corpus._read_meta, []

    def cold_at_first_look(*args):  # this process looked before the other one had published its build
        looks.append(args)
        return None if len(looks) == 1 else read_meta(*args)

    monkeypatch.setattr(corpus, "_read_meta", cold_at_first_look)
    _, files = prepare_corpus(cfg)
    assert files.train_path.stat().st_ino == inode
    hidden = [p.name for p in files.directory.parent.iterdir() if p.name.startswith(".") and p.suffix != ".lock"]
    assert hidden == []  # its copy removed (the empty lock files of build_lock stay)
    # an unfinished folder under the same name (no meta.json) is replaced
    monkeypatch.undo()
    (files.directory / "meta.json").unlink()
    _, rebuilt = prepare_corpus(cfg)
    assert rebuilt.meta == published.meta and (rebuilt.directory / "meta.json").is_file()


def test_corpus_jsonl_lines_end_at_newlines_only(tmp_path):
    # json.dumps(ensure_ascii=False) writes U+2028, U+2029 and U+0085 raw inside strings: they do not end a line
    path = tmp_path / "docs.jsonl"
    odd = "one\u2028two\u2029three\x85four " + TEXT
    path.write_text("\r\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in [TEXT, odd, TEXT]),
                    encoding="utf-8")
    tok, files = prepare_corpus(data_cfg(path, tmp_path / "cache"))
    assert files.meta["documents"] == 3
    assert "one\u2028two\u2029three\x85four" in tok.decode(np.fromfile(files.train_path, dtype=files.dtype))
    with path.open("a", encoding="utf-8") as f:
        f.write("\n{oops")
    with pytest.raises(ConfigError, match="docs.jsonl:4 is not valid JSON"):
        prepare_corpus(data_cfg(path, tmp_path / "cache"))


def test_corpus_reads_json_lines_by_suffix_in_any_case(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("a.ndjson", "B.JSONL"):
        (folder / name).write_text("\n".join(json.dumps({"text": f"{name} {i} " + TEXT}) for i in range(2)))
    (folder / "c.TXT").write_text(TEXT)
    tok, files = prepare_corpus(data_cfg(folder, tmp_path / "cache"))
    assert files.meta["documents"] == 5
    assert '{"text"' not in tok.decode(np.fromfile(files.train_path, dtype=files.dtype))


def test_corpus_ignores_a_utf8_byte_order_mark(tmp_path):
    folder = tmp_path / "bom"
    folder.mkdir()
    (folder / "a.jsonl").write_text("\n".join(json.dumps({"text": TEXT}) for _ in range(2)), encoding="utf-8-sig")
    (folder / "b.txt").write_text(TEXT, encoding="utf-8-sig")
    tok, files = prepare_corpus(data_cfg(folder, tmp_path / "cache"))
    assert files.meta["documents"] == 3
    tokens = [np.fromfile(path, dtype=files.dtype) for path in (files.train_path, files.val_path)]
    assert "\ufeff" not in tok.decode(np.concatenate(tokens))


def _write(path, data):
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _mkdir(path):
    path.mkdir()
    return path


def _corpus(path, files):
    path.mkdir()
    for name, data in files.items():
        _write(path / name, data)
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing", "does not exist"),
        (lambda d: _mkdir(d / "empty"), "matched no .txt"),
        (lambda d: _write(d / "e.txt", ""), "is empty"),
        (lambda d: _write(d / "bin.txt", b"ok\xff\xfe"), "is not UTF-8 text .*offset 2"),
        (lambda d: _write(d / "b.jsonl", '{"text": "a"}\n{oops'), "b.jsonl:2 is not valid JSON"),
        (lambda d: _write(d / "k.jsonl", '{"body": "a"}'), "no string field 'text'"),
        # an emoji cut in two by a scraper (a lone \\ud83d escape): SentencePiece's trainer failed, naming no line
        (lambda d: _write(d / "s.jsonl", '{"text": "a"}\n{"text": "cut \\ud83d"}'),
         r"s.jsonl:2: character 5 is U\+D83D, half of a character"),
        # the tokenizer trainer reads the files after the first one lazily: their errors must come out unchanged
        (lambda d: _corpus(d / "c", {"a.txt": TEXT, "b.txt": b"ok\xff"}), "b.txt is not UTF-8 text"),
        (lambda d: _corpus(d / "c", {"a.jsonl": json.dumps({"text": TEXT}), "b.jsonl": '{"text": "a"}\n{oops'}),
         "b.jsonl:2 is not valid JSON"),
    ],
    ids=["missing", "no-files", "empty", "undecodable", "bad-json", "no-field", "lone-surrogate",
         "undecodable-second-file",
         "bad-json-second-file"],
)
def test_corpus_bad_input_gives_one_clear_error(tmp_path, make, message):
    with pytest.raises(ConfigError, match=message) as err:
        prepare_corpus(data_cfg(make(tmp_path), tmp_path / "cache"))
    assert "\n" not in str(err.value)


def test_a_cache_dir_that_cannot_be_created_is_one_line(text_dir, tmp_path):
    blocker = _write(tmp_path / "a_file", "not a folder")  # fails for root too, unlike a read-only folder
    with pytest.raises(ConfigError, match=r"cannot create the token cache under data.cache_dir=.*a_file/cache \(Not a "
                                          r"directory\); point it \(lfpl-train: paths.cache_dir; any command: "
                                          r"\$LFPL_CACHE_DIR\)"):  # (lfpl-eval has no paths.cache_dir)
        prepare_corpus(data_cfg(text_dir, blocker / "cache"))


def test_corpus_vocab_too_large_for_corpus(text_dir, tmp_path):
    with pytest.raises(ConfigError, match="too large for this corpus"):
        prepare_corpus(data_cfg(text_dir, tmp_path / "cache", vocab_size=20000))


def test_corpus_tokenizer_mismatch_is_an_error(text_dir, tmp_path):
    tok, _ = prepare_corpus(data_cfg(text_dir, tmp_path / "cache"))
    tok.save(tmp_path / "a.model")
    other, _ = prepare_corpus(data_cfg(text_dir, tmp_path / "cache", vocab_size=320))
    with pytest.raises(ConfigError, match="not the tokenizer this checkpoint was trained with"):
        prepare_corpus(data_cfg(text_dir, tmp_path / "cache", tokenizer_path=str(tmp_path / "a.model")), other)
    with pytest.raises(ConfigError, match="set data.vocab_size=300"):
        prepare_corpus(data_cfg(text_dir, tmp_path / "cache", vocab_size=512, tokenizer_path=str(tmp_path / "a.model")))


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    return _TokenFile(path, np.dtype(np.uint16))


def test_windows_are_a_function_of_seed_and_index(token_file):
    a, b = RandomWindows(token_file, 16, seed=1), RandomWindows(token_file, 16, seed=1)
    x, y = a[12345]
    assert (x == b[12345][0]).all()
    assert (y == x + 1).all()  # target = input shifted by one token
    assert not (a[1][0] == a[2][0]).all()
    assert not (RandomWindows(token_file, 16, seed=2)[12345][0] == x).all()


def test_step_batches_are_disjoint_across_ranks_and_resume_where_they_left_off():
    ranks = [list(StepBatchSampler(0, 3, batch_size=4, rank=r, world_size=2)) for r in range(2)]
    flat = [i for batches in ranks for batch in batches for i in batch]
    assert len(flat) == len(set(flat)) == 24
    whole = list(StepBatchSampler(0, 5, batch_size=4, rank=0, world_size=1))
    resumed = list(StepBatchSampler(2, 3, batch_size=4, rank=0, world_size=1))
    assert resumed == whole[2:]


def step_samples(step: int, batch_size: int, accumulate: int, world_size: int) -> set[int]:
    """The samples optimizer ``step`` trains on, over its micro-batches and ranks."""
    return {i for rank in range(world_size)
            for batch in StepBatchSampler(step * accumulate, accumulate, batch_size, rank, world_size) for i in batch}


def test_a_step_trains_on_the_same_samples_however_its_batch_is_split():
    # What a resume checks (StepDataModule): the samples per step, not how they are split among processes. 2
    # devices × 4, or 1 × 8, trains on the same samples as it would have (so would 1 × 4 with 2 micro-batches, but
    # Lightning's place in the epoch counts micro-batches: a resume keeps trainer.accumulate_grad_batches, below).
    for step in (0, 3, 10):
        split = [step_samples(step, *shape) for shape in [(4, 1, 2), (4, 2, 1), (8, 1, 1), (2, 2, 2)]]
        assert all(samples == split[0] for samples in split) and len(split[0]) == 8
    # a run of 8 per step resumed at step 10 with 4 per step: samples its step 5 trained on already
    assert step_samples(10, 4, 1, 1) < step_samples(5, 8, 1, 1)


def test_a_resume_keeps_the_micro_batches_per_step_and_may_move_the_rest(text_dir, tmp_path):
    # Resumed at step 3 from 1 micro-batch of 4 to 2 of 2, the first step took half a batch and every later one
    # straddled two of the run's: Lightning's restored place in the epoch counts the old micro-batches.
    def data(batch_size: int, accumulate: int, world_size: int) -> TextDataModule:
        dm = TextDataModule(data_cfg(text_dir, tmp_path / "cache", batch_size=batch_size))
        dm.trainer = SimpleNamespace(accumulate_grad_batches=accumulate, world_size=world_size)
        return dm

    saved = data(4, 1, 2).state_dict()
    data(8, 1, 1).load_state_dict(saved)  # half the devices, twice the micro-batch: the same run
    with pytest.raises(ConfigError, match=r"trainer.accumulate_grad_batches: 1 → 2\): resumed, it would train on"):
        data(4, 2, 1).load_state_dict(saved)


def test_validation_sweep_predicts_every_token_once(token_file):
    sweep = SweepWindows(token_file, seq_len=64, pad_id=0)
    targets = np.concatenate([y[y != IGNORE_INDEX].numpy() for _, y in (sweep[i] for i in range(len(sweep)))])
    assert (targets == np.arange(1, 1000)).all()


def test_token_file_pickles_without_its_data(token_file):
    import pickle

    assert token_file.tokens[5] == 5  # opens the memmap
    clone = pickle.loads(pickle.dumps(token_file))
    assert clone._tokens is None and clone.tokens[5] == 5
    assert os.path.getsize(token_file.path) == 2000


@pytest.mark.parametrize(
    ("max_steps", "accumulate", "message"),
    [(-1, 1, "trainer.max_steps=-1 must be a positive number of optimizer steps: training draws windows"),
     (0, 1, "trainer.max_steps=0 must be a positive number"),
     (10, 0, "trainer.accumulate_grad_batches=0 must be 1 or more")],
)
def test_training_needs_steps_and_whole_accumulation(max_steps, accumulate, message):
    from types import SimpleNamespace

    from llmfoundry_pl.data import TextDataModule

    dm = TextDataModule(DataConfig())
    dm.trainer = SimpleNamespace(max_steps=max_steps, accumulate_grad_batches=accumulate, global_step=0)
    with pytest.raises(ConfigError, match=message):
        dm.train_dataloader()


def test_a_resumed_fit_draws_the_micro_batches_from_its_step_on():
    from types import SimpleNamespace

    from llmfoundry_pl.data.datamodule import remaining_micro_batches

    trainer = SimpleNamespace(max_steps=10, accumulate_grad_batches=2, global_step=3)
    assert remaining_micro_batches(trainer, "") == (6, 14)
    trainer.global_step = 12  # past max_steps (resumed with a lower max_steps): nothing left, not a negative count
    assert remaining_micro_batches(trainer, "") == (24, 0)


@pytest.mark.parametrize("seq_len", [64, 80, 100, 128, 250])  # 16, 13, 10, 8 and 4 windows
@pytest.mark.parametrize(("world_size", "batch_size"), [(2, 1), (2, 4), (3, 2), (3, 4)])
def test_ranks_share_the_validation_windows_in_as_many_batches(token_file, seq_len, world_size, batch_size):
    # Under FSDP every forward pass is a collective, so a rank with one batch more than the others would hang.
    from torch.utils.data import DataLoader

    from llmfoundry_pl.data.datamodule import RankShare, unscored_window

    sweep = SweepWindows(token_file, seq_len=seq_len, pad_id=0)
    loaders = [DataLoader(RankShare(sweep, SimpleNamespace(global_rank=r, world_size=world_size), unscored_window,
                                    "windows", ""), batch_size=batch_size) for r in range(world_size)]
    assert len({len(loader) for loader in loaders}) == 1
    scored = np.concatenate([y[y != IGNORE_INDEX].numpy() for loader in loaders for _, y in loader])
    assert (np.sort(scored) == np.arange(1, 1000)).all()  # every target once, whatever the padding added


def test_ranks_share_the_validation_items_and_each_needs_one():
    from llmfoundry_pl.data.datamodule import RankShare

    ranks = [SimpleNamespace(global_rank=r, world_size=3) for r in range(3)]
    items = list(range(7))
    shares = [list(RankShare(items, trainer, lambda i: -1, "windows", "")) for trainer in ranks]
    assert shares == [[0, 3, 6], [1, 4, -1], [2, 5, -1]]  # all of them, none twice, the short ranks evened out
    assert list(RankShare(items, None, lambda i: -1, "windows", "")) == items  # no trainer: one process
    # Lightning refuses an empty loader on the rank that has it (a traceback there, a dropped connection elsewhere):
    # every rank refuses in one line instead
    for trainer in ranks:
        with pytest.raises(ConfigError, match=r"fewer windows \(2\) than processes sharing it \(3\); lower it"):
            RankShare([0, 1], trainer, lambda i: -1, "windows", "lower it")


@pytest.mark.parametrize(
    ("schema", "setting", "message"),
    [(DataConfig, {"batch_size": 0}, "data.batch_size=0 must be positive"),
     (DataConfig, {"val_stride": 300}, "data.val_stride=300 must be between 1 and data.seq_len=256"),
     (DataConfig, {"num_workers": -1}, r"data.num_workers=-1 must be 0 or more \(0 loads in the main process\)"),
     (ChatDataConfig, {"num_workers": -1}, "data.num_workers=-1 must be 0 or more"),
     (DataConfig, {"seed": -1}, "data.seed=-1 must be 0 or more"),  # numpy's SeedSequence refuses it in the loader
     (DataConfig, {"character_coverage": 0.5}, r"data.character_coverage=0.5 must be between 0.98 and 1 "
                                               r"\(SentencePiece's range\)"),
     (ChatDataConfig, {"format": "dpo"}, "data.format='dpo' is not one of sft, preference")],
)
def test_data_settings_are_checked_before_any_loading(schema, setting, message):
    with pytest.raises(ConfigError, match=message):
        schema(**setting)
