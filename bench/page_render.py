"""Render time of every page of the app under ``streamlit.testing`` AppTest, cold and with a warm
metric cache (the merge and compression labs: their in-process caches of what-if sessions,
scores and artifacts play the part of the metric cache).

For every page: one cold render in a fresh session with an empty metric cache (the metrics
are computed and written; imports are warmed first by rendering the Models page), then
``--repeats`` renders of fresh sessions with the cache warm (what a user opening the page
sees), and ``--repeats`` reruns of one session (a widget change that needs no new metric).
The times are whole script runs as AppTest drives them (the app file, the sidebar and the
page). Target: under 2 s per page with a warm cache. Writes a section into bench/README.md
with --readme.

    python bench/page_render.py [--zoo DIR] [--repeats 5] [--readme]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as app.py sets it, before torch loads
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import _common  # noqa: E402
from bench._common import RESULTS, machine_conditions, save_results  # noqa: E402

SECTION = "## Page render time"
NO_CHART_PAGES = {"pages/models.py", "pages/jobs.py", "pages/export.py"}
PAGES = [("Models", "pages/models.py"),
         ("Delta spectra", "pages/spectra.py"), ("Similarity and conflicts", "pages/similarity.py"),
         ("Channel clusters", "pages/clusters.py"), ("Neural incompatibility", "pages/incompatibility.py"),
         ("Merge lab (what-if merge + scores)", "pages/merge_lab.py"),
         ("Compression lab (compress + rebuild + scores)", "pages/compression_lab.py"),
         ("Jobs", "pages/jobs.py"), ("Export", "pages/export.py")]


def render(page: str | None) -> float:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    started = time.perf_counter()
    if page:
        at.switch_page(page)
    at.run()
    took = time.perf_counter() - started
    if at.exception:
        raise SystemExit(f"{page}: {at.exception[0].message}")
    if page and (at.error or (page not in NO_CHART_PAGES and not at.get("plotly_chart"))):
        raise SystemExit(f"{page}: no charts ({[e.value for e in at.error]})")
    return took


def rerun_times(page: str, repeats: int) -> list[float]:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    at.switch_page(page).run()
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        at.run()
        out.append(time.perf_counter() - started)
    return out


OMP_NOTE = (' `app.py` sets `OMP_WAIT_POLICY=PASSIVE` before torch loads (this script does the same): '
            'Streamlit runs each script run on its own thread and the engine reads ahead on another, '
            "and with OpenMP's default spin-waiting the density change below took 9 to 13 s instead of "
            '0.2 to 0.4 s on these shared cores (measured before the fix, same machine).')


def write_readme(label: str, table: list[str], conditions: str) -> None:
    """Replace this zoo's table in the section (one sub-section per zoo kind), keep the rest."""
    readme = _common.README
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    intro = ("Each analysis page rendered under `streamlit.testing` AppTest (the whole script run: app, "
             "sidebar, page). Cold: a fresh session with an empty metric cache of its own (metrics "
             "computed in the app process and written to DuckDB). Warm: a fresh session once the cache "
             "holds the page's metrics (read from DuckDB, nothing computed). Rerun: the same session run "
             "again." + OMP_NOTE + "\n\nReproduce: `python bench/page_render.py --zoo ZOO --repeats 5 --readme` (one "
             "sub-section per zoo kind).")
    sub = f"### {label} zoo"
    block = f"{sub}\n\n" + "\n".join(table) + f"\n\n{conditions}\n"
    if SECTION in text:
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        end = nxt if nxt != -1 else len(text)
        section = text[start:end]
        subs = {}
        for part in section.split("\n### ")[1:]:
            head = "### " + part.split("\n", 1)[0]
            subs[head] = "### " + part.rstrip("\n") + "\n"
        subs[sub] = block
        ordered = [subs[k] for k in sorted(subs, key=lambda k: (k != "### quick zoo", k))]
        text = text[:start] + f"{SECTION}\n\n{intro}\n\n" + "\n".join(ordered) + text[end:]
    else:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{intro}\n\n{block}"
    readme.write_text(text)


def big_model_flow(base: str, finetuned: list[str], repeats: int, work: Path) -> dict:
    """The spectra page on models over the in-process limit: the first render offers the job,
    the job runs in a worker, the next render ingests its rows, later renders read the store."""
    from streamlit.testing.v1 import AppTest

    from engine import settings
    from engine.io import ModelFolder
    from engine.jobs import JobManager

    os.environ["DELTA_WORKBENCH_CACHE"] = str(work / "metrics-big.duckdb")
    selection = {"base": str(Path(base).absolute()), "finetunes": [str(Path(f).absolute()) for f in finetuned]}

    def session() -> AppTest:
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=1800)
        at.session_state["selection"] = dict(selection)
        return at.switch_page("pages/spectra.py")

    at = session()
    started = time.perf_counter()
    at.run()
    offer = time.perf_counter() - started
    if at.exception or not any("runs as a job" in i.value for i in at.info):
        raise SystemExit(f"big models: no job offered ({[e.value for e in at.error]})")
    at.button(key="sp_run_job").click()
    started = time.perf_counter()
    at.run()
    manager = JobManager(settings.jobs_dir(), gpu=False)
    job = next(j for j in manager.jobs() if j.spec.kind == "analyze" and j.status.state in ("queued", "running"))
    status = manager.wait(job.id, timeout_s=3600, interval_s=0.5)
    job_s = time.perf_counter() - started
    if status.state != "done":
        raise SystemExit(f"big models: job {status.state}: {status.error}")
    started = time.perf_counter()
    at.run()
    ingest = time.perf_counter() - started
    if at.exception or not at.get("plotly_chart"):
        raise SystemExit("big models: no charts after the ingest")
    warm = []
    for _ in range(repeats):
        at = session()
        started = time.perf_counter()
        at.run()
        warm.append(time.perf_counter() - started)
        if not at.get("plotly_chart"):
            raise SystemExit("big models: no charts on a warm render")
    with ModelFolder(base) as folder:
        n_params, n_tensors = folder.num_parameters, len(folder.tensor_names)
    rows = len((manager.get(job.id).result() or {}).get("rows", []))
    return {"params": n_params, "tensors": n_tensors, "finetunes": len(finetuned), "offer": offer,
            "job": job_s, "ingest": ingest, "rows": rows, "warm_median": statistics.median(warm),
            "warm_max": max(warm)}


def param_change(page: str, key: str, value) -> float:
    """A widget change that needs new metrics (e.g. the similarity page's top-k density)."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
    at.switch_page(page).run()
    widget = at.select_slider(key=key)
    started = time.perf_counter()
    widget.set_value(value).run()
    took = time.perf_counter() - started
    if at.exception or at.error:
        raise SystemExit(f"{page}: {key}={value} failed")
    return took


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default=os.environ.get("DELTA_WORKBENCH_ZOO"),
                        help="demo zoo folder (default: $DELTA_WORKBENCH_ZOO)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--readme", action="store_true", help="write the table into bench/README.md")
    parser.add_argument("--big-base", help="also: the spectra page on a big base (job, ingest, warm renders)")
    parser.add_argument("--big-finetuned", action="append", default=[], help="fine-tune of --big-base (repeat)")
    parser.add_argument("--render", action="store_true",
                        help="rewrite the section from bench/results/page_render_*.json; measure nothing")
    args = parser.parse_args(argv)
    if args.render:
        for path in sorted(RESULTS.glob("page_render_*.json")):
            table, conditions = subsection(json.loads(path.read_text()))
            write_readme(path.stem.removeprefix("page_render_"), table, conditions)
        return 0
    if not args.zoo or not (Path(args.zoo) / "zoo.json").is_file():
        parser.error("--zoo must name a built demo zoo (zoo.json at its root)")

    work = Path(tempfile.mkdtemp(prefix="page-render-"))
    os.environ["DELTA_WORKBENCH_ZOO"] = str(Path(args.zoo).absolute())
    os.environ["DELTA_WORKBENCH_HOME"] = str(work / "home")
    os.environ["DELTA_WORKBENCH_CACHE"] = str(work / "metrics.duckdb")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.chdir(ROOT)
    import torch

    torch.set_num_threads(args.threads)
    manifest = json.loads((Path(args.zoo) / "zoo.json").read_text())
    label = "quick" if manifest.get("quick") else "full"
    params = {m["path"]: m.get("num_parameters") for m in manifest["models"]}

    warmup = render(None)  # imports (torch, transformers, plotly, duckdb) and the Models page
    rows = []
    for title, page in PAGES:
        os.environ["DELTA_WORKBENCH_CACHE"] = str(work / f"metrics-{Path(page).stem}.duckdb")  # cold per page
        cold = render(page)
        warm = [render(page) for _ in range(args.repeats)]
        reruns = rerun_times(page, args.repeats)
        rows.append((title, cold, statistics.median(warm), max(warm), statistics.median(reruns)))
        print(f"{title:26s} cold {cold:6.2f} s   warm median {statistics.median(warm):5.2f} s "
              f"(max {max(warm):.2f})   rerun median {statistics.median(reruns):5.2f} s", flush=True)

    density = param_change("pages/similarity.py", "si_density", 0.5)
    print(f"similarity: top-k density 0.2 -> 0.5 (new pair metrics) {density:.2f} s", flush=True)

    big = None
    if args.big_base:
        big = big_model_flow(args.big_base, args.big_finetuned, args.repeats, work)
        print(f"big models: {big}", flush=True)

    record = {"label": label, "repeats": args.repeats, "threads": args.threads, "warmup_s": warmup,
              "small_base_parameters": params.get("small/base"), "large_base_parameters": params.get("large/base"),
              "rows": [{"page": t, "cold_s": c, "warm_median_s": w, "warm_max_s": m, "rerun_median_s": r}
                       for t, c, w, m, r in rows],
              "density_change_s": density, "big": big, "machine": machine_conditions()}
    save_results(f"page_render_{label}", record)
    table, conditions = subsection(record)
    print("\n".join(table))
    print(conditions)
    if args.readme:
        write_readme(label, table, conditions)
    return 0


def subsection(r: dict) -> tuple[list[str], str]:
    """One zoo kind's table and conditions from a saved record (bench/results/page_render_KIND.json)."""
    table = ["| page | cold s (computes, fills the cache) | warm s, median (fresh session) | warm s, max | "
             "rerun s, median |", "|---|---|---|---|---|"]
    table += [f"| {row['page']} | {row['cold_s']:.2f} | {row['warm_median_s']:.2f} | {row['warm_max_s']:.2f} | "
              f"{row['rerun_median_s']:.2f} |" for row in r["rows"]]
    worst = max(row["warm_max_s"] for row in r["rows"])
    m = r["machine"]
    conditions = (f"Conditions: {r['label']} zoo (small/base {r['small_base_parameters']} parameters, large/base "
                  f"{r['large_base_parameters']}; 5 small fine-tunes selected, the app's default); "
                  f"{r['repeats']} warm renders per page; torch threads {r['threads']}; {m['cores']} CPU cores "
                  f"(load average {m['load_average_1m']:.1f} at the end), measured {m['date']}; first app render "
                  f"(imports) {r['warmup_s']:.1f} s, not counted. Slowest warm render: {worst:.2f} s (target: "
                  f"under 2 s). A widget change that needs new metrics (similarity page, top-k density 0.2 -> "
                  f"0.5: pair metrics computed, per-tensor ones read from the cache): {r['density_change_s']:.2f} s. "
                  f"Raw numbers: `bench/results/page_render_{r['label']}.json` (`--render` rewrites this "
                  "section from them).")
    big = r.get("big")
    if big is not None:
        conditions += (
            f"\n\nBig models (the job path): the spectra page on a {big['params'] / 1e6:.0f}M-parameter base "
            f"({big['tensors']} tensors) and {big['finetunes']} fine-tune(s), over the in-process limit of "
            f"50M: first render (offers the job, computes nothing) {big['offer']:.2f} s; the `analyze` job in "
            f"its worker process {big['job']:.1f} s (start to done, {big['rows']} metric rows); the render "
            f"that ingests them into DuckDB and draws {big['ingest']:.2f} s; later renders, fresh sessions, "
            f"median {big['warm_median']:.2f} s (max {big['warm_max']:.2f}). Reproduce: add "
            "`--big-base BASE --big-finetuned FT` (the 271M pair `bench/analysis_bench.py` generates).")
    return table, conditions

if __name__ == "__main__":
    sys.exit(main())
