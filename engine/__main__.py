"""Command line: ``python -m engine <command> ...``.

Each command lives in ``engine/cli/<name>.py`` with ``register(subparsers)`` that adds its
parser and sets ``func``. Errors of the workbench become one line on stderr and exit code 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys

from engine.errors import DeltaWorkbenchError

COMMAND_MODULES = ["inspect", "zoo", "eval", "merge", "analyze", "clusters", "incompatibility",
                   "compress", "decompress", "methods", "moe", "extract_lora", "convert_pickle", "repair",
                   "transfer", "tune", "visionfuse", "app"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description="Delta Workbench engine")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"engine.cli.{name}_cmd")
        module.register(sub)
    return parser


def sweep_staging(args: argparse.Namespace) -> None:
    """Remove the staging folders of runs that were killed (every command does this first;
    a command may name destinations whose staging it adopts, via ``keep_staging_for``)."""
    from engine.io.staging import sweep_all_staging

    keep = args.keep_staging_for(args) if hasattr(args, "keep_staging_for") else []
    removed = sweep_all_staging(keep_for=keep)
    if removed:
        print(f"note: removed {len(removed)} staging folder(s) left by interrupted runs",
              file=sys.stderr)


def build_parser_frozen() -> argparse.ArgumentParser:
    """``build_parser`` with the cyclic garbage collector off while the commands' modules
    (torch among them) are imported, and every object they made frozen afterwards.

    Importing torch and the engine allocates a few hundred thousand long-lived objects (modules,
    functions, classes, dicts) and no garbage to speak of; the collector, triggered every 700
    net allocations, traverses them again and again while they are made: ~18 collections and
    80 ms for the engine's own modules after torch on a 2-core machine, ~0.2 s of a 2.3 s
    merge in all. ``gc.freeze`` moves what the imports made to the permanent generation, so
    the collections of the command's own run (the collector is on again for it: a long job's
    cycles are still collected) no longer traverse them. Only for the program: a caller of
    ``main`` in its own process keeps its collector as it was."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return build_parser()
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def main(argv: list[str] | None = None, *, program: bool = False) -> int:
    parser = build_parser_frozen() if program else build_parser()
    args = parser.parse_args(argv)
    sweep_staging(args)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, so a reader that went away is seen inside the try
        return code
    except BrokenPipeError:
        # ``inspect | head``: the reader has what it wanted. Point stdout at /dev/null so the
        # interpreter's own flush at exit does not fail again; 141 is 128 + SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except DeltaWorkbenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def exit_without_teardown(code: int) -> None:
    """End the process with ``code``, skipping only the interpreter's final teardown.

    With torch imported, freeing every module's objects one by one at exit takes longer than
    many commands' own work (ours, measured on a 2-core machine: `python -c "import torch"`
    median 2.7 s, the same ending in ``os._exit`` 2.0 s). Every file a command writes is
    written, fsynced and closed before it returns (the writer's contract), so nothing is lost:
    what the interpreter does first at exit still happens here, in its order: wait for every
    non-daemon thread (``threading._shutdown``), run the atexit handlers (library cleanups,
    weakref finalizers such as temporary folders, multiprocessing's joins), flush stdout and
    stderr. Where those CPython hooks are missing, the normal exit."""
    import atexit
    import threading

    shutdown = getattr(threading, "_shutdown", None)
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if shutdown is None or run_exitfuncs is None:
        sys.exit(code)
    try:
        shutdown()
        run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


if __name__ == "__main__":
    exit_without_teardown(main(program=True))
