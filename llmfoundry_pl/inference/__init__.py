"""Text generation with a trained model (pure PyTorch): KV cache, sampling, batches, streaming, speculative decoding."""

from llmfoundry_pl.inference.generate import generate, generate_batch, generate_stream
from llmfoundry_pl.inference.kv_cache import KVCache, new_kv_cache
from llmfoundry_pl.inference.speculative import SpeculativeStats, speculative_stream
from llmfoundry_pl.inference.text import TextStreamer, generate_text, generate_text_batch, stream_text

__all__ = [
    "KVCache",
    "SpeculativeStats",
    "TextStreamer",
    "generate",
    "generate_batch",
    "generate_stream",
    "generate_text",
    "generate_text_batch",
    "new_kv_cache",
    "speculative_stream",
    "stream_text",
]
