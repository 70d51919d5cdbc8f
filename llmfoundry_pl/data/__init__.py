"""Text → tokens → batches: the corpus cache (``corpus``), the pretraining data module (``datamodule``), its variant
streaming litdata chunks (``streaming``) and the fine-tuning one for conversations and preference pairs (``chat``)."""

from llmfoundry_pl.data.chat import ChatDataModule
from llmfoundry_pl.data.corpus import TokenFiles, prepare_corpus, resolve_sources
from llmfoundry_pl.data.datamodule import IGNORE_INDEX, TextDataModule
from llmfoundry_pl.data.streaming import StreamingDataModule, prepare_chunks

__all__ = ["ChatDataModule", "IGNORE_INDEX", "StreamingDataModule", "TextDataModule", "TokenFiles", "prepare_chunks",
           "prepare_corpus", "resolve_sources"]
