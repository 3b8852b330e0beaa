"""`fra ingest --engine ray`: the blocks of `blocks.py` run in Ray actors.

Each actor loads the model and the SAEs once (from the config's names with `load_inputs`, or
from the objects the Python API was given, shipped through Ray's object store) and runs block
tasks with the same `BlockWorker` as the local engine; it reserves one GPU when the cluster has
GPUs, else one CPU. The driver hands out the blocks of a pass, one at a time to each idle
actor, and only decides *where* blocks run: the partials and the merge are the local engine's,
so the index is identical to the single-process index.

Failures. An actor that dies (a crash, an out-of-memory kill, a lost node) is restarted by Ray
(`max_restarts`), which reloads the model; its unfinished block is handed out again. A block
is finished exactly when its partial exists (written under a temporary name with its file
record, then renamed), so a retried or duplicated block cannot be counted twice, and an
interrupted run resumes where it stopped: the next run skips every finished block.

Why a pool of actors and not a Ray Dataset: the work items are a few block numbers (each actor
already holds the tokenised samples, which are small), and the passes are separated by
barriers (the channels are selected between them). A Dataset's actor pool lives for one
execution, i.e. one pass of one layer, so each actor would load the model 2 x layers times;
these actors load it once for the whole job.

Where the index lives: every actor writes its partials under `<out>.staging/partials/`, so on a
multi-node cluster OUT must be on a filesystem that every node mounts at the same path.
"""

from __future__ import annotations

from pathlib import Path

from .blocks import BlockWorker, Task, missing
from .job import Job, load_inputs

MAX_ROUNDS = 3  # hand-outs of a block before the run gives up


def import_ray():
    try:
        import ray
    except ImportError:
        raise ImportError("--engine ray needs Ray: pip install 'fra[ray]'") from None
    return ray


class _Actor:
    """One Ray worker process: a `BlockWorker` over the model and SAEs it loaded once."""

    def __init__(self, cfg, job: Job, inputs, partials: str, use_gpu: bool):
        device = "cuda" if use_gpu else "cpu"
        if inputs is None:
            inputs = load_inputs(cfg, device)
        else:  # the Python API's objects arrive on the driver's device
            inputs.lm.model.to(device)
            for sae in inputs.saes.values():
                sae.to(device)
        self.worker = BlockWorker(job, inputs, device, Path(partials), cfg.q_block)

    def run(self, task: Task) -> str:
        self.worker.run(task)
        return task.name


class RayEngine:
    """Block tasks on a Ray cluster: the one at `cfg.address`, or a local instance started here."""

    def __init__(self, cfg, job: Job, inputs, partials: Path):
        ray = import_ray()
        self.ray, self.partials, self.progress = ray, Path(partials), cfg.progress
        self.started = not ray.is_initialized()
        if self.started:
            ray.init(address=cfg.address, include_dashboard=False, log_to_driver=cfg.progress)
        res = ray.cluster_resources()
        gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 1))
        self.n = cfg.workers or gpus or cpus
        options = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        actor = ray.remote(max_restarts=MAX_ROUNDS, **options)(_Actor)
        # objects from the Python API (a model in memory) travel once, through the object store
        ref = ray.put(inputs) if inputs is not None else None
        self.actors = [actor.remote(cfg, job, ref, str(self.partials), bool(gpus)) for _ in range(self.n)]

    def run(self, tasks: list[Task], desc: str) -> None:
        ray = self.ray
        for _ in range(MAX_ROUNDS):
            todo = missing(self.partials, tasks)
            if not todo:
                return
            idle, running, failures = list(self.actors), {}, []
            while todo or running:
                while todo and idle:
                    a = idle.pop()
                    running[a.run.remote(todo.pop(0))] = a
                done, _ = ray.wait(list(running), num_returns=1)
                a = running.pop(done[0])
                try:
                    name = ray.get(done[0])
                    if self.progress:
                        print(f"{desc}: block {name} done", flush=True)
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                    failures.append(exc)  # the actor restarts; its block is handed out in the next round
                idle.append(a)
        absent = missing(self.partials, tasks)
        if absent:
            raise RuntimeError(
                f"{desc}: {len(absent)} block(s) failed {MAX_ROUNDS} times, e.g. {absent[0].name}; "
                f"last error: {failures[-1] if failures else 'none'}. Re-run the same command to resume."
            )

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        if self.started:
            self.ray.shutdown()
