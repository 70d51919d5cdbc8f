"""The commands (pyproject.toml's ``[project.scripts]``): the Hydra apps ``lfpl-train``, ``lfpl-eval``,
``lfpl-generate``, ``lfpl-bench``, ``lfpl-plan``, ``lfpl-export`` and ``lfpl-serve``, and the plain ``lfpl-doctor``
and ``lfpl-plot``. Each also runs as ``python -m llmfoundry_pl.<name>``.
"""
