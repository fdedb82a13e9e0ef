"""Serve Delta Workbench on 127.0.0.1 from any folder: ``python path/to/run_app.py [--port N]``
(the same launcher as ``python -m engine app``; see engine/cli/app_cmd.py)."""

import sys

from engine.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["app", *sys.argv[1:]]))
