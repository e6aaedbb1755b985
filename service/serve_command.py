"""``captioner serve``: the HTTP service on Werkzeug's threaded development server (use gunicorn in production).

Logs stay in the CLI's plain text format here; gunicorn's are JSON lines (see ``service/logs.py``).
"""

from __future__ import annotations

import argparse
import logging

from captioner.caption_command import add_decoder_precision_argument
from captioner.runtime import RUNTIME_CHOICES

log = logging.getLogger("service.serve_command")

EXAMPLES = """\
examples:
  captioner serve                                  (then open http://127.0.0.1:8000/)
  captioner serve --model runs/flickr8k/best --port 8080
  curl -F image=@captioner/samples/photographer.jpg http://127.0.0.1:8000/v1/captions
"""


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 1 to 65535, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="run the HTTP service for development (production: gunicorn -c service/gunicorn.conf.py)",
        description="Serve the captioning API and web page on Werkzeug's threaded server. Settings not given here "
                    "come from the CAPTIONER_* environment variables (see the README). The page is at /, the API "
                    "docs at /docs.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="model directory (default: $CAPTIONER_MODEL, else the bundled model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8000, metavar="N", help="port, 1-65535 (default: 8000)")
    parser.add_argument("--device", default=None, metavar="DEVICE",
                        help="auto (cuda when available, else cpu), cpu, cuda or cuda:N "
                             "(default: $CAPTIONER_DEVICE, else auto)")
    parser.add_argument("--no-batching", action="store_true", help="caption each request on its own")
    parser.add_argument("--runtime", default=None, choices=RUNTIME_CHOICES,
                        help="encoder runtime (default: $CAPTIONER_RUNTIME, else auto: the fastest installed)")
    add_decoder_precision_argument(parser, default=None)
    parser.add_argument("--production", action="store_true",
                        help="run the production stack instead: nginx on --bind in front of gunicorn (needs nginx)")
    parser.add_argument("--bind", default=None,
                        help="HOST:PORT of --production (default: $CAPTIONER_BIND, else 0.0.0.0:8000)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.production:
        from service.production import run_command

        return run_command(args)
    from werkzeug.serving import run_simple

    from service.app import create_app

    config: dict[str, object] = {"load_in_background": False}
    if args.model is not None:
        config["model"] = args.model
    if args.device is not None:
        config["device"] = args.device
    if args.no_batching:
        config["batching"] = False
    if args.runtime is not None:
        config["runtime"] = args.runtime
    if args.decoder_precision is not None:
        config["decoder_precision"] = args.decoder_precision
    app = create_app(config)
    log.info("serving on http://%s:%d/ (development server; use gunicorn in production)", args.host, args.port)
    run_simple(args.host, args.port, app, threaded=True, use_reloader=False, use_debugger=False)
    return 0
