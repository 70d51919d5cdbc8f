"""Hydra entry points: ``lfpl-train``, ``lfpl-eval``, ``lfpl-generate`` (each also ``python -m llmfoundry_pl.<name>``)."""
