"""``TextDataModule``: token files → batches of (input, target) windows for Lightning.

Training windows are drawn at random positions, but "random" is a pure function of (seed, sample index):
micro-batch ``b`` on rank ``r`` of ``W`` holds sample indices ``(b·W + r)·B ... (b·W + r)·B + B-1``. Nothing
depends on an iterator's history, so

- resuming at optimizer step ``s`` restarts at micro-batch ``s · accumulate_grad_batches`` and sees exactly the
  windows the uninterrupted run would have seen (no RNG state to save), and
- DDP ranks see disjoint windows without a ``DistributedSampler`` (hence ``trainer.use_distributed_sampler=false``).

Validation is a fixed sweep of windows (back to back, or overlapping with ``val_stride``) scoring every held-out
token once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from llmfoundry_pl.config import ConfigError, DataConfig
from llmfoundry_pl.data.corpus import TokenFiles, prepare_corpus
from llmfoundry_pl.tokenizer import Tokenizer

IGNORE_INDEX = -100  # targets with this value are left out of the loss (F.cross_entropy's default ignore_index)


class _TokenFile:
    """A token file opened lazily, so a Dataset pickled into DataLoader workers (spawn on macOS) carries only
    a path, and each process maps the file itself instead of copying it."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path, self.dtype = path, dtype
        self.length = path.stat().st_size // dtype.itemsize
        self._tokens: np.ndarray | None = None

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        return self._tokens

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}


class RandomWindows(Dataset):
    """Sample ``k`` is the window of seq_len+1 tokens starting at a position drawn from a generator seeded by
    (seed, k): any sample can be recomputed from its index alone."""

    def __init__(self, tokens: _TokenFile, seq_len: int, seed: int) -> None:
        if tokens.length < seq_len + 2:
            raise ConfigError(
                f"the training split has {tokens.length} tokens, fewer than data.seq_len+2={seq_len + 2}; "
                "lower data.seq_len or use more text"
            )
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed

    def __len__(self) -> int:  # the index space is unbounded; the sampler decides which indices are used
        return np.iinfo(np.int64).max

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(np.random.default_rng((self.seed, k)).integers(0, self.tokens.length - self.seq_len - 1))
        window = torch.from_numpy(self.tokens.tokens[start : start + self.seq_len + 1].astype(np.int64))
        return window[:-1], window[1:]


class StepBatchSampler(Sampler[list[int]]):
    """Yields the sample indices of micro-batches ``first_batch ... first_batch + num_batches - 1`` for one rank.

    Its length counts from the run's first micro-batch, though it yields from ``first_batch``: resuming, Lightning
    restores how many micro-batches of the epoch are done (``first_batch``) and ends the epoch at the length. Counted
    from ``first_batch``, the resumed epoch ended that many batches early, and Lightning's next epoch replayed the
    loader from the resume point (resumed at step 4 of 16: other windows than the uninterrupted run's from step 12)."""

    def __init__(self, first_batch: int, num_batches: int, batch_size: int, rank: int, world_size: int) -> None:
        self.first_batch, self.num_batches = first_batch, num_batches
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __len__(self) -> int:
        return self.first_batch + self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.first_batch, self.first_batch + self.num_batches):
            first = (b * self.world_size + self.rank) * self.batch_size
            yield list(range(first, first + self.batch_size))


def remaining_micro_batches(trainer: L.Trainer | None, why: str) -> tuple[int, int]:
    """The micro-batches this fit still draws, as ``(first, count)``: from the restored optimizer step (resuming
    restarts where the interrupted run was) to ``trainer.max_steps``, ``accumulate_grad_batches`` per step. ``why``
    ends the error when ``max_steps`` is not a positive number of steps (Lightning's -1 means "until the data
    ends", and these streams never end)."""
    if trainer is None or trainer.max_steps is None or trainer.max_steps <= 0:
        given = "" if trainer is None else f"={trainer.max_steps}"
        raise ConfigError(f"trainer.max_steps{given} must be a positive number of optimizer steps: {why}")
    accumulate = trainer.accumulate_grad_batches
    check_accumulate(accumulate)
    first = trainer.global_step * accumulate  # on resume, global_step is restored before the loader is asked for
    return first, max(trainer.max_steps * accumulate - first, 0)


class StepDataModule(L.LightningDataModule):
    """Base of the data modules, whose place in the data is counted, not stored: optimizer step ``s`` trains on samples
    ``s·N ... s·N + N-1`` (``N`` = data.batch_size × trainer.accumulate_grad_batches × processes, however they are
    split among the micro-batches and ranks), drawn with ``data.seed``. The checkpoint records those settings
    (Lightning saves a data module's ``state_dict``), and a resume under others is refused: it went on silently on
    other samples than the interrupted run's next ones (half the batch at step 10: steps 5 to 9's samples again),
    with ``train/tokens`` counted wrong. A resume on half the devices with twice the micro-batch is the same run.
    ``trainer.accumulate_grad_batches`` itself must stay: Lightning restores its place in the epoch as micro-batches
    counted under the old setting, and decides from it where steps end (resumed at step 3 with 2 micro-batches of 2
    where there had been 1 of 4, its first step took half a batch, and every later one straddled two).
    Also builds their DataLoaders, one way for all (memory pinned on CUDA: the chat data's loader had left it out)."""

    cfg: Any  # the data config: batch_size, seq_len, seed, num_workers
    # Whether every step holds the same tokens (pretraining's windows of data.seq_len), which the training step then
    # counts from one batch's shape as train/tokens; chat examples are padded to each batch's longest
    same_tokens_every_step = True

    def state_dict(self) -> dict[str, Any]:
        samples = self.cfg.batch_size * self.trainer.accumulate_grad_batches * self.trainer.world_size
        return {"data.seq_len": self.cfg.seq_len, "data.seed": self.cfg.seed,
                "samples per step (data.batch_size × trainer.accumulate_grad_batches × processes)": samples,
                "trainer.accumulate_grad_batches": self.trainer.accumulate_grad_batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        now = self.state_dict()
        changed = [f"{key}: {value} → {now[key]}" for key, value in state_dict.items() if now.get(key, value) != value]
        if changed:
            raise ConfigError(f"the checkpoint's place in the data counts samples under other settings "
                              f"({'; '.join(changed)}): resumed, it would train on other samples than the run's next "
                              "ones; resume with its settings, or start a new run from its weights with init_from=")

    def _loader(self, dataset: Dataset, **kwargs) -> DataLoader:
        on_cuda = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return DataLoader(
            dataset,
            num_workers=self.cfg.num_workers,
            pin_memory=on_cuda,
            persistent_workers=self.cfg.num_workers > 0,
            **kwargs,
        )


class RankShare(Dataset):
    """One process's share of the ``items`` to validate on: every world_size-th item from its rank, so that the
    ranks' sums add up to the whole split, nothing counted twice.

    Every rank also runs as many batches: a rank with one item fewer than rank 0 ends its share with a blank copy of
    an item (``blank(item)``: the same inputs, no target scored), which adds nothing to the sums. Under FSDP each
    forward pass is a collective every rank takes part in, so a rank with one batch more than the others waits for
    them forever (two gloo ranks, the tiny model wrapped by block: rank 0's second forward never returned).
    Lightning's DistributedSampler evens the ranks out by repeating items instead, which would count them twice.

    Fewer items than ranks is a one-line error on every rank (``what`` names the items, ``fix`` how to get more):
    Lightning refuses a rank whose loader is empty, with a traceback from that rank and a broken connection on the
    others."""

    def __init__(self, items: Dataset | list, trainer: L.Trainer | None, blank: Callable[[Any], Any], what: str,
                 fix: str) -> None:
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        n_items = len(items)
        if n_items < world:
            raise ConfigError(f"the validation split has fewer {what} ({n_items}) than processes sharing it ({world}); "
                              f"{fix}")
        self.items, self.blank = items, blank
        self.indices = list(range(rank, n_items, world))
        self.length = -(-n_items // world)  # rank 0's share, the largest

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        if not 0 <= i < self.length:  # (an IndexError also ends iteration by index, as list() does)
            raise IndexError(f"item {i} of a share of {self.length}")
        return self.items[self.indices[i]] if i < len(self.indices) else self.blank(self.items[self.indices[0]])


def unscored_window(window: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A validation window's inputs with no target to score: :class:`RankShare`'s blank item for text."""
    x, y = window
    return x, torch.full_like(y, IGNORE_INDEX)


def check_accumulate(accumulate: int) -> None:
    """A one-line error for ``trainer.accumulate_grad_batches`` under 1, which Lightning's Trainer takes."""
    if accumulate < 1:
        raise ConfigError(f"trainer.accumulate_grad_batches={accumulate} must be 1 or more")


class SweepWindows(Dataset):
    """Windows of seq_len tokens over a split, starting every ``stride`` tokens, that score every token after the
    first exactly once.

    ``stride = seq_len`` (the default): back-to-back windows. ``stride < seq_len``: each window overlaps the
    previous one and scores only its last ``stride`` targets, those the previous window did not, so every token is
    predicted with at least seq_len - stride tokens of context (Hugging Face's "perplexity of fixed-length models").
    Targets that are not scored (that context, and the padding of the last window) are IGNORE_INDEX."""

    def __init__(self, tokens: _TokenFile, seq_len: int, pad_id: int, stride: int | None = None) -> None:
        self.tokens, self.seq_len, self.stride = tokens, seq_len, stride or seq_len
        # Padding needs a real id (Llama's tokenizer has none: pad_id -1), and any will do: padded positions come
        # after every scored one, so causal attention never lets them change a score.
        self.pad_id = max(pad_id, 0)
        n_targets = tokens.length - 1
        # window i scores targets up to i·stride + seq_len: the first window, then enough to reach the last target
        self.n_windows = 0 if n_targets <= 0 else 1 + max(0, -(-(n_targets - seq_len) // self.stride))

    def __len__(self) -> int:
        return self.n_windows

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.stride
        window = torch.from_numpy(self.tokens.tokens[start : start + self.seq_len + 1].astype(np.int64))
        x = torch.full((self.seq_len,), self.pad_id, dtype=torch.long)
        y = torch.full((self.seq_len,), IGNORE_INDEX, dtype=torch.long)
        x[: len(window) - 1], y[: len(window) - 1] = window[:-1], window[1:]
        if i > 0:
            y[: self.seq_len - self.stride] = IGNORE_INDEX  # context only: the previous window scored these
        return x, y


class TextDataModule(StepDataModule):
    """Tokenizer and token files for ``cfg`` (built on first use, cached), served as training and validation
    windows. ``tokenizer`` forces a tokenizer, e.g. the one stored in a checkpoint."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self._given_tokenizer = tokenizer
        self.tokenizer: Tokenizer | None = None
        self.token_files: TokenFiles | None = None

    def prepare_data(self) -> None:
        """Build the tokenizer and token files if they are not cached. lfpl-train calls it in every process, before
        the Trainer exists (the model's vocabulary comes from it); one process builds, the others wait for it
        (:func:`~llmfoundry_pl.files.cached_or_built`)."""
        self.tokenizer, self.token_files = prepare_corpus(self.cfg, self._given_tokenizer)

    def setup(self, stage: str | None = None) -> None:
        if self.token_files is None:  # other ranks: the cache exists now, so this only loads it
            self.prepare_data()

    def train_dataloader(self) -> DataLoader:
        first, count = remaining_micro_batches(self.trainer, "training draws windows at random positions, so it is "
                                                             "step-based")
        return self.train_batches(first, count, self.trainer.global_rank, self.trainer.world_size)

    def train_batches(self, first_batch: int, num_batches: int, rank: int = 0, world_size: int = 1) -> DataLoader:
        """Micro-batches ``first_batch .. first_batch + num_batches - 1`` of training windows for one rank: the
        same windows whoever asks (the Trainer, or a plain loop such as lfpl-bench's)."""
        sampler = StepBatchSampler(first_batch, num_batches, self.cfg.batch_size, rank, world_size)
        dataset = RandomWindows(self._token_file("train"), self.cfg.seq_len, self.cfg.seed)
        return self._loader(dataset, batch_sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        windows = SweepWindows(self._token_file("val"), self.cfg.seq_len, self.tokenizer.pad_id, self.cfg.val_stride)
        share = RankShare(windows, self.trainer, unscored_window, f"windows of data.seq_len={self.cfg.seq_len} tokens",
                          "hold out more text (data.val_fraction) or lower data.seq_len")
        return self._loader(share, batch_size=self.cfg.batch_size)

    def _token_file(self, split: str) -> _TokenFile:
        path = self.token_files.train_path if split == "train" else self.token_files.val_path
        return _TokenFile(path, self.token_files.dtype)

