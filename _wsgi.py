"""gunicorn entry (`gunicorn _wsgi:app`) and a dev server (`python _wsgi.py --host 127.0.0.1 --port 9090`)."""

from __future__ import annotations

import argparse
import logging

from model import create_app
from serving.settings import Settings


def configure_logging(level: str) -> None:
    """Log to stderr with timestamps; secrets are never logged by the server."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="[%(asctime)s] [%(levelname)s] [%(name)s::%(funcName)s::%(lineno)d] %(message)s",
    )


_settings = Settings.from_env()
configure_logging(_settings.log_level)
# Built in each worker after the fork (gunicorn runs without --preload), so CUDA and the model
# threads start in the process that serves.
app = create_app(_settings)


def main() -> None:
    """Run the development server with the reference template's flags."""
    parser = argparse.ArgumentParser(description="Label Studio ML backend (development server)")
    parser.add_argument("-p", "--port", type=int, default=_settings.port)
    parser.add_argument("--host", default=_settings.host)
    parser.add_argument("--debug", action="store_true", help="Flask debug mode (never in production)")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, ERROR")
    args = parser.parse_args()
    if args.log_level:
        logging.getLogger().setLevel(args.log_level.upper())
    app.run(host=args.host, port=args.port, debug=args.debug, threaded=True, use_reloader=False)


if __name__ == "__main__":
    main()
