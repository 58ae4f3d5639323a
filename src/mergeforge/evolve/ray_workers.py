"""``mergeforge evolve --ray-address ADDRESS``: the pipelined search (:mod:`mergeforge.evolve.pool`)
with its workers as Ray actors of a running cluster.

Each actor is a :class:`~mergeforge.evolve.pool.SearchWorker` (the sources loaded once, then one
candidate per call), declared with ``num_cpus=1``: Ray places an actor only where a CPU is free
and holds that CPU for the actor's life, so the actors never take more cores than the cluster has
and never starve other work of it. The number of actors is ``--workers`` if given, else the
cluster's free CPUs at the start; asking for more than are free is refused (the extra actors
would wait for ever). An actor that dies (killed, out of memory) fails the candidate it was
scoring, with the reason, and Ray restarts it (reloading the sources) up to ``MAX_RESTARTS`` times.

The model and task folders must be readable at the same paths on every node (one machine, or a
shared filesystem), and mergeforge importable there. Ray is imported here only, when asked.
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Any

from mergeforge.errors import MergeforgeError

INSTALL_HINT = "pip install 'mergeforge[ray]'"
# Restarts per actor before its candidates fail for good: a crash that repeats is the candidate's
# or the machine's, not bad luck.
MAX_RESTARTS = 3


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """A ``HOST:PORT`` address must accept a connection: ``ray.init`` waits minutes on a dead one."""
    import socket

    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit() or "://" in host:
        return  # 'auto' (Ray finds the local cluster itself, or says at once that there is none)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):  # [::1]:6379 too
            pass
    except OSError as exc:
        raise MergeforgeError(f"--ray-address {address}: nothing answers there ({exc.strerror or exc}); start a cluster "
                              "with 'ray start --head --port PORT' or give the address it printed") from None


class RayExecutor:
    """``slots`` Ray actors, each scoring one candidate at a time."""

    def __init__(self, address: str, workers: int | None, config_data: dict[str, Any], folder: Path, out_dir: Path):
        try:
            import ray
        except ModuleNotFoundError:
            raise MergeforgeError(f"--ray-address {address}: Ray is not installed; {INSTALL_HINT}") from None
        import logging
        import warnings

        from mergeforge.evolve.pool import SearchWorker

        self._ray = ray
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            check_reachable(address)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)  # Ray's note on a GPU variable it will stop setting
                    ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise MergeforgeError(f"--ray-address {address}: no Ray cluster reached ({reason}); start one with "
                                      "'ray start --head' or give its HOST:PORT") from None
        try:
            free = int(ray.available_resources().get("CPU", 0))
            count = free if workers is None else workers
            if count < 1 or count > free:
                wanted = "a worker" if workers is None else f"--workers {workers}"
                raise MergeforgeError(f"--ray-address {address}: {wanted} needs one free CPU each, and the cluster has "
                                      f"{free} free; give --workers {max(1, free)} or fewer, or add nodes")
            actor_class: Any = ray.remote(num_cpus=1, max_restarts=MAX_RESTARTS, max_task_retries=0)(SearchWorker)
            self._actors: list[Any] = [actor_class.remote(config_data, str(folder), str(out_dir)) for _ in range(count)]
            try:
                ray.get([actor.ready.remote() for actor in self._actors])
            except ray.exceptions.RayError as exc:
                lines = str(exc).strip().splitlines()
                reason = next((line for line in reversed(lines) if line.strip()), type(exc).__name__)
                raise MergeforgeError(f"--ray-address {address}: a Ray worker could not load the search's sources: "
                                      f"{reason.strip()}") from None
        except BaseException:
            self.close()
            raise
        self.slots = count
        self.description = f"{count} Ray actor{'s' if count != 1 else ''} at {address}"
        self._busy: list[Future[dict[str, Any]] | None] = [None] * count

    def submit(self, generation: int, index: int, unit: list[float]) -> Future[dict[str, Any]]:
        """Give the candidate to an idle actor (the loop never submits more than ``slots`` at once)."""
        slot = next(i for i, future in enumerate(self._busy) if future is None or future.done())
        future: Future[dict[str, Any]] = self._actors[slot].score.remote(generation, index, unit).future()
        self._busy[slot] = future
        return future

    def close(self) -> None:
        for actor in getattr(self, "_actors", []):
            self._ray.kill(actor)
        self._actors = []
        if self._started_ray:
            self._ray.shutdown()
