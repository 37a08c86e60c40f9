"""``cheers serve``: the OpenAI-compatible server and its web page, on uvicorn."""

from __future__ import annotations

import argparse
import logging
import os

from cheers.cli_args import (
    OneLineParser,
    checkpoint_args,
    checkpoint_path,
    integer,
    number,
    open_pipeline,
    positive_int,
)
from cheers.serve.config import ServeConfig

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def build_parser() -> argparse.ArgumentParser:
    d = ServeConfig()
    ap = OneLineParser(prog="cheers serve", description=__doc__)
    checkpoint_args(ap)
    ap.add_argument("--host", default=d.host, help="address to bind (default: loopback only)")
    ap.add_argument("--port", type=integer(0), default=d.port, help="port to listen on (0: any free one)")
    ap.add_argument("--api-key", default=os.environ.get("CHEERS_API_KEY") or None,
                    help="require 'Authorization: Bearer KEY' on /v1 routes (default: $CHEERS_API_KEY)")
    ap.add_argument("--model-name", default=None, help="the model id clients send (default: the folder's name)")
    ap.add_argument("--queue-size", type=positive_int, default=d.queue_size,
                    help="requests waiting or running before the server answers 429")
    ap.add_argument("--max-batch", type=positive_int, default=d.max_batch,
                    help="images per sampler batch and chats decoding together (1: one request at a time)")
    ap.add_argument("--batch-window-ms", type=number(0), default=d.batch_window_ms,
                    help="how long an image request waits for others to share its batch")
    ap.add_argument("--max-tokens", type=positive_int, default=d.max_tokens, help="limit of a chat's max_tokens")
    ap.add_argument("--max-n", type=positive_int, default=d.max_n, help="limit of the images per request")
    ap.add_argument("--max-image-pixels", type=positive_int, default=d.max_image_pixels,
                    help="largest uploaded image, in pixels (width x height)")
    ap.add_argument("--max-body-mb", type=number(0, low_open=True), default=d.max_body_bytes / 2**20,
                    help="largest request body, in MiB")
    ap.add_argument("--request-timeout", type=number(0, low_open=True), default=None,
                    help="seconds a request may take from arrival to its answer's end; then 504 (default: no limit)")
    ap.add_argument("--limit-concurrency", type=positive_int, default=256,
                    help="open connections and requests at once before uvicorn answers 503")
    ap.add_argument("--graceful-shutdown-timeout", type=number(0), default=30.0,
                    help="on SIGTERM, seconds the running requests get to finish (new ones get 503)")
    ap.add_argument("--allowed-hosts", nargs="+", default=None, metavar="NAME",
                    help="names the Host header may carry, '*' for any (default: the bound address and "
                         "localhost; guards against DNS rebinding)")
    ap.add_argument("--cors-origin", nargs="+", default=(), metavar="ORIGIN",
                    help="web origins allowed to call the API from a browser (default: none)")
    ap.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                    help="what the server logs")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    ckpt = checkpoint_path(args)
    cfg = ServeConfig(host=args.host, port=args.port, api_key=args.api_key,
                      model_name=args.model_name or ckpt.resolve().name, queue_size=args.queue_size,
                      max_batch=args.max_batch, batch_window_ms=args.batch_window_ms, max_tokens=args.max_tokens,
                      max_n=args.max_n, max_image_pixels=args.max_image_pixels,
                      max_body_bytes=int(args.max_body_mb * 2**20), request_timeout=args.request_timeout,
                      allowed_hosts=tuple(args.allowed_hosts) if args.allowed_hosts else None,
                      cors_origins=tuple(args.cors_origin))
    import uvicorn

    from cheers.serve.app import Server, create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    if cfg.host not in LOOPBACK and cfg.api_key is None:
        logging.getLogger("cheers.serve").warning(
            "serving on %s without an API key: anyone who reaches this address can use the model", cfg.host)
    if cfg.host in ("0.0.0.0", "::") and args.allowed_hosts is None:
        logging.getLogger("cheers.serve").warning(
            "bound to every address, but only Host headers %s are answered: name this machine's with --allowed-hosts",
            "/".join(sorted(cfg.host_names())))
    pipe = open_pipeline(args)
    print(f"cheers serve: {cfg.model_name} ({ckpt}) on http://{cfg.host}:{cfg.port}/", flush=True)
    Server(uvicorn.Config(create_app(pipe, cfg), host=cfg.host, port=cfg.port, log_level=args.log_level,
                          limit_concurrency=args.limit_concurrency,
                          timeout_graceful_shutdown=args.graceful_shutdown_timeout,
                          access_log=False)).run()  # the app logs each request as one JSON line
