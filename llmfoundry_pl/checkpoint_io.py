"""Checkpoint files that are whole or absent, never half-written.

Why not Lightning's own ``TorchCheckpointIO``: it writes through an fsspec transaction, which builds the file in
``$TMPDIR`` and moves it into place. Where ``$TMPDIR`` is another filesystem than the run folder (a tmpfs ``/tmp``,
a container's scratch disk), that move is a copy over the existing file: for as long as the copy takes, last.ckpt
was half-written. ``lfpl-eval`` or ``lfpl-generate`` reading it then failed ("failed finding central directory", 7
of 12 tries while a 30M model trained), and a run killed during a save lost its resume point. Here the file is
built beside its final name and renamed over it, which one filesystem does atomically: a reader sees the old
checkpoint or the new one. Remote paths (``s3://...``) keep Lightning's way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

from llmfoundry_pl.files import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that saves a local checkpoint under a hidden temporary name in its own folder, then
    renames it into place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(str(path)):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_write(Path(path), lambda tmp: torch.save(checkpoint, tmp))
