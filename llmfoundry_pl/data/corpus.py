"""Text corpus → tokenizer + flat token files, built once and cached.

Layout of the cache (``data.cache_dir``), keyed by what produced each file, so a change of input rebuilds and
nothing stale is ever reused::

    corpus-<hash of file paths, sizes, mtimes, ctimes (and data.text_field, if JSON Lines are among them)>/
        tokenizer-v<vocab>-c<coverage>.model         SentencePiece model trained on this corpus
        tokens-<tokenizer sha>-val<fraction>/
            train.bin  val.bin                        uint16 (or uint32) token ids, documents back to back
            meta.json                                 written last: a folder without it is never trusted

Every document becomes ``<s> text </s>``; the last ``val_fraction`` of each document's tokens goes to
validation, so held-out text comes from every play (or file) rather than from one. A document whose share would be
under ``MIN_HELD_OUT_TAIL`` tokens (a line of a JSON Lines corpus, say) goes to validation whole instead, one such
document in every 1/val_fraction: the last 5% of a 20-token document is its ``</s>``, and a validation split of
nothing but ``</s>`` after ``</s>`` measures nothing.
Folders are built under a temporary name and renamed into place, so an interrupted build leaves nothing
that a later run would trust, and processes building the same folder at once (DDP ranks on a cold cache) all end up
reading the first one published.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from llmfoundry_pl.config import ConfigError, DataConfig
from llmfoundry_pl.files import atomic_write_bytes, cached_or_built, publish_folder, temporary_folder
from llmfoundry_pl.tokenizer import Tokenizer, check_encodable, train_tokenizer

JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")  # one document per line: the string in its data.text_field
TEXT_SUFFIXES = (".txt", ".md", *JSON_LINES_SUFFIXES)  # compared in lower case: DOCS.JSONL is JSON Lines too
CACHE_FORMAT = 2  # bump when the layout or the tokenization rules change, to invalidate old caches (2: short docs)
MIN_HELD_OUT_TAIL = 64  # tokens: a document whose val_fraction is fewer is held out whole, or not at all
# Text goes to SentencePiece in batches of about this many characters (its threads share a batch), a longer document
# cut into pieces after newlines or before words: a token's id in a Python list takes ~36 bytes, and a 45 MB file
# encoded whole (one document) held 1.9 GB of them, where its token file is 33 MB.
_BATCH_CHARS = 1 << 20
_LAST_WORD_END = re.compile(r"(?s).*[^ ](?= )")  # matched from a start: up to the last character a space follows
_WORD_END = re.compile(r"[^ ](?= )")  # searched: the next character a space follows


def bundled_corpus_dir() -> Path:
    """The demo corpus shipped in the package: 13 Shakespeare comedies (see assets/shakespeare/SOURCE.md)."""
    return Path(str(resources.files("llmfoundry_pl.assets") / "shakespeare"))


def resolve_sources(path: str | None) -> list[Path]:
    """The text files behind ``data.path``: a file, a folder (searched recursively) or a glob; null → bundled."""
    if path is None:
        return sorted(bundled_corpus_dir().glob("*.txt"))
    expanded = os.path.expanduser(path)
    if Path(expanded).is_dir():
        files = sorted(p for p in _folder_files(Path(expanded)) if p.suffix.lower() in TEXT_SUFFIXES)
    elif Path(expanded).is_file():
        files = [Path(expanded)]
    elif any(ch in expanded for ch in "*?["):  # a glob only if no such path exists: exp[1]/ may be a folder's name
        files = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
    else:
        raise ConfigError(f"data.path={path} does not exist; give a text file, a folder or a glob such as 'dir/*.txt'")
    if not files:
        raise ConfigError(f"data.path={path} matched no {', '.join(TEXT_SUFFIXES)} files; point it at your text")
    return files


def _folder_files(folder: Path) -> Iterator[Path]:
    """The files under ``folder``, as a glob ``folder/**`` finds them: hidden files and folders left out (.git,
    .venv, .ipynb_checkpoints: Jupyter's copies of every notebook's text doubled it), linked folders followed
    (``Path.rglob`` skipped them on Python 3.11), each real folder once (a link back up would loop)."""
    seen = set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        yield from (Path(root, n) for n in names if not n.startswith(".") and Path(root, n).is_file())


def is_json_lines(file: Path) -> bool:
    """Whether ``file`` holds JSON Lines: by its suffix, or a ``.json`` file whose first character (after blanks
    and a byte-order mark) opens an object, as Hugging Face's ``Dataset.to_json`` writes them (read as text, each
    line's ``{"text": ...}`` markup was trained on). A ``.json`` file of one JSON value is refused in one line."""
    suffix = file.suffix.lower()
    if suffix != ".json":
        return suffix in JSON_LINES_SUFFIXES
    with open(file, encoding="utf-8-sig", errors="replace") as f:
        start = f.read(4096).lstrip()[:1]
    if start != "{":
        raise ConfigError(f"{file} is JSON, but not JSON Lines (one object per line, its data.text_field the text); "
                          "write it as JSON Lines (jq -c '.[]' for an array), or give a .txt file of the text")
    return True


def read_documents(file: Path, text_field: str = "text") -> list[str]:
    """One document per plain-text file, or one per line of a JSON Lines file (its ``text_field``)."""
    try:
        # utf-8-sig drops the byte-order mark Notepad and PowerShell write: it is neither text to learn nor JSON
        raw = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{file} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); convert it to UTF-8"
        ) from None
    if not is_json_lines(file):
        return [raw]
    docs = []
    # Lines end at "\n" only (a CRLF line's "\r" is JSON whitespace): str.splitlines() would also cut at U+2028,
    # U+2029 and U+0085, which JSON allows raw inside strings (json.dumps(ensure_ascii=False) writes them so).
    for lineno, line in enumerate(raw.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}:{lineno} is not valid JSON ({e.msg}); fix or remove that line") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise ConfigError(f"{file}:{lineno} has no string field '{text_field}'; set data.text_field to its key")
        check_encodable(record[text_field], f"{file}:{lineno}")
        docs.append(record[text_field])
    return docs


def iter_documents(files: list[Path], text_field: str) -> Iterator[str]:
    for f in files:
        yield from read_documents(f, text_field)


def sources_fingerprint(files: list[Path], text_field: str) -> str:
    """Cheap identity of the inputs: paths, sizes and modification times (not the content, for large corpora), and
    the field read from JSON Lines files. Plain text has no fields, so its key ignores data.text_field.

    The change time too: ``cp -p``, ``rsync -t`` and ``tar x`` put back an edited file's old modification time,
    and a same-size edit then looked unchanged; no tool can set the change time, which any write moves."""
    h = hashlib.sha256(f"format{CACHE_FORMAT}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}\n".encode())
    if any(is_json_lines(f) for f in files):
        h.update(f"text_field={text_field}\n".encode())
    return h.hexdigest()[:16]


# What a corpus's split is, as a run records it (run_config["data_split"]) for lfpl-eval to check that the text it
# validated on has not changed since: counts, not a hash, so checking reads no text. An edit that keeps every count
# (a same-length typo fix) goes unseen, and moves the figures by as little.
SPLIT_COUNTS = ("documents", "bytes", "train_tokens", "val_tokens")


def split_counts(meta: dict) -> dict[str, int] | None:
    """The :data:`SPLIT_COUNTS` of a token-file ``meta``; None for chunks made elsewhere, which lack some."""
    return {k: meta[k] for k in SPLIT_COUNTS} if all(k in meta for k in SPLIT_COUNTS) else None


@dataclass
class TokenFiles:
    """The cached token files of one corpus and tokenizer."""

    directory: Path
    meta: dict

    @property
    def train_path(self) -> Path:
        return self.directory / "train.bin"

    @property
    def val_path(self) -> Path:
        return self.directory / "val.bin"

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])


def prepare_corpus(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> tuple[Tokenizer, TokenFiles]:
    """Load or build the tokenizer and the token files for ``cfg``; reuse the cache when nothing changed.

    ``tokenizer`` forces a given tokenizer (e.g. the one saved in a checkpoint) instead of data.tokenizer_path
    or training one."""
    files = resolve_sources(cfg.path)
    if all(f.stat().st_size == 0 for f in files):
        raise ConfigError(f"the corpus at data.path={cfg.path} is empty; add some text")
    corpus_dir = Path(cfg.cache_dir).expanduser() / f"corpus-{sources_fingerprint(files, cfg.text_field)}"
    try:
        corpus_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the token cache under data.cache_dir={cfg.cache_dir} ({e.strerror}); point "
                          "it (lfpl-train: paths.cache_dir; any command: $LFPL_CACHE_DIR) at a folder you can write"
                          ) from None
    tokenizer = _resolve_tokenizer(cfg, files, corpus_dir, tokenizer)
    # repr, not :g, whose 6 digits named 0.3 and 0.3000004 alike, and the second reused the first's split
    token_dir = corpus_dir / f"tokens-{tokenizer.sha256[:12]}-val{cfg.val_fraction!r}"
    meta = cached_or_built(token_dir, lambda: _read_meta(token_dir, tokenizer),
                           lambda: _build_token_files(files, cfg, tokenizer, token_dir))
    return tokenizer, TokenFiles(token_dir, meta)


def _resolve_tokenizer(cfg: DataConfig, files: list[Path], corpus_dir: Path, given: Tokenizer | None) -> Tokenizer:
    if given is not None:
        if cfg.tokenizer_path is not None and Tokenizer.from_file(cfg.tokenizer_path).sha256 != given.sha256:
            raise ConfigError(
                f"data.tokenizer_path={cfg.tokenizer_path} is not the tokenizer this checkpoint was trained with; "
                "drop data.tokenizer_path (the checkpoint carries its own)"
            )
        return given
    if cfg.tokenizer_path is not None:
        tokenizer = Tokenizer.from_file(cfg.tokenizer_path)
    else:
        # repr, as for val_fraction below: :g named 1.0 and 0.9999995 alike, and the second reused the first
        model_path = corpus_dir / f"tokenizer-v{cfg.vocab_size}-c{cfg.character_coverage!r}.model"
        tokenizer = cached_or_built(model_path, lambda: _cached_tokenizer(model_path),
                                    lambda: _train_and_save(files, cfg, model_path))
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but data.vocab_size={cfg.vocab_size}; "
            f"set data.vocab_size={tokenizer.vocab_size}"
        )
    return tokenizer


def _train_and_save(files: list[Path], cfg: DataConfig, model_path: Path) -> Tokenizer:
    lines = (line for doc in iter_documents(files, cfg.text_field) for line in doc.splitlines() if line)
    tokenizer = train_tokenizer(lines, cfg.vocab_size, cfg.character_coverage)
    tokenizer.save(model_path)
    return tokenizer


def _cached_tokenizer(model_path: Path) -> Tokenizer | None:
    """The tokenizer trained for this corpus before, if there is one whole."""
    try:
        return Tokenizer.from_file(model_path, key=None) if model_path.is_file() else None
    except ConfigError:  # damaged (not by us: it is written whole or not at all): rebuilt, as a cache is
        return None


def _read_meta(token_dir: Path, tokenizer: Tokenizer) -> dict | None:
    """The meta of the token files in ``token_dir`` if they are complete and made by ``tokenizer``; else None."""
    try:
        meta = json.loads((token_dir / "meta.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return meta if meta.get("tokenizer_sha256") == tokenizer.sha256 else None


def _build_token_files(files: list[Path], cfg: DataConfig, tokenizer: Tokenizer, token_dir: Path) -> dict:
    """Tokenize every document (SentencePiece threads in C++, a progress bar over chunks), split each document's
    tail off for validation (or hold out whole short documents, see the module docstring), and write both streams
    into a temporary folder that is renamed into place."""
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    with temporary_folder(token_dir) as tmp_dir:
        counts = _write_token_streams(files, cfg, tokenizer, dtype, tmp_dir)
        meta = {
            "format": CACHE_FORMAT,
            "dtype": np.dtype(dtype).name,
            "tokenizer_sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size,
            "val_fraction": cfg.val_fraction,
            # absolute: data=streaming compares them with data.path from any folder
            "sources": [str(f.resolve()) for f in files[:100]] + ([f"... {len(files) - 100} more"] if len(files) > 100
                                                                  else []),
            "source_bytes": sum(f.stat().st_size for f in files),  # with sources, what data=streaming compares
            **({"text_field": cfg.text_field} if any(is_json_lines(f) for f in files) else {}),  # and this
            **counts,
        }
        atomic_write_bytes(tmp_dir / "meta.json", json.dumps(meta, indent=2).encode())
        publish_folder(tmp_dir, token_dir, lambda folder: _read_meta(folder, tokenizer) is not None)
    return meta


def _document_tokens(tokenizer: Tokenizer, docs: list[str], dtype: type, bar: tqdm) -> Iterator[np.ndarray]:
    """``<s> ids </s>`` of each document, in order, as ``dtype`` arrays, encoded in batches of pieces (see
    :data:`_BATCH_CHARS`) cut where that gives the ids of the whole: after newlines (``encodes_lines_apart``), or
    before a word (``encodes_words_apart``), as this project's tokenizers allow; else whole (an imported tokenizer
    with a dummy prefix, say)."""
    lines, words = tokenizer.encodes_lines_apart, tokenizer.encodes_words_apart
    pieces = ((piece, end == len(doc)) for doc in docs for piece, end in _pieces(doc, lines, words))
    bos, eos = np.array([tokenizer.bos_id], dtype=dtype), np.array([tokenizer.eos_id], dtype=dtype)
    current: list[np.ndarray] = []  # the pieces of the document being put together
    while batch := _take_chars(pieces, _BATCH_CHARS):
        for (piece, last), ids in zip(batch, tokenizer.encode_batch([p for p, _ in batch]), strict=True):
            current.append(np.asarray(ids, dtype=dtype))
            bar.update(len(piece))
            if last:
                yield np.concatenate([bos, *current, eos])
                current = []


def _pieces(doc: str, lines: bool, words: bool) -> Iterator[tuple[str, int]]:
    """``doc`` in pieces of at most :data:`_BATCH_CHARS` characters with the offset each ends at, each cut after
    the last newline in reach (``lines``), else before the last word in reach (``words``: before a space that
    follows another character); where neither is in reach, the piece runs on to the next cut. A short document, or
    one that may not be cut, is one piece."""
    start = 0
    while len(doc) - start > _BATCH_CHARS:
        stop = start + _BATCH_CHARS
        end = _last_cut(doc, start, stop, lines, words) or _next_cut(doc, stop, lines, words) or len(doc)
        yield doc[start:end], end
        if end == len(doc):
            return
        start = end
    yield doc[start:], len(doc)


def _last_cut(doc: str, start: int, stop: int, lines: bool, words: bool) -> int:
    """The last offset in (start, stop] where ``doc`` may be cut (see :func:`_pieces`), or 0 if none."""
    if lines and (end := doc.rfind("\n", start, stop) + 1) > start:
        return end
    if words and (match := _LAST_WORD_END.match(doc, start, stop)):
        return match.end()
    return 0


def _next_cut(doc: str, stop: int, lines: bool, words: bool) -> int:
    """The first offset past ``stop`` where ``doc`` may be cut (see :func:`_pieces`), or 0 if none."""
    ends = []
    if lines and (newline := doc.find("\n", stop)) >= 0:
        ends.append(newline + 1)
    if words and (match := _WORD_END.search(doc, stop)):
        ends.append(match.end())
    return min(ends, default=0)


def _take_chars(items: Iterator[tuple[str, bool]], budget: int) -> list[tuple[str, bool]]:
    """The next items of ``items`` up to about ``budget`` characters (at least one item, if any is left)."""
    batch, chars = [], 0
    for item in items:
        batch.append(item)
        chars += len(item[0])
        if chars >= budget:
            break
    return batch


def _write_token_streams(files: list[Path], cfg: DataConfig, tokenizer: Tokenizer, dtype: type, folder: Path) -> dict:
    """Write train.bin and val.bin of every document into ``folder``; their token, document and byte counts."""
    counts = {"train_tokens": 0, "val_tokens": 0, "documents": 0, "bytes": 0}
    longest = 0  # tokens of the longest document
    short_docs = 0  # seen so far: whole ones are held out at an even val_fraction of them, the first included
    docs = list(iter_documents(files, cfg.text_field))
    total_chars = sum(len(doc) for doc in docs)
    with open(folder / "train.bin", "wb") as train_f, open(folder / "val.bin", "wb") as val_f, \
            tqdm(total=total_chars, desc="tokenizing", unit="char", unit_scale=True,
                 disable=total_chars < 16 * _BATCH_CHARS) as bar:
        for doc, tokens in zip(docs, _document_tokens(tokenizer, docs, dtype, bar), strict=True):
            longest = max(longest, len(tokens))
            n_val = math.ceil(len(tokens) * cfg.val_fraction)
            if n_val < MIN_HELD_OUT_TAIL and n_val < len(tokens):
                short_docs += 1
                held_out = math.ceil(short_docs * cfg.val_fraction) > math.ceil((short_docs - 1) * cfg.val_fraction)
                n_val = len(tokens) if held_out else 0
            tokens[: len(tokens) - n_val].tofile(train_f)
            tokens[len(tokens) - n_val :].tofile(val_f)
            counts["train_tokens"] += len(tokens) - n_val
            counts["val_tokens"] += n_val
            counts["documents"] += 1
            counts["bytes"] += len(doc.encode("utf-8"))
    if counts["bytes"] == 0:
        raise ConfigError(f"the corpus at data.path={cfg.path} is empty; add some text")
    # One file and a tiny val_fraction: "lower data.seq_len" came next, which cannot help. (1: lfpl-eval on a text,
    # all of it held out, as asked.)
    if counts["train_tokens"] == 0 and cfg.val_fraction < 1 and longest <= MIN_HELD_OUT_TAIL:  # no fraction can help
        raise ConfigError(f"the corpus at data.path={cfg.path} is {longest} tokens long, too short to hold out a "
                          f"validation tail of {MIN_HELD_OUT_TAIL} tokens and train on the rest; add text")
    if counts["train_tokens"] == 0 and cfg.val_fraction < 1:
        raise ConfigError(
            f"data.val_fraction={cfg.val_fraction} leaves nothing to train on: a document whose share is under "
            f"{MIN_HELD_OUT_TAIL} tokens is held out whole (one in every {1 / cfg.val_fraction:.0f}, the first "
            f"included), and the corpus is one such document; raise data.val_fraction to "
            f"{math.ceil(MIN_HELD_OUT_TAIL / longest * 1e4) / 1e4:g} or more, or add documents")
    return counts
