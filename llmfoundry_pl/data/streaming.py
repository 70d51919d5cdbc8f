"""``data=streaming``: the training windows of ``data=text``, written once as litdata chunks and streamed.

The text is tokenized exactly as for ``data=text`` (same cache, tokenizer and split); the training split is then cut
into windows of seq_len+1 tokens, window ``i`` = tokens ``[i·seq_len, (i+1)·seq_len]`` (consecutive windows share one
token, so every token is a target once per epoch), and written in litdata's ``TokensLoader`` chunks.
A chunk folder holds everything a training machine needs, so it may live in an object store::

    chunks-seq<seq_len>-<chunk_bytes>/       by default next to the token files in data.cache_dir
        train/index.json  train/chunk-*.bin   the windows (litdata's format)
        val.bin                               the validation split of data=text, scored by the same sweep
        tokenizer.model                       the tokenizer that made the tokens
        chunks.json                           written last: the token files' meta plus seq_len and the window count

Folders are built under a temporary name and renamed into place, so an interrupted build leaves nothing that a later
run would trust. From a URI, the small files are copied into data.cache_dir and the chunks stream through litdata's
download cache there.

Training order: litdata shuffles the chunks, then the windows inside them, from (data.seed, epoch); an epoch is one
pass over the windows. Micro-batch ``m`` is found by counting whole epochs, then skipping into the epoch with
litdata's own resume state, so — as on the memmap path — the order is a pure function of (seed, micro-batch index):
resuming at optimizer step ``s`` restarts at micro-batch ``s · accumulate_grad_batches``, with no loader state saved.
(Lightning would checkpoint the ``StreamingDataLoader``'s state itself, but with litdata 0.2.76 and Lightning 2.6 a
run resumed that way repeats the resumed epoch's order in the next epoch, or fails with worker processes.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from llmfoundry_pl.config import CHUNK_URI_PREFIXES, ConfigError, StreamingDataConfig, one_line
from llmfoundry_pl.data.corpus import TokenFiles, prepare_corpus, resolve_sources
from llmfoundry_pl.data.datamodule import TextDataModule
from llmfoundry_pl.files import atomic_write_bytes, cached_or_built, publish_folder, temporary_folder
from llmfoundry_pl.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_PROGRESS_FROM = 100_000  # windows: smaller corpora are written without a progress bar
# The client libraries litdata reads these stores with; they are not among its dependencies (boto3, for s3://, is).
_STORE_CLIENTS = {"gs": "google-cloud-storage", "azure": "azure-storage-blob"}


def _litdata():
    try:
        import litdata
    except ImportError:
        # litdata requires torchvision, whose PyPI wheels are CUDA builds: following the plain advice on a CPU-only
        # torch replaced it with a multi-GB CUDA one
        first = "" if torch.version.cuda else (" after the CPU build of torchvision, which it requires: pip install "
                                               "torchvision --index-url https://download.pytorch.org/whl/cpu")
        raise ConfigError(f"data=streaming needs litdata: pip install 'llmfoundry-pl[streaming]'{first}") from None
    return litdata


def prepare_chunks(cfg: StreamingDataConfig, tokenizer: Tokenizer | None = None) -> tuple[Tokenizer, TokenFiles, str]:
    """The tokenizer, the validation tokens and where the training chunks are (a folder or a URI) for ``cfg``:
    written on first use from ``data.path``, or taken from ``data.chunks_dir``.

    ``tokenizer`` forces a given tokenizer (e.g. the one saved in a checkpoint), as for ``prepare_corpus``."""
    _litdata()  # before any tokenizing: a missing install is the first thing to say
    chunks_dir = cfg.chunks_dir.rstrip("/") if cfg.chunks_dir is not None else None
    if chunks_dir is not None and chunks_dir.startswith(CHUNK_URI_PREFIXES):
        folder, train = _mirror(chunks_dir, Path(cfg.cache_dir).expanduser()), f"{chunks_dir}/train"
    else:
        folder = Path(chunks_dir).expanduser() if chunks_dir is not None else None
        if folder is not None and folder.exists() and not folder.is_dir():
            raise ConfigError(f"data.chunks_dir={cfg.chunks_dir} is a file, not a folder; give the folder that holds "
                              "chunks.json (or a new one to build chunks in)")
        if folder is None or _read_meta(folder) is None:
            if folder is not None and folder.exists() and any(folder.iterdir()):
                raise ConfigError(f"data.chunks_dir={cfg.chunks_dir} is a folder without chunks written by "
                                  "llmfoundry-pl (no chunks.json); point it at a new or empty folder to build them")
            if folder is not None and cfg.path is None:  # documented (docs/concepts.md), but also what a typo does
                log.warning(f"data.chunks_dir={cfg.chunks_dir} holds no chunks: building them there from the bundled "
                            "plays (data.path is unset); if you meant chunks built before, check the folder's name")
            corpus_tokenizer, token_files = prepare_corpus(cfg, tokenizer)
            folder = folder or token_files.directory / f"chunks-seq{cfg.seq_len}-{cfg.chunk_bytes}"
            cached_or_built(folder, lambda: _read_meta(folder),  # (its meta is read below, as every folder's)
                            lambda: _write_chunks(token_files, corpus_tokenizer, cfg, folder))
        train = str(folder / "train")
    meta = _read_meta(folder)
    if not (folder / "tokenizer.model").is_file():  # the tokenizer's own error named data.tokenizer_path
        raise ConfigError(f"the chunks at {folder} have no tokenizer.model beside their chunks.json, so they were not "
                          "written whole by llmfoundry-pl; give a new or empty data.chunks_dir to build them again")
    if cfg.chunks_dir is not None and not train.startswith(CHUNK_URI_PREFIXES):  # a mirror's: as it is downloaded
        _check_whole(folder, cfg.chunks_dir)
    chunks_tokenizer = Tokenizer.from_file(folder / "tokenizer.model", key=None)
    _check_chunks(cfg, meta, chunks_tokenizer, tokenizer)
    return chunks_tokenizer, TokenFiles(folder, meta), train


def _read_meta(folder: Path) -> dict | None:
    """The chunk folder's index, None where it has none (chunks to build); one line if it is not what we write."""
    try:
        meta = json.loads((folder / "chunks.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # JSON cut short, not UTF-8, unreadable
        meta = None
    if not isinstance(meta, dict):  # a traceback, or "no chunks.json" though there was one
        raise ConfigError(f"{folder / 'chunks.json'} is not a chunk index llmfoundry-pl wrote (cut short or edited); "
                          "give a new or empty data.chunks_dir to build the chunks again")
    return meta


def _chunk_files(index_path: Path, where: str) -> list[dict]:
    """The chunks that litdata's ``index.json`` at ``index_path`` (read from ``where``) lists ({"filename",
    "chunk_bytes", ...} each)."""
    try:
        chunks = json.loads(index_path.read_text())["chunks"]
        if not all(isinstance(c["filename"], str) and isinstance(c["chunk_bytes"], int) for c in chunks):
            raise TypeError
        return chunks
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{where} is missing or is not litdata's index of the chunks: a copy or upload cut short; "
                          "copy the whole chunk folder again, chunks.json last") from None


def _check_whole(folder: Path, chunks_dir: str | None) -> None:
    """A given chunk folder holds every file its chunks.json stands for: a copy cut short (``cp -r`` stopped, a
    sync that failed half-way) failed later with a traceback, or hours into training at the first missing chunk."""
    missing = [] if (folder / "val.bin").is_file() else ["val.bin"]
    for chunk in _chunk_files(folder / "train" / "index.json", f"{chunks_dir}/train/index.json"):
        path = folder / "train" / chunk["filename"]
        if not path.is_file() or path.stat().st_size < chunk["chunk_bytes"]:
            missing.append(f"train/{chunk['filename']}")
    if missing:
        raise ConfigError(f"the chunks at data.chunks_dir={chunks_dir} lack {', '.join(missing[:3])}"
                          f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''} (missing or cut short): a "
                          "copy cut short; copy the whole chunk folder again")


def _check_chunks(cfg: StreamingDataConfig, meta: dict, chunks_tokenizer: Tokenizer, given: Tokenizer | None) -> None:
    """The chunks must hold windows of data.seq_len tokens made by the tokenizer this run uses (checks that only a
    given data.chunks_dir can fail: the folder built in the cache is named after both)."""
    where = cfg.chunks_dir
    # Given chunks hold their text and split: a data.path or data.val_fraction of other ones was ignored, while the
    # run's config recorded them. (data.path=null, the default, takes the chunks as they are: built elsewhere. The
    # chunks built in the cache are named after the text already.) Sources recorded before they were absolute
    # paths cannot be compared from another folder: those chunks are taken as they are.
    # The whole file list and the files' total size: the first files alone passed a file added since (sorted
    # last) and an edited one, and the run trained on the old text while its config recorded data.path.
    sources = meta.get("sources", [])
    built = [Path(s) for s in sources if not s.startswith("... ")]
    if cfg.chunks_dir is not None and cfg.path is not None and built and all(p.is_absolute() for p in built):
        try:
            files = [f.resolve() for f in resolve_sources(cfg.path)]
        except ConfigError:  # data.path is not on this machine
            files = []
        listed = files[: len(built)] if len(built) < len(sources) else files  # over 100 files: the first 100 listed
        size = sum(f.stat().st_size for f in files)
        same = listed == built and meta.get("source_bytes", size) == size  # chunks from before sizes: the list
        # (A same-size edit passes: comparing the content means reading the corpus, and the files' times differ on
        # every machine the text was copied to.)
        if not same:
            raise ConfigError(f"the chunks at data.chunks_dir={where} were made from other text than data.path="
                              f"{cfg.path} now holds ({built[0]}{' ...' if len(built) > 1 else ''}; files added, "
                              "removed or edited since); drop data.path (the chunks hold their text), or give a new "
                              "data.chunks_dir folder to build chunks of this text")
        field = meta.get("text_field", cfg.text_field)  # recorded for JSON Lines since it is compared
        if field != cfg.text_field:
            raise ConfigError(f"the chunks at data.chunks_dir={where} hold the '{field}' field of data.path's JSON "
                              f"Lines, not data.text_field={cfg.text_field}; set data.text_field={field}, or give a "
                              "new data.chunks_dir folder to build chunks of that field")
    if meta.get("val_fraction", cfg.val_fraction) != cfg.val_fraction:
        raise ConfigError(f"the chunks at data.chunks_dir={where} hold out val_fraction={meta['val_fraction']}, not "
                          f"data.val_fraction={cfg.val_fraction}; set data.val_fraction={meta['val_fraction']}, or "
                          "give a new data.chunks_dir folder")
    if meta["seq_len"] != cfg.seq_len:
        raise ConfigError(f"the chunks at data.chunks_dir={where} hold windows for seq_len={meta['seq_len']}, not "
                          f"data.seq_len={cfg.seq_len}; set data.seq_len={meta['seq_len']}, or give a new "
                          "data.chunks_dir folder to build chunks for this seq_len")
    if given is not None:
        if given.sha256 != chunks_tokenizer.sha256:
            raise ConfigError(f"the chunks at data.chunks_dir={where} were made with another tokenizer than the "
                              "model's; build chunks for this model in a new data.chunks_dir folder")
    elif cfg.tokenizer_path is not None and Tokenizer.from_file(cfg.tokenizer_path).sha256 != chunks_tokenizer.sha256:
        raise ConfigError(f"data.tokenizer_path={cfg.tokenizer_path} is not the tokenizer the chunks at "
                          f"data.chunks_dir={where} were made with; drop data.tokenizer_path (the chunks carry theirs)")
    elif chunks_tokenizer.vocab_size != cfg.vocab_size:
        raise ConfigError(f"the chunks at data.chunks_dir={where} use a tokenizer of {chunks_tokenizer.vocab_size} "
                          f"tokens but data.vocab_size={cfg.vocab_size}; set data.vocab_size="
                          f"{chunks_tokenizer.vocab_size}")


def _write_chunks(token_files: TokenFiles, tokenizer: Tokenizer, cfg: StreamingDataConfig, folder: Path) -> None:
    """Write the chunk folder for ``token_files`` into a temporary folder, then rename it into place.

    The windows go through litdata's chunk writer (``Cache``) in this process rather than ``litdata.optimize``: that
    runs its work in child processes (5-10 s of start-up on a small CPU) and sets the process-wide multiprocessing
    start method to spawn, after which every DataLoader worker of the run re-imports torch. Copying windows needs
    neither, and one writer gives the same chunk layout (so the same training order) wherever the folder is built."""
    litdata = _litdata()
    n_windows = (token_files.meta["train_tokens"] - 1) // cfg.seq_len
    if n_windows < 1:
        raise ConfigError(f"the training split has {token_files.meta['train_tokens']} tokens, fewer than "
                          f"data.seq_len+1={cfg.seq_len + 1}; lower data.seq_len or use more text")
    tokens = np.memmap(token_files.train_path, dtype=token_files.dtype, mode="r")
    with temporary_folder(folder) as tmp:
        writer = litdata.streaming.Cache(str(tmp / "train"), chunk_bytes=cfg.chunk_bytes,
                                         item_loader=litdata.TokensLoader())
        for i in tqdm(range(n_windows), desc="writing chunks", unit="window", disable=n_windows < _PROGRESS_FROM):
            writer[i] = np.array(tokens[i * cfg.seq_len : (i + 1) * cfg.seq_len + 1])
        writer.done()
        litdata.complete_dataset(str(tmp / "train"))  # the writer's index shard → index.json
        shutil.copyfile(token_files.val_path, tmp / "val.bin")
        tokenizer.save(tmp / "tokenizer.model")
        meta = {**token_files.meta, "seq_len": cfg.seq_len, "windows": n_windows, "chunk_bytes": cfg.chunk_bytes}
        atomic_write_bytes(tmp / "chunks.json", json.dumps(meta, indent=2).encode())
        publish_folder(tmp, folder, lambda published: _read_meta(published) == meta)


def _mirror(uri: str, cache_dir: Path) -> Path:
    """A local copy of the small files of the chunk folder at ``uri`` (meta, tokenizer, validation tokens), refreshed
    when the remote chunks.json changes; litdata caches the chunks it streams under its ``train/``."""
    from litdata.streaming.downloader import get_downloader

    local = cache_dir / f"streaming-{hashlib.sha256(uri.encode()).hexdigest()[:16]}"
    with temporary_folder(local) as tmp:
        try:
            downloader = get_downloader(uri, str(tmp), [])
        except ModuleNotFoundError:  # litdata's hint names a module, not what to pip install
            package = _STORE_CLIENTS.get(uri.split("://")[0], "the store's client library")
            raise ConfigError(f"data.chunks_dir={uri} needs {package}: pip install {package}") from None
        try:
            downloader.download_file(f"{uri}/chunks.json", str(tmp / "chunks.json"))
        except Exception as e:  # missing file, no credentials, no network: each library says it its own way
            reason = one_line(e)
            raise ConfigError(f"cannot read {uri}/chunks.json ({type(e).__name__}: {reason}); check data.chunks_dir "
                              "and its credentials, or, if nothing is there yet, build the chunks with lfpl-train "
                              "data=streaming data.chunks_dir=LOCAL_FOLDER and upload LOCAL_FOLDER there") from None
        if _read_meta(local) == _read_meta(tmp):  # the mirror is current (the temporary folder goes)
            return local
        # chunks.json is uploaded last (docs/concepts.md), so that its presence means the rest is there; the chunks
        # themselves are checked as far as a download can: that the index which lists them is there.
        for name in ("tokenizer.model", "val.bin", "train/index.json"):
            try:
                downloader.download_file(f"{uri}/{name}", str(tmp / name.replace("/", "-")))
            except Exception as e:
                reason = one_line(e)
                raise ConfigError(f"cannot read {uri}/{name} ({type(e).__name__}: {reason}), though its chunks.json "
                                  "is there: an upload cut short, or chunks.json sent first; upload the whole chunk "
                                  "folder again, chunks.json last") from None
        _chunk_files(tmp / "train-index.json", f"{uri}/train/index.json")
        (tmp / "train-index.json").unlink()  # litdata keeps its own copy, in its download cache under train/
        # from an older upload (its files and the chunks cached from it) a mirror differs in chunks.json: replaced
        remote_meta = _read_meta(tmp)
        publish_folder(tmp, local, lambda published: _read_meta(published) == remote_meta)
    return local


def _inputs_and_targets(windows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate windows of seq_len+1 tokens into (input, target) batches, as the memmap path yields them."""
    batch = torch.from_numpy(np.stack(windows).astype(np.int64))
    return batch[:, :-1], batch[:, 1:]


class StreamedBatches:
    """Micro-batches ``first_batch .. first_batch + num_batches - 1`` of a stream of epochs, ``epoch_loader(e, skip)``
    giving epoch ``e``'s loader past its first ``skip`` batches. Its length counts from the run's first micro-batch,
    as :class:`~llmfoundry_pl.data.datamodule.StepBatchSampler`'s does (why: see there)."""

    def __init__(self, epoch_loader: Callable, first_batch: int, num_batches: int) -> None:
        self.epoch_loader, self.first_batch, self.num_batches = epoch_loader, first_batch, num_batches

    def __len__(self) -> int:
        return self.first_batch + self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, skip = 0, self.first_batch
        while skip >= (per_epoch := len(self.epoch_loader(epoch, 0))):
            epoch, skip = epoch + 1, skip - per_epoch
        left = self.num_batches
        while left > 0:
            for batch in self.epoch_loader(epoch, skip):
                yield batch
                left -= 1
                if left == 0:
                    return
            epoch, skip = epoch + 1, 0


class StreamingDataModule(TextDataModule):
    """``TextDataModule`` whose training windows stream from litdata chunks; validation is the same memmap sweep.

    Validation stays on val.bin: it scores every held-out token once, in order, so val/loss and val/bpb are the very
    numbers ``data=text`` and ``lfpl-eval`` report. The split is data.val_fraction of the corpus, copied to each
    training machine: lower data.val_fraction for a corpus too large for one disk."""

    def __init__(self, cfg: StreamingDataConfig, tokenizer: Tokenizer | None = None) -> None:
        super().__init__(cfg, tokenizer)
        self.train_input: str | None = None

    def prepare_data(self) -> None:
        """Build (or fetch) the chunk folder if it is not there yet; in every process, as ``TextDataModule``'s."""
        self.tokenizer, self.token_files, self.train_input = prepare_chunks(self.cfg, self._given_tokenizer)

    def state_dict(self) -> dict[str, Any]:
        # litdata deals the chunks out to the ranks and their workers, so how the step's samples are split matters too
        return {**super().state_dict(), "data.batch_size": self.cfg.batch_size,
                "data.num_workers": self.cfg.num_workers,
                "processes (trainer.devices × trainer.num_nodes)": self.trainer.world_size}

    def train_batches(self, first_batch: int, num_batches: int, rank: int = 0, world_size: int = 1) -> StreamedBatches:
        """Micro-batches ``first_batch .. first_batch + num_batches - 1`` of training windows for this process.
        litdata finds the rank and world size in ``torch.distributed`` itself; ``rank`` and ``world_size`` are
        accepted so that callers of ``TextDataModule.train_batches`` work unchanged."""
        if len(self._epoch_loader(0, 0)) == 0:
            raise ConfigError(f"the training split has {self.token_files.meta['windows']} windows, fewer than one "
                              f"batch of data.batch_size={self.cfg.batch_size} per device and worker; lower "
                              "data.batch_size or data.seq_len, or use more text")
        return StreamedBatches(self._epoch_loader, first_batch, num_batches)

    def _epoch_loader(self, epoch: int, skip_batches: int):
        """Epoch ``epoch`` (from 0) of the shuffled windows, as whole batches, past its first ``skip_batches``."""
        litdata = _litdata()
        remote = self.train_input.startswith(CHUNK_URI_PREFIXES)
        dataset = litdata.StreamingDataset(
            self.train_input, item_loader=litdata.TokensLoader(block_size=self.cfg.seq_len + 1), shuffle=True,
            seed=self.cfg.seed, drop_last=True, cache_dir=str(self.token_files.directory / "train") if remote else None,
        )
        on_cuda = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        loader = litdata.StreamingDataLoader(
            dataset, batch_size=self.cfg.batch_size, num_workers=self.cfg.num_workers, drop_last=True,
            collate_fn=_inputs_and_targets, pin_memory=on_cuda,
        )
        # litdata numbers epochs from 1, and its loader counts one up as an iteration starts.
        dataset.set_epoch(epoch + 1)
        loader.current_epoch = epoch
        if skip_batches:
            # litdata's own resume state (what Lightning would checkpoint), written from the batch count.
            samples, workers = skip_batches * self.cfg.batch_size, self.cfg.num_workers
            loader.load_state_dict({
                "dataset": dataset.state_dict(samples, workers, self.cfg.batch_size),
                "current_epoch": epoch + 1,
                "num_samples_yielded": samples,
                "latest_worker_idx": (skip_batches - 1) % max(workers, 1),  # workers hand out batches in turn
            })
        return loader
