"""Using a trained model (pure PyTorch): generation with a KV cache, sampling, batches, streaming and speculative
decoding; scoring of sequences and multiple-choice accuracy."""

from llmfoundry_pl.inference.generate import generate, generate_batch, generate_stream
from llmfoundry_pl.inference.kv_cache import KVCache, new_kv_cache
from llmfoundry_pl.inference.scoring import choice_accuracy, sequence_log_probs
from llmfoundry_pl.inference.speculative import SpeculativeStats, speculative_stream
from llmfoundry_pl.inference.text import TextStreamer, generate_text, generate_text_batch, stream_text

__all__ = [
    "KVCache",
    "SpeculativeStats",
    "TextStreamer",
    "choice_accuracy",
    "generate",
    "generate_batch",
    "generate_stream",
    "generate_text",
    "generate_text_batch",
    "new_kv_cache",
    "sequence_log_probs",
    "speculative_stream",
    "stream_text",
]
