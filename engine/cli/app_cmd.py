"""``python -m engine app [--port N]``: serve the app on 127.0.0.1, from whatever folder.

Streamlit reads ``.streamlit/config.toml`` from the working directory only: started from
another folder, ``streamlit run /path/to/app.py`` listens on every interface. This launcher
passes the project's settings as command-line flags instead (flags win over any config file)
and pins the address to loopback, so where it is started from no longer matters.
"""

from __future__ import annotations

import os
import shlex
import sys
import tomllib
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"


def _flag_value(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def streamlit_argv(port: int | None = None) -> list[str]:
    """The command that serves the app: the project's config.toml as flags, loopback forced."""
    config = tomllib.loads((PROJECT_ROOT / ".streamlit" / "config.toml").read_text())
    options = {f"{section}.{key}": value for section, table in config.items()
               for key, value in table.items()}
    options["server.address"] = LOOPBACK
    options["browser.serverAddress"] = LOOPBACK
    if port is not None:
        options["server.port"] = port
    argv = [sys.executable, "-m", "streamlit", "run", str(PROJECT_ROOT / "app.py")]
    for name, value in options.items():
        argv.append(f"--{name}={_flag_value(value)}")
    return argv


def register(subparsers) -> None:
    parser = subparsers.add_parser("app", help="serve the app on 127.0.0.1 (from any folder)")
    parser.add_argument("--port", type=int, default=None, help="port (default: config.toml's, 8501)")
    parser.add_argument("--print", action="store_true", dest="print_only",
                        help="print the streamlit command instead of running it")
    parser.set_defaults(func=run)


def run(args) -> int:
    argv = streamlit_argv(args.port)
    if args.print_only:
        print(shlex.join(argv))
        return 0
    sys.stdout.flush()
    os.execv(argv[0], argv)  # Ctrl-C and signals reach streamlit itself
    return 0  # not reached
