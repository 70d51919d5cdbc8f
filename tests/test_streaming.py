"""data=streaming: litdata chunks hold the memmap path's windows, stream in a seeded order, and resume exactly."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from llmfoundry_pl.config import ConfigError, ModelConfig, StreamingDataConfig
from llmfoundry_pl.data import StreamingDataModule, prepare_chunks, prepare_corpus, streaming
from llmfoundry_pl.data.corpus import bundled_corpus_dir
from llmfoundry_pl.lit_module import LitLlama

litdata = pytest.importorskip("litdata", reason="data=streaming needs pip install 'llmfoundry-pl[streaming]'")
pytestmark = pytest.mark.usefixtures("one_thread")

SEQ_LEN = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The opening of one play: ~900 windows of 33 tokens, in small chunks so that the shuffle spans several."""
    path = tmp_path_factory.mktemp("text") / "play.txt"
    path.write_text(sorted(bundled_corpus_dir().glob("*.txt"))[0].read_text(encoding="utf-8")[:60_000])
    return path


def data_cfg(corpus, cache, **kw) -> StreamingDataConfig:
    path = None if corpus is None else str(corpus)  # None: the chunks' own text (a URI's, say)
    return StreamingDataConfig(**{**dict(path=path, cache_dir=str(cache), vocab_size=512, seq_len=SEQ_LEN,
                                         batch_size=8, chunk_bytes="4KB"), **kw})


@pytest.fixture(scope="module")
def datamodule(corpus, tmp_path_factory):
    dm = StreamingDataModule(data_cfg(corpus, tmp_path_factory.mktemp("cache")))
    dm.prepare_data()
    return dm


def test_streaming_chunks_hold_the_memmap_windows_once_built(datamodule, monkeypatch):
    cfg = datamodule.cfg
    tokenizer, token_files = prepare_corpus(cfg)
    train = np.fromfile(token_files.train_path, dtype=token_files.dtype)
    chunks = litdata.StreamingDataset(datamodule.train_input, item_loader=litdata.TokensLoader(block_size=SEQ_LEN + 1))
    windows = np.stack([chunks[i] for i in range(len(chunks))])
    # window i = tokens [i·seq_len, (i+1)·seq_len]: every training token is a target once
    expected = np.stack([train[i * SEQ_LEN : (i + 1) * SEQ_LEN + 1] for i in range((len(train) - 1) // SEQ_LEN)])
    assert len(chunks) == datamodule.token_files.meta["windows"] > 500 and (windows == expected).all()
    assert len(list(datamodule.token_files.directory.glob("train/chunk-*.bin"))) > 3
    # validation is the memmap path's split, scored with the same tokenizer
    assert datamodule.token_files.val_path.read_bytes() == token_files.val_path.read_bytes()
    assert datamodule.tokenizer.sha256 == tokenizer.sha256
    # built once: a second run reuses the folder, and no temporary folder is left behind
    monkeypatch.setattr(streaming, "_write_chunks", lambda *a: pytest.fail("rewrote up-to-date chunks"))
    assert prepare_chunks(cfg)[2] == datamodule.train_input
    assert not list(datamodule.token_files.directory.parent.glob(".*.tmp"))
    # an epoch is a shuffle of the windows: each at most once, in another order than on disk
    epoch = torch.cat([x for x, _ in datamodule.train_batches(0, len(datamodule._epoch_loader(0, 0)))])
    assert len(epoch) > 0.95 * len(windows)
    assert len({tuple(w) for w in epoch.tolist()}) == len(epoch)
    assert not torch.equal(epoch[:8], torch.from_numpy(expected[:8, :-1].astype(np.int64)))


def test_streaming_interrupted_build_leaves_nothing_trusted(datamodule, monkeypatch):
    cfg = data_cfg(datamodule.cfg.path, datamodule.cfg.cache_dir, chunk_bytes="8KB")  # another folder, same tokens

    def crash(self, path):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(streaming.Tokenizer, "save", crash)  # after the chunks, before chunks.json
        with pytest.raises(KeyboardInterrupt):
            prepare_chunks(cfg)
    cache = datamodule.token_files.directory.parent
    assert not (cache / "chunks-seq32-8KB").exists()
    # nor the hidden folder it was written in, which stayed for good (gigabytes, for a large corpus); the empty lock
    # file of build_lock stays
    assert not [p for p in cache.glob(".chunks-seq32-8KB*") if p.suffix != ".lock"], sorted(p.name for p in
                                                                                           cache.iterdir())
    assert prepare_chunks(cfg)[1].meta["windows"] == datamodule.token_files.meta["windows"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_streaming_batches_are_a_function_of_the_batch_index(datamodule, num_workers, monkeypatch):
    """Starting at any micro-batch, within the first epoch or a later one, gives the batches an uninterrupted stream
    gives from there: what exact resume rests on."""
    monkeypatch.setattr(datamodule.cfg, "num_workers", num_workers)
    monkeypatch.setattr(datamodule.cfg, "batch_size", 128)  # 7 batches an epoch: 20 cross two epochs
    per_epoch = len(datamodule._epoch_loader(0, 0))
    whole = [x for x, _ in datamodule.train_batches(0, 20)]
    assert len(whole) == 20 and per_epoch < 10
    assert not torch.equal(whole[0], whole[per_epoch])  # each epoch has its own order
    for first in (3, per_epoch, per_epoch + 3, 2 * per_epoch + 1):
        resumed = [x for x, _ in datamodule.train_batches(first, 20 - first)]
        assert all(torch.equal(a, b) for a, b in zip(resumed, whole[first:], strict=True)), first


class RecordLosses(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, lit, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = outputs["loss"].item()


def fit(datamodule, tmp_path, max_steps: int, ckpt_path=None) -> tuple[LitLlama, dict[int, float]]:
    torch.manual_seed(0)
    model = ModelConfig(vocab_size=512, dim=32, n_layers=1, n_heads=2, max_seq_len=SEQ_LEN)
    lit = LitLlama(model)
    lit.set_tokenizer(datamodule.tokenizer)
    record = RecordLosses()
    every_step = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    trainer = L.Trainer(max_steps=max_steps, limit_val_batches=0, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[record, every_step], use_distributed_sampler=False)
    trainer.fit(lit, datamodule=datamodule, ckpt_path=ckpt_path)
    return lit, record.losses


def test_streaming_resume_continues_exactly(datamodule, tmp_path, monkeypatch):
    """A run resumed from a checkpoint inside its second epoch ends with the weights of the uninterrupted run, having
    seen the same batches (the same losses, step for step)."""
    monkeypatch.setattr(datamodule.cfg, "batch_size", 256)
    per_epoch = len(datamodule._epoch_loader(0, 0))
    steps, stop = 2 * per_epoch + 1, per_epoch + 1  # 3 batches an epoch: 7 steps, stopped after the 4th
    full, full_losses = fit(datamodule, tmp_path / "full", steps)
    resumed, resumed_losses = fit(datamodule, tmp_path / "resumed", steps,
                                  ckpt_path=tmp_path / "full" / f"step={stop}.ckpt")
    assert sorted(resumed_losses) == list(range(stop + 1, steps + 1))
    assert resumed_losses == {step: full_losses[step] for step in resumed_losses}
    for name, weight in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], weight, rtol=0, atol=0, msg=name)


def test_streaming_reads_a_chunk_folder_through_a_uri_as_from_disk(datamodule, tmp_path):
    """A URI (here litdata's local: scheme, which goes through the download cache as s3:// would) gives the same
    tokenizer, validation split and batches as the folder it points at."""
    folder = datamodule.token_files.directory
    remote = StreamingDataModule(data_cfg(None, tmp_path / "cache", chunks_dir=f"local:{folder}"))
    remote.prepare_data()
    assert remote.tokenizer.sha256 == datamodule.tokenizer.sha256
    assert remote.token_files.val_path.read_bytes() == datamodule.token_files.val_path.read_bytes()
    for (a, _), (b, _) in zip(remote.train_batches(0, 3), datamodule.train_batches(0, 3), strict=True):
        assert torch.equal(a, b)


def test_streaming_mistakes_fail_with_one_line(datamodule, corpus, tmp_path, monkeypatch):
    folder = datamodule.token_files.directory
    cases = [
        (data_cfg(corpus, tmp_path, chunks_dir=str(folder), seq_len=64), "hold windows for seq_len=32, not "
                                                                          "data.seq_len=64; set data.seq_len=32"),
        (data_cfg(corpus, tmp_path, chunks_dir=str(folder), vocab_size=600), "set data.vocab_size=512"),
        (data_cfg(corpus, tmp_path, chunks_dir=f"local:{tmp_path}/nothing"), "cannot read local:.*/chunks.json"),
        (data_cfg(corpus, tmp_path, chunks_dir=str(folder.parent)), "a folder without chunks written by"),
        # the chunks' own text and split: other ones were ignored, while the run's config recorded them
        (data_cfg(tmp_path / "other.txt", tmp_path, chunks_dir=str(folder)), "were made from other text than data"),
        (data_cfg(corpus, tmp_path, chunks_dir=str(folder), val_fraction=0.2), "set data.val_fraction=0.05"),
    ]
    # chunk folders that are not what llmfoundry-pl writes: tracebacks, or errors naming the wrong cause
    names = ("cut", "list", "no_tokenizer", "no_val", "no_index", "chunk_cut")
    broken = {name: Path(shutil.copytree(folder, tmp_path / name)) for name in names}
    (broken["cut"] / "chunks.json").write_text((folder / "chunks.json").read_text()[:20])
    (broken["list"] / "chunks.json").write_text("[1]")
    (broken["no_tokenizer"] / "tokenizer.model").unlink()
    # copies and uploads cut short: tracebacks at the first read, or hours into training at the first missing chunk
    (broken["no_val"] / "val.bin").unlink()
    (broken["no_index"] / "train" / "index.json").unlink()
    last_chunk = sorted((broken["chunk_cut"] / "train").glob("chunk-*.bin"))[-1]
    last_chunk.write_bytes(last_chunk.read_bytes()[:100])
    cases += [
        (data_cfg(corpus, tmp_path, chunks_dir=str(folder / "chunks.json")), "is a file, not a folder"),
        (data_cfg(corpus, tmp_path, chunks_dir=str(broken["cut"])), "chunks.json is not a chunk index .*cut short"),
        (data_cfg(corpus, tmp_path, chunks_dir=str(broken["list"])), "chunks.json is not a chunk index"),
        (data_cfg(corpus, tmp_path, chunks_dir=str(broken["no_tokenizer"])), "have no tokenizer.model beside"),
        (data_cfg(corpus, tmp_path, chunks_dir=str(broken["no_val"])), "lack val.bin .*copy the whole chunk folder"),
        (data_cfg(corpus, tmp_path, chunks_dir=str(broken["no_index"])), "train/index.json is missing or is not"),
        (data_cfg(corpus, tmp_path, chunks_dir=str(broken["chunk_cut"])), f"lack train/{last_chunk.name} "),
        (data_cfg(None, tmp_path, chunks_dir=f"local:{broken['no_val']}"), "cannot read local:.*/val.bin .* chunks"
                                                                          ".json last"),
        (data_cfg(None, tmp_path, chunks_dir=f"local:{broken['no_index']}"), "cannot read local:.*/train/index.json"),
    ]
    try:
        import google.cloud.storage  # noqa: F401
    except ImportError:  # litdata's own message named the module to install "google.cloud.storage", after a traceback
        cases.append((data_cfg(None, tmp_path, chunks_dir="gs://bucket/chunks"),
                      "data.chunks_dir=gs://bucket/chunks needs google-cloud-storage: pip install google-cloud"))
    (tmp_path / "other.txt").write_text("Other text.\n")
    for cfg, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            prepare_chunks(cfg)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="data.chunks_dir=http://x is neither a local folder nor a URI"):
        data_cfg(corpus, tmp_path, chunks_dir="http://x")
    for size in ("64", "banana", "0MB"):  # litdata's own parse would fail only when the chunks are written
        with pytest.raises(ConfigError, match=f"data.chunk_bytes={size} is not a size: .* e.g. 64MB"):
            data_cfg(corpus, tmp_path, chunk_bytes=size)
    assert data_cfg(corpus, tmp_path, chunk_bytes="1.5 kb").chunk_bytes == "1.5 kb"
    monkeypatch.chdir(corpus.parent)  # the same text, given relative to another folder, is the chunks' own
    prepare_chunks(data_cfg(corpus.name, tmp_path, chunks_dir=str(folder)))
    monkeypatch.setitem(sys.modules, "litdata", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"data=streaming needs litdata: pip install 'llmfoundry-pl\[streaming\]'") \
            as error:
        prepare_chunks(data_cfg(corpus, tmp_path))
    # on a CPU-only torch, the extra's torchvision from PyPI (a CUDA build) would have replaced it: the CPU one first
    assert str(error.value).endswith("after the CPU build of torchvision, which it requires: pip install "
                                     "torchvision --index-url https://download.pytorch.org/whl/cpu")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(ConfigError, match=r"pip install 'llmfoundry-pl\[streaming\]'$"):
        prepare_chunks(data_cfg(corpus, tmp_path))


def test_given_chunks_of_a_folder_that_changed_since_are_refused(corpus, tmp_path):
    # Only the first files were compared: a file added since (sorted last) or an edited one passed, and the run
    # trained on the old chunks while its config recorded data.path.
    folder = tmp_path / "text"
    folder.mkdir()
    shutil.copy(corpus, folder / "a.txt")
    chunks = tmp_path / "chunks"
    prepare_chunks(data_cfg(folder, tmp_path / "cache", chunks_dir=str(chunks)))
    prepare_chunks(data_cfg(folder, tmp_path / "cache", chunks_dir=str(chunks)))  # unchanged: taken
    (folder / "b.txt").write_text("A new scene.\n")
    with pytest.raises(ConfigError, match="were made from other text than data.path=.* files added, removed or edited"):
        prepare_chunks(data_cfg(folder, tmp_path / "cache", chunks_dir=str(chunks)))
    (folder / "b.txt").unlink()
    with open(folder / "a.txt", "a") as f:
        f.write("Exeunt.\n")
    with pytest.raises(ConfigError, match="were made from other text than data.path"):
        prepare_chunks(data_cfg(folder, tmp_path / "cache", chunks_dir=str(chunks)))
    prepare_chunks(data_cfg(None, tmp_path / "cache", chunks_dir=str(chunks)))  # data.path unset: the chunks' text


def test_given_chunks_of_another_json_lines_field_are_refused(corpus, tmp_path):
    lines = corpus.read_text(encoding="utf-8").splitlines()
    records = [{"text": "\n".join(lines[i : i + 20]), "title": f"scene {i}"} for i in range(0, len(lines), 20)]
    jsonl = tmp_path / "play.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    chunks = tmp_path / "chunks"
    prepare_chunks(data_cfg(jsonl, tmp_path / "cache", chunks_dir=str(chunks)))
    # The field was not compared: a run of text_field=title trained on the text field's chunks
    with pytest.raises(ConfigError, match="hold the 'text' field of data.path's JSON Lines, not data.text_field="
                                          "title; set data.text_field=text"):
        prepare_chunks(data_cfg(jsonl, tmp_path / "cache", chunks_dir=str(chunks), text_field="title"))


def test_a_given_chunks_dir_without_chunks_says_it_builds_the_bundled_plays(tmp_path, caplog, monkeypatch):
    # Documented (build them in a folder), but a mistyped data.chunks_dir trained on Shakespeare without a word
    def stop_before_building(cfg, tokenizer):  # (the message is what is checked, not the build)
        raise RuntimeError("stopped")

    monkeypatch.setattr(streaming, "prepare_corpus", stop_before_building)
    with pytest.raises(RuntimeError, match="stopped"):
        prepare_chunks(data_cfg(None, tmp_path / "cache", chunks_dir=str(tmp_path / "chunk")))
    assert f"data.chunks_dir={tmp_path / 'chunk'} holds no chunks: building them there from the bundled" in caplog.text


def test_streaming_is_what_lfpl_train_builds_for_data_streaming(compose_train, datamodule):
    from llmfoundry_pl.cli.common import prepare_data_and_model

    cfg = datamodule.cfg
    overrides = ["data=streaming", *(f"data.{k}={getattr(cfg, k)}" for k in ("path", "cache_dir", "vocab_size",
                                                                          "seq_len", "chunk_bytes"))]
    built, model_cfg, _ = prepare_data_and_model(compose_train(overrides))  # the chunks above: nothing rebuilt
    assert isinstance(built, StreamingDataModule) and built.train_input == datamodule.train_input
    assert model_cfg.vocab_size == 512


def test_eval_refuses_the_split_of_a_streamed_run_it_cannot_read(compose_train):
    from llmfoundry_pl.cli.eval import evaluation_data
    from llmfoundry_pl.interop import ModelSource

    cfg = compose_train(["ckpt_path=some/run.ckpt"], name="eval")
    source = ModelSource("some/run.ckpt", "ckpt", run_config={"data": {"seq_len": 32, "chunks_dir": "s3://b/c"}})
    model_cfg = ModelConfig(vocab_size=512, dim=32, n_layers=1, n_heads=2, max_seq_len=32)
    with pytest.raises(ConfigError, match="trained on the chunks at data.chunks_dir=s3://b/c, .* give the text"):
        evaluation_data(cfg, source, model_cfg, tokenizer=None)
