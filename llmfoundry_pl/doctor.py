"""``python -m llmfoundry_pl.doctor``: the same as ``lfpl-doctor`` (see llmfoundry_pl/cli/doctor.py)."""

from llmfoundry_pl.cli.doctor import main

if __name__ == "__main__":
    main()
