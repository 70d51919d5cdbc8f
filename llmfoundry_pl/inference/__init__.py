"""Text generation with a trained model (pure PyTorch): KV cache, sampling, streaming."""

from llmfoundry_pl.inference.generate import TextStreamer, generate, generate_stream, generate_text, stream_text
from llmfoundry_pl.inference.kv_cache import KVCache, new_kv_cache

__all__ = [
    "KVCache",
    "TextStreamer",
    "generate",
    "generate_stream",
    "generate_text",
    "new_kv_cache",
    "stream_text",
]
