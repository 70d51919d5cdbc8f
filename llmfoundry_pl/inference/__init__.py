"""Text generation with a trained model (pure PyTorch)."""

from llmfoundry_pl.inference.generate import generate, generate_text

__all__ = ["generate", "generate_text"]
