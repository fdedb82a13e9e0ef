"""Trials scored in parallel: K local worker processes and K Ray actors on a real local Ray
head give the same trials as the in-process scorer for the same seed, sampler and batch; a
worker that dies fails its trial only and is started again."""

import os
import signal
import socket
import subprocess
import time

import pytest

from engine.tune.run import read_tune_recipe
from engine.tune.study import open_study, run_tune
from engine.tune.workers import InProcessPool, LocalPool, RayPool


def recipe(tmp_path, zoo):
    path = tmp_path / "tune.yml"
    path.write_text(f"""merge_method: ties
base_model: {zoo}/small/base
models:
  - model: {zoo}/small/reverse
    parameters: {{weight: {{range: [0, 2]}}, density: {{range: [0.2, 1]}}}}
  - model: {zoo}/small/upper
    parameters: {{weight: {{range: [0, 2]}}, density: 0.5}}
""")
    return path


def settings_of(path):
    from engine.tune.objective import settings_for_recipe

    space, midpoint = read_tune_recipe(path)
    return space, settings_for_recipe(midpoint, recipe_dir=path.parent, n_per_task=8)


def trials_with(pool, space, tmp_path, name):
    study, _ = open_study(name, sampler="tpe", seed=7, directions=["maximize"],
                          storage_path=tmp_path / f"{name}.journal")
    try:
        result = run_tune(space, pool.score_batch, study, trials=4, batch_size=2)
    finally:
        pool.close()
    return ([(t.number, t.params, t.user_attrs.get("tasks")) for t in study.get_trials()],
            result.best_number)


def test_dead_local_worker_fails_its_trial_and_is_restarted(quick_zoo, tmp_path):
    space, settings = settings_of(recipe(tmp_path, quick_zoo))
    pool = LocalPool(settings, 2)
    try:
        recipes = [space.decode(space.midpoint())] * 2
        dead = pool.pids()[1]
        os.kill(dead, signal.SIGKILL)
        out = pool.score_batch(recipes)
        assert "error" not in out[0] and set(out[0]["tasks"]) == {"reverse", "upper"}
        assert "tune worker 1 died" in out[1]["error"]
        assert dead not in pool.pids()
        again = pool.score_batch(recipes)  # the restarted worker scores the same recipe alike
        assert again[1]["tasks"] == again[0]["tasks"] == out[0]["tasks"]
    finally:
        pool.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A real local Ray head on 127.0.0.1, stopped (its whole process group) at the end."""
    port = _free_port()
    proc = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail("the local Ray head did not start")
                time.sleep(1)
        time.sleep(5)  # the raylet registers after the GCS listens
        yield f"127.0.0.1:{port}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_ray_local_and_in_process_give_the_same_trials(quick_zoo, tmp_path, ray_head):
    space, settings = settings_of(recipe(tmp_path, quick_zoo))
    ray_trials = trials_with(RayPool(settings, 2, ray_head), space, tmp_path, "ray")
    local_trials = trials_with(LocalPool(settings, 2), space, tmp_path, "local")
    here_trials = trials_with(InProcessPool(settings), space, tmp_path, "here")
    assert ray_trials == local_trials == here_trials
    assert len(ray_trials[0]) == 4 and all(tasks is not None for _, _, tasks in ray_trials[0])


def test_dead_ray_actor_fails_its_trial_and_is_restarted(quick_zoo, tmp_path, ray_head):
    space, settings = settings_of(recipe(tmp_path, quick_zoo))
    pool = RayPool(settings, 2, ray_head)
    try:
        recipes = [space.decode(space.midpoint())] * 2
        dead = pool.pids()[0]
        os.kill(dead, signal.SIGKILL)
        time.sleep(2)
        out = pool.score_batch(recipes)
        assert "Ray tune actor 0 died" in out[0]["error"]
        assert "error" not in out[1]
        again = pool.score_batch(recipes)
        assert again[0]["tasks"] == again[1]["tasks"] == out[1]["tasks"]
        assert dead not in pool.pids()
    finally:
        pool.close()
