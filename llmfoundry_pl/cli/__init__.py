"""Hydra entry points: ``lfpl-train``, ``lfpl-eval``, ``lfpl-generate``.

Each also runs as ``python -m llmfoundry_pl.<name>``.
"""
