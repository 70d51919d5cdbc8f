"""The Hydra commands' ``main`` functions, which pyproject.toml's ``[project.scripts]`` and ``python -m
llmfoundry_pl.<name>`` call. Each composes its config, then imports its module (torch, Lightning) and runs its task
there: see :func:`~llmfoundry_pl.cli.app.hydra_command`."""

from llmfoundry_pl.cli.app import hydra_command

lfpl_train = hydra_command("train", "llmfoundry_pl.cli.train:run")
lfpl_eval = hydra_command("eval", "llmfoundry_pl.cli.eval:evaluate")
lfpl_generate = hydra_command("generate", "llmfoundry_pl.cli.generate:generate")
lfpl_bench = hydra_command("bench", "llmfoundry_pl.cli.bench:run")
lfpl_plan = hydra_command("plan", "llmfoundry_pl.cli.plan:plan")
lfpl_export = hydra_command("export", "llmfoundry_pl.cli.export:export")
lfpl_serve = hydra_command("serve", "llmfoundry_pl.cli.serve:serve")
