"""Text → tokens → batches: the corpus cache (``corpus``) and the Lightning data module (``datamodule``)."""

from llmfoundry_pl.data.corpus import TokenFiles, prepare_corpus, resolve_sources
from llmfoundry_pl.data.datamodule import IGNORE_INDEX, TextDataModule

__all__ = ["IGNORE_INDEX", "TextDataModule", "TokenFiles", "prepare_corpus", "resolve_sources"]
