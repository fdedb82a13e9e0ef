"""Where trials are scored: in this process, in K local worker processes, or on Ray actors.

Every pool holds one ``TrialScorer`` (a what-if session: the models read once) per worker and
scores a batch of plain recipes, recipe i on worker i mod K, returning the results in the
batch's order. A worker that dies mid-batch gives its trial ``{"error": ...}`` (the study marks
it failed and continues) and is started again for the next batch.

- ``InProcessPool``: one scorer here (``--workers 0`` or 1 without Ray).
- ``LocalPool``: K spawned processes (``torch`` on one thread each), talking over pipes.
- ``RayPool``: K Ray actors on the cluster at ``address`` (``ray.init(address=...)``), each a
  ``TrialScorer``; the address is checked for a listening socket first, so an unreachable one
  is a one-line error at once instead of Ray's long retry loop.
"""

from __future__ import annotations

import multiprocessing
import socket
from pathlib import Path

from engine.errors import ConfigError, DeltaWorkbenchError
from engine.tune.objective import ScorerSettings, TrialScorer


def _error_line(err: BaseException) -> str:
    if isinstance(err, DeltaWorkbenchError):
        return str(err)
    return f"{type(err).__name__}: {err}".splitlines()[0][:300]


class InProcessPool:
    size = 1

    def __init__(self, settings: ScorerSettings):
        self.scorer = TrialScorer(settings)

    def score_batch(self, recipes: list[dict]) -> list[dict]:
        out = []
        for recipe in recipes:
            try:
                out.append(self.scorer.score(recipe))
            except Exception as err:  # a refused merge fails its trial, not the tune
                out.append({"error": _error_line(err)})
        return out

    def close(self) -> None:
        pass


def _worker_main(conn, settings_dict: dict) -> None:
    import torch

    torch.set_num_threads(1)
    try:
        scorer = TrialScorer(ScorerSettings.from_dict(settings_dict))
    except Exception as err:
        conn.send(("fatal", _error_line(err)))
        return
    conn.send(("ready", None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        try:
            conn.send(("ok", scorer.score(message)))
        except Exception as err:
            conn.send(("ok", {"error": _error_line(err)}))


class LocalPool:
    """K worker processes (spawned: no fork of a process holding torch threads)."""

    def __init__(self, settings: ScorerSettings, size: int):
        self.settings = settings
        self.size = int(size)
        self.context = multiprocessing.get_context("spawn")
        self.workers: list = [None] * self.size
        try:
            for i in range(self.size):
                self._start(i)
        except BaseException:
            self.close()
            raise

    def _start(self, i: int) -> None:
        parent, child = self.context.Pipe()
        process = self.context.Process(target=_worker_main, args=(child, self.settings.to_dict()),
                                       daemon=True, name=f"tune-worker-{i}")
        process.start()
        child.close()
        try:
            kind, payload = parent.recv()
        except EOFError:
            process.join(5)
            raise ConfigError(f"tune worker {i} exited while loading the models "
                              f"(exit code {process.exitcode})") from None
        if kind == "fatal":
            process.join(5)
            raise ConfigError(f"tune worker {i}: {payload}")
        self.workers[i] = (process, parent)

    def pids(self) -> list[int]:
        return [w[0].pid for w in self.workers if w is not None]

    def score_batch(self, recipes: list[dict]) -> list[dict]:
        out: list[dict | None] = [None] * len(recipes)
        for start in range(0, len(recipes), self.size):
            chunk = list(enumerate(recipes))[start:start + self.size]
            sent = []
            for slot, (index, recipe) in enumerate(chunk):
                process, conn = self.workers[slot]
                try:
                    conn.send(recipe)
                    sent.append((slot, index))
                except (BrokenPipeError, OSError):
                    out[index] = self._died(slot)
            for slot, index in sent:
                process, conn = self.workers[slot]
                try:
                    _, result = conn.recv()
                    out[index] = result
                except (EOFError, OSError):
                    out[index] = self._died(slot)
        return out  # type: ignore[return-value]

    def _died(self, slot: int) -> dict:
        process, conn = self.workers[slot]
        process.join(5)
        code = process.exitcode
        conn.close()
        self.workers[slot] = None
        self._start(slot)  # a fresh worker for the next trial
        return {"error": f"tune worker {slot} died (exit code {code}); trial failed"}

    def close(self) -> None:
        for i, worker in enumerate(self.workers):
            if worker is None:
                continue
            process, conn = worker
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join(5)
            conn.close()
            self.workers[i] = None


class ScorerActor:
    """The Ray actor: a TrialScorer built once on its node."""

    def __init__(self, settings_dict: dict):
        import torch

        torch.set_num_threads(1)
        self.scorer = TrialScorer(ScorerSettings.from_dict(settings_dict))

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        import os

        return os.getpid()

    def score(self, recipe: dict) -> dict:
        try:
            return self.scorer.score(recipe)
        except Exception as err:
            return {"error": _error_line(err)}


def check_ray_address(address: str, timeout: float = 3.0) -> None:
    """Refuse an address where nothing listens (``host:port``; ``auto`` and ``ray://`` pass)."""
    if address in ("auto", "local") or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"Ray address {address!r}: expected HOST:PORT (the head's GCS port)")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise ConfigError(f"Ray address {address!r} is unreachable ({err.strerror or err}); "
                          "is `ray start --head` running there?") from None


class RayPool:
    """K Ray actors, one TrialScorer each, on the cluster at ``address``."""

    def __init__(self, settings: ScorerSettings, size: int, address: str):
        check_ray_address(address)
        import ray

        repo = str(Path(__file__).resolve().parents[2])
        try:
            ray.init(address=address, log_to_driver=False, ignore_reinit_error=True,
                     runtime_env={"env_vars": {"PYTHONPATH": repo, "OMP_NUM_THREADS": "1"}})
        except Exception as err:
            raise ConfigError(f"Ray address {address!r}: cannot join the cluster "
                              f"({_error_line(err)})") from None
        self.ray = ray
        self.settings = settings
        self.size = max(1, int(size))
        self.remote_class = ray.remote(num_cpus=1)(ScorerActor)
        self.actors: list = [None] * self.size
        try:
            for i in range(self.size):
                self._start(i)
        except BaseException:
            self.close()
            raise

    def _start(self, i: int) -> None:
        actor = self.remote_class.remote(self.settings.to_dict())
        try:
            self.ray.get(actor.ready.remote())
        except Exception as err:
            cause = getattr(err, "cause", None) or err
            raise ConfigError(f"Ray tune actor {i}: {_error_line(cause)}") from None
        self.actors[i] = actor

    def pids(self) -> list[int]:
        return [self.ray.get(a.pid.remote()) for a in self.actors]

    def score_batch(self, recipes: list[dict]) -> list[dict]:
        out: list[dict | None] = [None] * len(recipes)
        for start in range(0, len(recipes), self.size):
            chunk = list(enumerate(recipes))[start:start + self.size]
            refs = [(slot, index, self.actors[slot].score.remote(recipe))
                    for slot, (index, recipe) in enumerate(chunk)]
            for slot, index, ref in refs:
                try:
                    out[index] = self.ray.get(ref)
                except self.ray.exceptions.RayActorError:
                    self.actors[slot] = None
                    self._start(slot)
                    out[index] = {"error": f"Ray tune actor {slot} died; trial failed"}
        return out  # type: ignore[return-value]

    def close(self) -> None:
        for actor in self.actors:
            if actor is not None:
                try:
                    self.ray.kill(actor)
                except Exception:
                    pass
        self.actors = []
        self.ray.shutdown()


def make_pool(settings: ScorerSettings, *, workers: int = 0, ray_address: str | None = None):
    if ray_address:
        return RayPool(settings, max(1, workers), ray_address)
    if workers <= 1:
        return InProcessPool(settings)
    return LocalPool(settings, workers)


__all__ = ["InProcessPool", "LocalPool", "RayPool", "ScorerActor", "check_ray_address",
           "make_pool"]
