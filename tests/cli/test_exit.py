"""`python -m engine` ends without the interpreter's teardown, and loses nothing by it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, **kw)


def test_a_command_output_is_complete_when_piped(capsys):
    from engine.__main__ import main

    assert main(["methods"]) == 0
    in_process = capsys.readouterr().out
    done = _run(["-m", "engine", "methods"])
    assert done.returncode == 0, done.stderr
    assert done.stdout == in_process and len(in_process) > 1000


def test_an_error_keeps_its_exit_code_and_one_line(tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text("merge_method: no_such_method\nmodels: []\n")
    done = _run(["-m", "engine", "merge", str(recipe), "--out", str(tmp_path / "out")])
    assert done.returncode == 2
    assert done.stderr.startswith("error:") and "Traceback" not in done.stderr


def test_threads_are_waited_for_and_atexit_handlers_run(tmp_path):
    script = textwrap.dedent(f"""
        import atexit, sys, threading, time
        from pathlib import Path
        from engine.__main__ import exit_without_teardown
        out = Path({str(tmp_path)!r})
        atexit.register(lambda: (out / "atexit").write_text("ran"))
        def late():
            time.sleep(0.3)
            (out / "thread").write_text("done")
        threading.Thread(target=late).start()
        print("buffered", end="")  # no newline: left in the buffer until the exit flushes it
        exit_without_teardown(3)
    """)
    done = _run(["-c", script])
    assert done.returncode == 3, done.stderr
    assert done.stdout == "buffered"
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "ran"


def test_the_program_imports_without_the_collector_then_freezes_what_it_imported():
    script = textwrap.dedent("""
        import gc, json
        from engine.__main__ import build_parser_frozen
        runs = []
        gc.callbacks.append(lambda phase, info: runs.append(info["generation"]) if phase == "start" else None)
        before = gc.get_freeze_count()
        build_parser_frozen()
        after_on = dict(collections=len(runs), frozen=gc.get_freeze_count() - before, enabled=gc.isenabled())
        gc.disable()
        build_parser_frozen()
        print(json.dumps(dict(on=after_on, stays_off=not gc.isenabled())))
    """)
    done = _run(["-c", script])
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    # importing every command module (torch among them) ran no collection, froze what it made
    # (torch alone makes well over 100k objects) and left the collector on for the command
    assert seen["on"] == {"collections": 0, "frozen": seen["on"]["frozen"], "enabled": True}
    assert seen["on"]["frozen"] > 100_000
    assert seen["stays_off"]  # a collector that was off stays off


def test_python_m_engine_runs_its_command_with_the_collector_on_and_the_imports_frozen():
    script = textwrap.dedent("""
        import atexit, gc, runpy, sys
        atexit.register(lambda: print("GC", gc.isenabled(), gc.get_freeze_count()))
        sys.argv = ["engine", "methods"]
        runpy.run_module("engine", run_name="__main__", alter_sys=True)
    """)
    done = _run(["-c", script])
    assert done.returncode == 0, done.stderr
    enabled, frozen = done.stdout.strip().splitlines()[-1].split()[1:]
    assert enabled == "True" and int(frozen) > 100_000


def test_main_in_a_callers_process_leaves_its_collector_alone(capsys):
    import gc

    from engine.__main__ import main

    frozen, enabled = gc.get_freeze_count(), gc.isenabled()
    assert main(["methods"]) == 0
    assert (gc.get_freeze_count(), gc.isenabled()) == (frozen, enabled)
