"""The pretrain stage on 2 ranks: it starts them through torchrun or DeepSpeed's launcher, rank 0 writes the
stage's outputs, the consolidated weights load, and training matches a 1-rank run of the same config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lm_core.weights import load_model_dir
from pipelines.config import load_config
from pipelines.stages import pretrain
from pipelines.stages.runner import run_pipeline
from pipelines.workspace import Workspace


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """The tiny pipeline up to pretrain, in-process (world size 1): the reference and the shared upstream."""
    ws = tmp_path_factory.mktemp("ranks") / "ws"
    cfg = load_config("tiny", [f"workspace={ws}", "train.precision=fp32"])
    return cfg, run_pipeline(cfg, only="pretrain")


@pytest.mark.slow
@pytest.mark.parametrize("launcher,zero_stage", [("torchrun", 3), ("deepspeed", 2)])
def test_pretrain_stage_on_two_ranks(one_rank, launcher, zero_stage):
    cfg1, r1 = one_rank
    overrides = [f"workspace={cfg1.workspace}", "train.precision=fp32", "train.nproc_per_node=2",
                 f"train.launcher={launcher}", f"train.zero_stage={zero_stage}"]
    fault = launcher == "deepspeed"  # this run also skips a corrupted batch, whose event names its documents
    if fault:
        overrides += ["train.stability.min_history=8", "train.stability.inject_fault=corrupt_batch@24"]
    cfg = load_config("tiny", overrides)
    r = run_pipeline(cfg, only="pretrain")
    assert r["shard"].key == r1["shard"].key and r["pretrain"].key != r1["pretrain"].key  # upstream reused
    m = r["pretrain"].metrics
    assert m["world_size"] == 2 and m["steps"] == cfg.train.max_steps
    # the same global batch split over 2 ranks instead of 2 accumulation steps: the same training
    assert math.isclose(m["final_train_loss"], r1["pretrain"].metrics["final_train_loss"], rel_tol=0.02 if not fault else 0.1)
    if fault:
        with Workspace(cfg.workspace).duckdb(read_only=True) as con:
            (doc_ids,) = con.execute("SELECT doc_ids FROM training_events WHERE pretrain_key = ? AND action = 'skip_update'",
                                     [r["pretrain"].key]).fetchone()
            ids = json.loads(doc_ids)
            # both ranks' 16 windows of 65 tokens: documents of the catalog's train split
            known = con.execute("SELECT count(*) FROM documents WHERE doc_id IN (SELECT unnest(?::VARCHAR[]))", [ids]).fetchone()
        assert len(ids) >= 8 and known == (len(ids),)
    model, _ = load_model_dir(pretrain.model_dir(r["pretrain"]))
    if zero_stage == 3:  # the saved model is DeepSpeed's own fp32 consolidation of the sharded checkpoint
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        consolidated = get_fp32_state_dict_from_zero_checkpoint(m["checkpoint_dir"])
        state = model.state_dict()
        for name, tensor in consolidated.items():
            assert torch.equal(tensor, state[name]), name
    history = (r["pretrain"].dir / pretrain.HISTORY_FILE).read_text()
    assert '"train/loss"' in history  # rank 0 reported; the other rank wrote nothing
    assert len(list(Path(m["tensorboard_dir"]).glob("events.out.tfevents*"))) == 1  # one writer: rank 0


def test_launch_commands(tmp_path):
    from lm_core.launch import launch_command
    from lm_core.train_config import TrainConfig

    job = tmp_path / "job.json"
    torchrun = launch_command(TrainConfig(nproc_per_node=4), job, 29500)
    assert torchrun[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node" in torchrun
    assert torchrun[-3:] == ["-m", "lm_core.launch", str(job)]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-a slots=8\nnode-b slots=8\n")
    cfg = TrainConfig(nproc_per_node=8, global_batch_size=16, micro_batch_size=1, launcher="deepspeed", hostfile=str(hostfile))
    assert cfg.world_size() == 16
    ds = launch_command(cfg, job, 29500)
    assert ds[1:3] == ["-m", "deepspeed.launcher.runner"]
    assert ds[ds.index("--hostfile") + 1] == str(hostfile) and ds[ds.index("--num_nodes") + 1] == "2"
    assert ds[ds.index("--master_addr") + 1] == "node-a" and ds[-3:] == ["--module", "lm_core.launch", str(job)]


@pytest.mark.parametrize("overrides,message", [
    (dict(hostfile="x", launcher="torchrun"), "train.hostfile needs DeepSpeed's launcher"),
    (dict(hostfile="/nonexistent/hostfile", launcher="deepspeed"), "does not exist"),
    (dict(nproc_per_node=3), "micro_batch_size*world_size=8*3"),
    (dict(launcher="mpirun"), "set train.launcher to torchrun or deepspeed"),
])
def test_launch_config_errors(overrides, message):
    from lm_core.train_config import TrainConfig

    with pytest.raises(ValueError) as err:
        TrainConfig(micro_batch_size=8, global_batch_size=16, **overrides).validate()
    assert message in str(err.value)


def test_bad_hostfile_line_is_named(tmp_path):
    from lm_core.train_config import read_hostfile

    path = tmp_path / "hostfile"
    path.write_text("node-a slots=2\nnode-b 4\n")
    with pytest.raises(ValueError, match=r"hostfile:2: 'node-b 4' is not `hostname slots=N`"):
        read_hostfile(path)


@pytest.mark.slow
def test_sigterm_reaches_every_rank_then_the_same_command_resumes(tmp_path):
    """SIGTERM to the pipeline: the ranks checkpoint and stop (none is left running), the command exits 75
    saying how to resume, and running it again continues from that checkpoint."""
    import os
    import signal
    import subprocess
    import sys
    import time

    ws = tmp_path / "ws"
    command = [sys.executable, "-m", "pipelines", "-c", "tiny", f"workspace={ws}", "train.nproc_per_node=2",
               "train.max_steps=120", "train.checkpoint_every=20", "--only", "pretrain"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list(ws.glob("checkpoints/*/step00000020")):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint at step 20"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "stopped" in err and "rerun to resume" in err
    ranks = subprocess.run(["pgrep", "-f", str(ws)], capture_output=True, text=True).stdout.split()
    assert ranks == [], "ranks outlived the pipeline"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (result,) = ws.glob("artifacts/pretrain/*/ranks_result.json")
    numbers = json.loads(result.read_text())
    assert numbers["resumed_from_step"] >= 20 and numbers["steps"] == 120


@pytest.mark.slow
def test_bf16_on_two_ranks_exports_the_gathered_fp32_masters(one_rank):
    """DeepSpeed bf16 under ZeRO-2 on 2 ranks: each rank steps its half of the fp32 master weights; the
    exported model gathers both halves (not the bf16 copies the forward ran on) and learned like fp32 did."""
    cfg1, r1 = one_rank
    cfg = load_config("tiny", [f"workspace={cfg1.workspace}", "train.precision=bf16", "train.nproc_per_node=2",
                               "train.zero_stage=2"])
    r = run_pipeline(cfg, only="pretrain")
    m = r["pretrain"].metrics
    assert m["world_size"] == 2
    assert math.isclose(m["final_train_loss"], r1["pretrain"].metrics["final_train_loss"], rel_tol=0.05)
    model, _ = load_model_dir(pretrain.model_dir(r["pretrain"]))
    params = list(model.parameters())
    assert all(p.dtype == torch.float32 for p in params)
    assert sum(not torch.equal(p, p.bfloat16().float()) for p in params) >= len(params) // 2
    history = [json.loads(line) for line in (r["pretrain"].dir / pretrain.HISTORY_FILE).read_text().splitlines()]
    ratios = [h["metrics"]["train/update_ratio"] for h in history if "train/update_ratio" in h.get("metrics", {})]
    assert ratios and all(0 < x < 1 for x in ratios)  # summed over both ranks' partitions
