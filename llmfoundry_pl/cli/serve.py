"""``lfpl-serve``: an OpenAI-compatible server with continuous batching over a trained model.

    lfpl-serve ckpt_path=outputs/.../last.ckpt                    # http://127.0.0.1:8000 (the playground at /)
    lfpl-serve ckpt_path=my-export/ max_batch=32 port=9000 api_key=secret

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="x")
    client.completions.create(model="...", prompt="ROMEO:", max_tokens=50)   # the model's name: GET /v1/models
"""

from __future__ import annotations

import socket
from pathlib import Path

from omegaconf import DictConfig

from llmfoundry_pl.cli.common import (
    load_model,
    pick_device,
    to_dataclass,
)
from llmfoundry_pl.config import ConfigError, ServeConfig
from llmfoundry_pl.inference.quantize import for_inference


def server_url(host: str, port: int) -> str:
    """The address to open: an IPv6 host in brackets (``http://[::1]:8000``, RFC 3986; ``http://::1:8000`` is none)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(node: DictConfig) -> None:
    cfg = to_dataclass(node, ServeConfig)
    try:
        import uvicorn

        from llmfoundry_pl.serve.app import create_app
        from llmfoundry_pl.serve.engine import Engine
    except ImportError as e:
        raise ConfigError(f"lfpl-serve needs {e.name}: pip install 'llmfoundry-pl[serve]'") from None
    device = pick_device(cfg.device)
    listener = _listen(cfg.host, cfg.port)  # before the model loads, which can take a while
    model, tokenizer, source = load_model(cfg.ckpt_path)
    model = for_inference(model, device, cfg.precision, cfg.quantize)
    name = cfg.model_name or _default_name(source.path)
    engine = Engine(model, tokenizer, max_batch=cfg.max_batch, queue_limit=cfg.queue_limit)
    print(f"serving {source} as model {name!r} on {server_url(cfg.host, cfg.port)} (playground at /)", flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, cfg, name), log_level="warning"))
    server.run(sockets=[listener])


def _listen(host: str, port: int) -> socket.socket:
    """The server's listening socket. Bound here rather than by uvicorn, so that a port in use (or a host that is
    not this machine's) is one line at once, not uvicorn's error after the model has loaded."""
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        reason = (e.strerror or str(e)).split(" (while attempting")[0]  # create_server repeats the address there
        raise ConfigError(f"cannot listen on {host}:{port}: {reason}; choose another port= (or host=)") from None


def _default_name(path: str) -> str:
    """The model's API name when none is given: a folder's name, or for a checkpoint its run folder's name and its
    own (``outputs/2026-11-23/01-30-00-203117/checkpoints/last.ckpt`` → ``01-30-00-203117-last``)."""
    p = Path(path)
    if p.suffix != ".ckpt":
        return p.name
    run = p.parent.parent if p.parent.name == "checkpoints" else p.parent
    return f"{run.name}-{p.stem}"
