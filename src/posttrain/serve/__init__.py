"""`posttrain serve`: an OpenAI-compatible HTTP server for any posttrain model or adapter.

    POST /v1/chat/completions   messages -> the chat template -> an answer (stream: true for SSE)
    POST /v1/completions        raw prompt(s) -> continuations
    GET  /v1/models             the base model and every adapter loaded by name
    GET  /health                status, queue length and batching counters (no API key needed)

    protocol.py  the OpenAI wire format: validation, limits, response and chunk bodies (no torch)
    engine.py    the batching worker that owns the model (rollout.generate underneath)
    http.py      routes, loopback Host check, API key, body limits, JSON errors, server-sent events

Python API, e.g. for tests or a notebook:

    server = build_server("tiny", adapters={"sql": "runs/sft_lora"}, port=0).start()
    ...  # openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    server.close()
"""

from __future__ import annotations

import os
import sys

from posttrain.errors import UserError
from posttrain.serve.protocol import APIError, Limits

__all__ = ["APIError", "Limits", "build_server", "main", "model_targets"]


def model_targets(model_name: str, model_is_adapter: bool, adapter_names: list[str]) -> dict[str, str | None]:
    """What each served model name runs: the model as loaded, the bare base, or an adapter by name.

    MODEL alone is served as loaded (a plain model, or an adapter dir with its adapters on).
    With --adapter NAME=DIR, MODEL names the bare base (or, when MODEL is itself an adapter
    dir, that adapter, loaded under the name "default") and each NAME its adapter.
    """
    from posttrain.serve.engine import AS_LOADED, BASE

    if not adapter_names:
        return {model_name: AS_LOADED}
    if model_name in adapter_names:
        raise UserError(f"--adapter name {model_name!r} is also the model's name; pick another, or set --served-model-name")
    if model_is_adapter and "default" in adapter_names:
        raise UserError("--adapter name 'default' is taken by MODEL's own adapter; pick another name")
    return {model_name: "default" if model_is_adapter else BASE, **{name: name for name in adapter_names}}


def build_server(model_path: str, *, adapters: dict[str, str] | None = None, served_model_name: str | None = None,
                 template: str = "auto", dtype: str = "float32", trust_remote_code: bool = False,
                 limits: Limits | None = None, host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, max_batch_size: int = 16, batch_wait_s: float = 0.005,
                 log_requests: bool = True, allowed_hosts: tuple[str, ...] = ()):
    """Load the model (and named adapters), start the batching worker, bind the socket.

    Bound to a loopback address, the server answers only requests whose Host (and Origin, when
    sent) is a loopback name or one of `allowed_hosts` (DNS rebinding); elsewhere the key guards it.

    `template`: as generate's `--template` (`inference.chat_template`); "none" serves raw
    completions only, ended by EOS alone, and refuses chat requests.

    Returns a `Server`: `.start()` serves from a background thread, `.serve_forever()` in
    this one, `.url` is where, `.close()` stops the server and the worker.
    """
    from posttrain.inference import chat_template, load_for_inference, resolve_model_dir
    from posttrain.models.adapters import is_adapter_dir
    from posttrain.serve.engine import Engine
    from posttrain.serve.http import Server

    adapters = dict(adapters or {})
    model, tokenizer = load_for_inference(model_path, dtype, trust_remote_code, adapters=adapters)
    targets = model_targets(served_model_name or model_path, is_adapter_dir(resolve_model_dir(model_path)),
                            list(adapters))
    engine = Engine(model, tokenizer, targets, chat_template(tokenizer, template), limits or Limits(),
                    max_batch_size=max_batch_size, batch_wait_s=batch_wait_s)
    try:
        return Server(engine, host, port, api_key=api_key, log_requests=log_requests, allowed_hosts=allowed_hosts)
    except OSError as exc:
        engine.close()
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or --host") from None


def main(args) -> int:
    """The CLI entry: flags -> build_server -> serve until Ctrl-C."""
    from posttrain.config.feedback import is_variable_name
    from posttrain.inference import _pairs

    model_path = _model_path(args.model, args.model_flag)
    api_key = None
    if args.api_key_env is not None:
        # never echo the value: a key pasted in place of the variable's name must not be printed
        if not is_variable_name(args.api_key_env):
            raise UserError("--api-key-env takes the NAME of an environment variable holding the key (letters, "
                            "digits, _), not the key itself: export SERVE_KEY=... and pass --api-key-env SERVE_KEY")
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise UserError(f"--api-key-env {args.api_key_env}: that environment variable is unset or empty")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    limits = Limits(max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                    max_tokens=args.max_tokens_limit, max_n=args.max_n, max_pending=args.max_pending)
    for name, value in vars(limits).items():
        if value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.max_batch_size < 1:
        raise UserError(f"--max-batch-size must be at least 1, got {args.max_batch_size}")
    server = build_server(model_path, adapters=_pairs(args.adapter, "--adapter"), served_model_name=args.served_model_name,
                          template=args.template, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                          limits=limits, host=args.host, port=args.port, api_key=api_key,
                          max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait_ms / 1000,
                          allowed_hosts=tuple(args.allowed_host))
    loopback = _is_loopback(args.host)
    if api_key is None and not loopback:
        print(f"warning: serving on {args.host} without an API key; anyone who can reach it can use it "
              "(set --api-key-env)", file=sys.stderr)
    if args.allowed_host and not loopback:
        print(f"warning: --allowed-host has no effect on {args.host}: only a loopback server checks the Host "
              "header", file=sys.stderr)
    print(f"serving {', '.join(server.engine.targets)} at {server.url}/v1 (Ctrl-C stops)", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        server.close()
    return 0


def _model_path(positional: str | None, flag: str | None) -> str:
    """The model, given as MODEL or as --model (generate's and chat's spelling), not two different ones."""
    if positional is not None and flag is not None and positional != flag:
        raise UserError(f"two models given: MODEL {positional} and --model {flag}; serve one (MODEL or --model)")
    if positional is None and flag is None:
        raise UserError("posttrain serve needs a model: posttrain serve MODEL (or --model MODEL)")
    return positional if positional is not None else flag


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _port(text: str) -> int:
    import argparse

    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (0-65535; 0 = any free one)")
    return port


def add_arguments(parser) -> None:
    """The `posttrain serve` flags (kept here so cli.py stays a list of subcommands)."""
    defaults = Limits()
    parser.add_argument("model", nargs="?", metavar="MODEL",
                        help="model dir, adapter dir, run dir (uses its final/) or preset; or give it as --model, "
                             "as generate and chat take it")
    parser.add_argument("--model", dest="model_flag", default=None, metavar="MODEL",
                        help="= MODEL (the spelling generate and chat use); one of the two")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="also serve a LoRA/IA3 adapter as model NAME (repeatable); MODEL then names the bare base")
    parser.add_argument("--served-model-name", default=None, help="name of MODEL in requests (default: MODEL as given)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=_port, default=8000, help="0 = any free port (printed at start)")
    parser.add_argument("--api-key-env", default=None, metavar="VAR",
                        help="require 'Authorization: Bearer KEY' with KEY read from environment variable VAR")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="on a loopback --host, also answer requests for Host NAME, e.g. a reverse proxy's "
                             "(repeatable; loopback names always)")
    from posttrain.inference import add_template_argument
    from posttrain.models.loading import _DTYPES  # no torch: --help stays fast

    add_template_argument(parser)  # none: /v1/completions only (chat needs a template)
    parser.add_argument("--dtype", default="float32", choices=_DTYPES, help="dtype the weights are loaded in")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the Python code a model's repository ships (its own architecture)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="rows (prompts x n) generated together")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="after a request arrives, wait this long for others to batch with it")
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes,
                        help="largest request body accepted; a larger one gets 413")
    parser.add_argument("--max-prompt-tokens", type=int, default=defaults.max_prompt_tokens,
                        help="longest prompt accepted (also capped by the model's context)")
    parser.add_argument("--max-tokens-limit", type=int, default=defaults.max_tokens,
                        help="largest max_tokens a request may ask for; chat's default when it asks for none")
    parser.add_argument("--max-n", type=int, default=defaults.max_n, help="most choices per prompt (n)")
    parser.add_argument("--max-pending", type=int, default=defaults.max_pending,
                        help="requests queued or running; more get 503 until some finish")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (%(default)s: torch's default)")
