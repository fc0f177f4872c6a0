"""Training on N ranks: the job a caller hands its ranks, the launcher command, and the rank entry point.

A caller describes the run as a `TrainJob` (model and train configs, shard dir, where every output goes).
World size 1 runs `train_job(job)` in the calling process; for more ranks `run_ranks` writes the job as
JSON and starts torchrun (one node) or DeepSpeed's launcher (one node, or every node of a hostfile) on
`python -m lm_core.launch JOB`, whose every rank runs the same `train_job` (its part of every batch);
rank 0 writes the consolidated model directory and a result file, which `run_ranks` reads back.

Rank stdout/stderr (progress lines, warnings) come back through `on_line`, so the caller decides where
they are logged. A SIGTERM/SIGINT to the caller is passed on to the launcher, whose ranks checkpoint and
stop (the engine's signal handling), so a rerun resumes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lm_core.checkpoints import latest_tag
from lm_core.engine import TrainingInterrupted
from lm_core.tracking import Tracker, truncate_history
from lm_core.train_config import TrainConfig, read_hostfile
from lm_core.zero_adapter import free_port

DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "ROLE_RANK")
EXIT_INTERRUPTED = 75  # a rank stopped by SIGTERM/SIGINT after checkpointing (EX_TEMPFAIL: rerun to resume)
log = logging.getLogger(__name__)


@dataclass
class TrainJob:
    model: dict  # GPTConfig as data
    train: dict  # TrainConfig as data
    shard_dir: str
    tokenizer_path: str
    tokenizer_sha256: str
    bos_id: int | None
    checkpoint_dir: str
    tensorboard_dir: str
    history_path: str  # JSONL, appended across resumes (keep it beside the checkpoints); see prepare_history
    model_dir: str  # rank 0 saves the trained model here (lm_core.weights format)
    result_path: str  # rank 0 writes the TrainResult numbers here
    model_extra: dict = field(default_factory=dict)  # extra config.json entries of the model directory

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2))
        return path

    @classmethod
    def read(cls, path: Path) -> TrainJob:
        return cls(**json.loads(Path(path).read_text()))


def launch_command(cfg: TrainConfig, job_path: Path, master_port: int) -> list[str]:
    """The launcher command line that starts every rank of `cfg` on `python -m lm_core.launch job_path`."""
    if cfg.launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(cfg.nproc_per_node),
                "--master_addr", "127.0.0.1", "--master_port", str(master_port), "-m", "lm_core.launch", str(job_path)]
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_accelerators", str(cfg.nproc_per_node),
               "--master_port", str(master_port), "--no_local_rank", "--module"]
    if cfg.hostfile:
        # every node of the hostfile; the first one hosts rank 0 and the rendezvous
        hosts = read_hostfile(cfg.hostfile)
        command[3:3] = ["--hostfile", str(Path(cfg.hostfile).resolve()), "--num_nodes", str(len(hosts)),
                        "--master_addr", next(iter(hosts))]
    else:
        command[3:3] = ["--num_nodes", "1", "--master_addr", "127.0.0.1"]
    return command + ["lm_core.launch", str(job_path)]


def run_ranks(job: TrainJob, job_path: Path, on_line: Callable[[str], None] | None = None) -> dict:
    """Train `job` on its ranks through the configured launcher; the result numbers rank 0 wrote."""
    from lm_core.typed_config import build

    cfg = build(TrainConfig, job.train, "train")
    job.write(job_path)
    Path(job.result_path).unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}  # this process may itself be rank 0 of 1
    env.setdefault("OMP_NUM_THREADS", str(job.train.get("num_threads") or 1))
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = launch_command(cfg, job_path, free_port())
    log.info("starting %d ranks: %s", cfg.world_size(), " ".join(command))
    on_line = on_line or (lambda line: log.info("%s", line))
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: a signal reaches every rank
    tail: list[str] = []
    forwarded = _forward_signals(proc)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail = (tail + [line])[-40:]
            on_line(line)
        code = proc.wait()
    except BaseException:  # e.g. KeyboardInterrupt: let the ranks checkpoint and stop, never orphan them
        _stop(proc)
        raise
    finally:
        forwarded()
    if code != 0 or not Path(job.result_path).is_file():
        if any(f"exitcode: {EXIT_INTERRUPTED}" in line or "TrainingInterrupted" in line for line in tail):
            raise TrainingInterrupted(f"the ranks were stopped and checkpointed in {job.checkpoint_dir}; rerun to resume")
        raise RuntimeError(f"{cfg.launcher} exited with code {code} before rank 0 wrote {job.result_path}; "
                           "its last lines:\n" + "\n".join(tail[-20:]))
    return json.loads(Path(job.result_path).read_text())


def _forward_signals(proc: subprocess.Popen) -> Callable[[], None]:
    """Pass SIGTERM/SIGINT on to the ranks' process group (they checkpoint and exit), instead of dying and
    leaving them running; returns the function that restores the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # handlers can only be set from the main thread; _stop still runs on exceptions

    def forward(signum, frame) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def _stop(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()



def resume_step(job: TrainJob) -> int | None:
    """The step the job resumes from (its latest checkpoint), or None for a fresh start."""
    tag = latest_tag(Path(job.checkpoint_dir))
    return None if tag is None else int(tag.removeprefix("step"))


def prepare_history(job: TrainJob) -> None:
    """Before a (resumed) job starts: its history keeps the rows up to the checkpoint it resumes from. The
    caller runs this once, before any rank starts (rank 0 then appends to the same file)."""
    if (step := resume_step(job)) is not None:
        truncate_history(Path(job.history_path), step)


def train_job(job: TrainJob, progress: Callable[[dict], None] | None = None, tracker: Tracker | None = None):
    """This rank's part of `job` (all of it at world size 1, in the caller's process): train, and on rank 0
    save the model directory. Rank 0 reports to TensorBoard, the JSONL history and `tracker` (e.g. the
    caller's MLflow run); the other ranks report nothing. Returns the TrainResult."""
    from lm_core.engine import train
    from lm_core.model import GPTConfig
    from lm_core.shards import open_documents, open_split
    from lm_core.tracking import JsonlTracker, MultiTracker, TensorBoardTracker
    from lm_core.typed_config import build
    from lm_core.weights import save_model_dir

    rank = int(os.environ.get("RANK", "0"))
    model_cfg, cfg = build(GPTConfig, job.model, "model"), build(TrainConfig, job.train, "train")
    shard_dir = Path(job.shard_dir)
    train_shards = open_split(shard_dir, "train", job.tokenizer_sha256)
    val_shards = open_split(shard_dir, "val", job.tokenizer_sha256)
    resumed = resume_step(job)
    reporters = (TensorBoardTracker(Path(job.tensorboard_dir), purge_step=None if resumed is None else resumed + 1),
                 JsonlTracker(Path(job.history_path)), *([tracker] if tracker is not None else [])) if rank == 0 else ()
    trackers = MultiTracker(*reporters)
    try:
        result = train(model_cfg, cfg, train_shards, val_shards, Path(job.checkpoint_dir), trackers,
                       progress=progress if rank == 0 else None, bos_id=job.bos_id,
                       documents=open_documents(shard_dir, "train", job.tokenizer_sha256))
    finally:
        for reporter in reporters[:2]:  # the caller closes its own tracker
            reporter.close()
    if rank == 0:
        save_model_dir(result.model, Path(job.tokenizer_path), Path(job.model_dir), extra=job.model_extra)
    return result


def main(argv: list[str] | None = None) -> int:
    """One rank started by the launcher: `train_job`, then rank 0 writes the result numbers for run_ranks."""
    import torch

    args = list(sys.argv[1:] if argv is None else argv)
    job = TrainJob.read(Path(args[-1]))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = train_job(job, progress=_print_progress)
    except TrainingInterrupted as exc:
        print(f"TrainingInterrupted: {exc}", flush=True)
        return EXIT_INTERRUPTED
    if int(os.environ.get("RANK", "0")) == 0:
        # not dataclasses.asdict: it would deep-copy the model
        numbers = {f.name: getattr(result, f.name) for f in dataclasses.fields(result) if f.name not in ("model", "events")}
        numbers["world_size"] = torch.distributed.get_world_size()
        tmp = Path(job.result_path + ".tmp")
        tmp.write_text(json.dumps(numbers))
        os.replace(tmp, job.result_path)
    torch.distributed.barrier()
    return 0


def _print_progress(m: dict) -> None:
    print(f"pretrain step {m['step']}/{m['max_steps']} loss {m['train/loss']:.4f} lr {m['train/lr']:.2e} "
          f"grad_norm {m['train/grad_norm']:.3f} tokens/s {m['train/tokens_per_s']:.0f}"
          + (f" val_loss {m['val/loss']:.4f}" if "val/loss" in m else ""), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
