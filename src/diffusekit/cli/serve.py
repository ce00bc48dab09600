"""``diffusekit serve``: keep a model loaded and serve it over HTTP (the community /sdapi/v1 API subset, a job
queue and a web page). The server's packages (FastAPI, uvicorn) are the ``serve`` extra; the rest of the
command line works without them."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from diffusekit.cli.common import parse_lora
from diffusekit.errors import ConfigError
from diffusekit.limits import check_float, check_int

TOKEN_ENV = "DIFFUSEKIT_SERVE_TOKEN"
MIN_TOKEN_CHARS = 8
DEFAULTS = {"host": "127.0.0.1", "port": 7860, "out": "outputs", "queue_size": 64, "max_body_mib": 32,
            "max_side": 2048, "max_batch": 16, "preview_every": 1.0}  # fmt: skip


def _check(args: argparse.Namespace) -> tuple[str | None, list[tuple[str, float]]]:
    """Every option checked before the model loads; returns the token (option or environment) and the LoRA
    files with their weights."""
    from diffusekit.serve.security import is_loopback

    check_int("--port", args.port, 0, 65535)
    check_int("--queue-size", args.queue_size, 1, 100_000)
    check_int("--max-body-mib", args.max_body_mib, 1, 4096)
    check_int("--max-side", args.max_side, 8, 16384)
    check_int("--max-batch", args.max_batch, 1, 1024)
    check_float("--preview-every", args.preview_every, 0.0, 3600.0)
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    if token is not None and (len(token) < MIN_TOKEN_CHARS or not token.isprintable() or " " in token):
        raise ConfigError(f"--token must be at least {MIN_TOKEN_CHARS} printable characters without spaces "
                          f"(or set {TOKEN_ENV})")  # fmt: skip
    if not is_loopback(args.host) and token is None:
        raise ConfigError(f"--host {args.host} is not a loopback address: other machines could use the server, so "
                          f"set --token T (or {TOKEN_ENV}); every request must then present it")  # fmt: skip
    if not Path(args.model).exists():
        raise ConfigError(f"MODEL {args.model}: no such file or folder (a diffusers model folder or a .safetensors "
                          "file)")  # fmt: skip
    return token, [_lora_spec(spec) for spec in args.lora or []]


def _lora_spec(spec: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:WEIGHT`` -> (FILE, WEIGHT) by the rule every command uses (:func:`cli.common.parse_lora`,
    weight 1 when none is given); the file must exist."""
    path, weight = parse_lora(spec)
    if not Path(path).is_file():
        raise ConfigError(f"--lora {path}: no such file (a kohya or PEFT .safetensors LoRA file)")
    return path, 1.0 if weight is None else weight


def run(args: argparse.Namespace) -> int:
    """``diffusekit serve``."""
    token, loras = _check(args)
    try:
        import uvicorn

        from diffusekit.serve.app import create_app
        from diffusekit.serve.community import Limits
        from diffusekit.serve.service import Service, Settings
    except ImportError as e:
        raise ConfigError(f"the server needs the 'serve' extra ({e.name} is missing): pip install "
                          "'diffusekit[serve]'") from None  # fmt: skip
    from diffusekit.cli.generate import load_model
    from diffusekit.pipelines.lora import load_lora
    from diffusekit.pipelines.openvino_unet import check_engine, use_engine
    from diffusekit.pipelines.recipe import DTYPES, chosen_dtype
    from diffusekit.runtime.policy import pick_device

    try:  # the port first: a port in use is found before the model loads
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
        sock.listen(2048)  # connections wait in the backlog until the server takes them
    except OSError as e:
        raise ConfigError(f"--host {args.host} --port {args.port}: cannot listen there ({e.strerror or e})") from None
    device = pick_device(args.device or "auto")
    check_engine(args.engine, device)  # a missing package or a GPU fails before the model loads
    dtype = chosen_dtype(args.dtype, device)
    model = str(Path(args.model).absolute())
    tokenizer = str(Path(args.tokenizer).absolute()) if args.tokenizer else None
    print(f"diffusekit serve: loading {model}", file=sys.stderr, flush=True)
    sd = load_model(model, tokenizer, allow_pickle=bool(args.allow_pickle), device=device, dtype=DTYPES[dtype])
    for path, weight in loras:
        load_lora(sd, path, weight=weight)
    if args.engine != "torch":  # the conversion runs at the first request, or not at all when cached
        use_engine(sd.unet, args.engine, notify=lambda m: print(f"diffusekit serve: {m}", file=sys.stderr, flush=True))
    settings = Settings(model=model, out=Path(args.out).absolute(), tokenizer=tokenizer, dtype=dtype,
                        device=str(device), queue_size=args.queue_size, max_body_bytes=args.max_body_mib << 20,
                        limits=Limits(max_side=args.max_side, max_batch=args.max_batch),
                        preview_every=args.preview_every, engine=args.engine)  # fmt: skip
    service = Service(sd, settings).start()
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"diffusekit serve: http://{shown}:{port}/ (results in {settings.out}; Ctrl-C stops)", file=sys.stderr,
          flush=True)  # fmt: skip
    app = create_app(service, token=token, allowed_origins=args.allow_origin or ())
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3, access_log=False)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        service.stop()
    return 0


_EPILOG = """
The API (JSON; see /docs for every route):
  POST /sdapi/v1/txt2img, /sdapi/v1/img2img   the community API's fields: prompt, negative_prompt, seed (-1 =
                                              random), sampler_name, steps, cfg_scale, width, height,
                                              batch_size, n_iter, denoising_strength, init_images, mask
  GET  /sdapi/v1/progress, POST /sdapi/v1/interrupt, GET /sdapi/v1/samplers, /sdapi/v1/sd-models,
  POST /sdapi/v1/png-info
  POST /api/jobs (answers at once with a job id; 429 when the queue is full), GET /api/jobs/ID,
  POST /api/jobs/ID/cancel, GET /api/events (server-sent events)

Security: the server listens on 127.0.0.1 by default. Any other address needs --token (or the
DIFFUSEKIT_SERVE_TOKEN variable): every request must then send 'Authorization: Bearer TOKEN' or HTTP Basic
auth with the token as password (the browser asks for it). Pages of other sites cannot call the server
(CORS off; --allow-origin opens it to one origin). Bodies are limited to --max-body-mib; no route reads or
writes a path the client names: images are kept under --out, named by the server.

examples:
  diffusekit serve ./stable-diffusion-v1-5
  diffusekit serve ./sd15 --port 7861 --out ~/sd-images --preview-every 2
  diffusekit serve v1-5-pruned-emaonly.safetensors --tokenizer ./sd15/tokenizer --host 0.0.0.0 --token "$TOKEN"
  curl -s http://127.0.0.1:7860/sdapi/v1/txt2img -H 'Content-Type: application/json' \\
      -d '{"prompt": "a lighthouse at dusk", "steps": 20, "seed": 42}'
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve`` sub-command."""
    from diffusekit.pipelines.openvino_unet import ENGINES
    from diffusekit.pipelines.recipe import AUTO_DTYPE_HELP, DTYPES

    p = subparsers.add_parser(
        "serve",
        help="serve a model over HTTP: community API, job queue and a web page",
        description="Load a Stable Diffusion model once and serve it over HTTP: the community /sdapi/v1 API "
        "subset, a job queue with progress events, and a web page at /.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="a diffusers model folder or a single .safetensors checkpoint")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder; required with a single-file MODEL")
    p.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]",
                   help="apply a LoRA file (kohya or PEFT) at WEIGHT (default 1); repeatable")  # fmt: skip
    p.add_argument("--allow-pickle", action="store_true", help="allow a pickled .ckpt MODEL (trusted files only)")
    p.add_argument("--device", metavar="DEVICE", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=["auto", *DTYPES], help=AUTO_DTYPE_HELP)
    p.add_argument("--engine", choices=ENGINES, default="torch",
                   help="what runs the U-Net: torch (default) or openvino (CPU only, the 'engines' extra; faster in "
                   "bfloat16 on CPUs with native bf16; the first request converts the model, cached in the user "
                   "cache for later starts)")  # fmt: skip
    p.add_argument("--host", default=DEFAULTS["host"],
                   help=f"address to listen on (default {DEFAULTS['host']}); a non-loopback one needs --token")
    p.add_argument("--port", type=int, default=DEFAULTS["port"], help=f"port (default {DEFAULTS['port']}; 0 = any "
                   "free port, printed at start)")  # fmt: skip
    p.add_argument("--token", metavar="T", help=f"a secret every request must present (default: ${TOKEN_ENV}); "
                   f"at least {MIN_TOKEN_CHARS} characters")  # fmt: skip
    p.add_argument("--out", default=DEFAULTS["out"], metavar="DIR",
                   help=f"folder for the results, NNNNN-SEED.png with their settings in the metadata (default "
                   f"{DEFAULTS['out']}/); a restarted server lists the jobs found there")  # fmt: skip
    p.add_argument("--queue-size", type=int, default=DEFAULTS["queue_size"], metavar="N",
                   help=f"jobs that may wait; more are refused with 429 (default {DEFAULTS['queue_size']})")
    p.add_argument("--max-body-mib", type=int, default=DEFAULTS["max_body_mib"], metavar="MIB",
                   help=f"largest request body in MiB (default {DEFAULTS['max_body_mib']})")
    p.add_argument("--max-side", type=int, default=DEFAULTS["max_side"], metavar="PX",
                   help=f"largest width or height a request may ask for (default {DEFAULTS['max_side']})")
    p.add_argument("--max-batch", type=int, default=DEFAULTS["max_batch"], metavar="N",
                   help=f"largest batch_size a request may ask for (default {DEFAULTS['max_batch']})")
    p.add_argument("--preview-every", type=float, default=DEFAULTS["preview_every"], metavar="S",
                   help=f"seconds between progress previews, each a decode of the current estimate (default "
                   f"{DEFAULTS['preview_every']}; 0 = every step)")  # fmt: skip
    p.add_argument("--allow-origin", action="append", metavar="URL",
                   help="let pages of this origin (e.g. http://localhost:3000) call the API; repeatable")
    p.set_defaults(run=run)


__all__ = ["add_parser", "run"]
