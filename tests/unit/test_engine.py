"""Unit tests for lm_core.engine: TrainConfig arithmetic, the DeepSpeed JSON, and the real training loop.

The training tests run DeepSpeed in this process (world size 1, gloo) on a 2-layer model and a
learnable token stream, several times in one process.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from shard_fixtures import write_counting_shards

from lm_core.engine import train
from lm_core.model import GPT, GPTConfig
from lm_core.shards import open_split
from lm_core.stability import StabilityConfig
from lm_core.tracking import JsonlTracker, read_history
from lm_core.train_config import TrainConfig, deepspeed_config
from lm_core.train_metrics import update_ratio

# --- TrainConfig ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(micro_batch_size=0), "train.micro_batch_size=0 must be >= 1"),
        (dict(max_steps=0, warmup_steps=0), "train.max_steps=0 must be >= 1"),
        (dict(keep_checkpoints=0), "train.keep_checkpoints=0 must be >= 1"),
        (dict(micro_batch_size=3, global_batch_size=8),
         "train.global_batch_size=8 is not divisible by train.micro_batch_size=3; "
         "set train.global_batch_size to a multiple of 3"),
        (dict(zero_stage=4), "train.zero_stage=4 must be one of 0, 1, 2, 3"),
        (dict(lr=0.0), "train.lr=0.0 must be > 0"),
        (dict(min_lr_ratio=1.5), "train.min_lr_ratio=1.5 in [0, 1]"),
        (dict(warmup_steps=20, max_steps=10), "train.warmup_steps=20 must be in [0, train.max_steps=10]"),
        (dict(warmup_steps=-1), "train.warmup_steps=-1 must be in [0"),
        (dict(precision="fp16", zero_stage=0), "train.precision=fp16 needs train.zero_stage >= 1"),
    ],
)
def test_validate_messages(overrides, message):
    with pytest.raises(ValueError) as err:
        TrainConfig(**overrides).validate()
    assert message in str(err.value)


def test_defaults_are_valid():
    TrainConfig().validate()


def test_lr_multiplier_warmup_then_cosine():
    cfg = TrainConfig(warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert cfg.lr_multiplier(0) == pytest.approx(1 / 10)
    assert cfg.lr_multiplier(4) == pytest.approx(5 / 10)
    assert cfg.lr_multiplier(9) == pytest.approx(1.0)
    assert cfg.lr_multiplier(10) == pytest.approx(1.0)
    assert cfg.lr_multiplier(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert cfg.lr_multiplier(110) == pytest.approx(0.1)
    assert cfg.lr_multiplier(500) == pytest.approx(0.1)  # clamped past the end
    values = [cfg.lr_multiplier(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay after warmup


def test_lr_multiplier_without_warmup():
    cfg = TrainConfig(warmup_steps=0, max_steps=10, min_lr_ratio=0.0)
    assert cfg.lr_multiplier(0) == pytest.approx(1.0)
    assert cfg.lr_multiplier(10) == pytest.approx(0.0)


def test_grad_accum_steps():
    cfg = TrainConfig(micro_batch_size=4, global_batch_size=16)
    assert cfg.grad_accum_steps(1) == 4
    assert cfg.grad_accum_steps(2) == 2
    assert cfg.grad_accum_steps(4) == 1
    with pytest.raises(ValueError) as err:
        cfg.grad_accum_steps(3)
    assert "train.global_batch_size=16 is not divisible by micro_batch_size*world_size=4*3" in str(err.value)
    assert "multiple of 12" in str(err.value)


def test_deepspeed_config_is_derived():
    cfg = TrainConfig(micro_batch_size=4, global_batch_size=32, grad_clip=0.5, zero_stage=2)
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 32
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4  # 32 / (4 * 2)
    assert ds["train_batch_size"] == (ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2)
    # clipping and the NaN check are the gated optimizer's, on the device: DeepSpeed's read the norm every step
    assert ds["gradient_clipping"] == 0.0 and ds["bf16"]["check_grad_overflow"] is False
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 5_000_000, "allgather_bucket_size": 5_000_000,
                                       "compute_grad_norm": False}
    with pytest.raises(ValueError, match="multiple of 12"):
        deepspeed_config(cfg, world_size=3)


def test_deepspeed_config_for_a_gpu():
    """On CUDA: DeepSpeed's large buckets, overlapped contiguous reduction with several ranks, and ZeRO-3's
    defaults for live parameters (fetch less); an explicit bucket size wins."""
    ds = deepspeed_config(TrainConfig(zero_stage=3, global_batch_size=32), world_size=2, device_type="cuda")
    zero = ds["zero_optimization"]
    assert zero["reduce_bucket_size"] == 500_000_000 and zero["overlap_comm"] and zero["contiguous_gradients"]
    assert "stage3_max_live_parameters" not in zero and zero["stage3_prefetch_bucket_size"] == 50_000_000
    assert deepspeed_config(TrainConfig(zero_stage=1), 1, "cuda")["zero_optimization"]["overlap_comm"] is False
    cpu = deepspeed_config(TrainConfig(zero_stage=3, zero_bucket_elements=1000), 1)["zero_optimization"]
    assert cpu["stage3_max_live_parameters"] == 1000 and "overlap_comm" not in cpu


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_deepspeed_precision_modes_follow_train_precision(precision):
    ds = deepspeed_config(TrainConfig(precision=precision, zero_stage=2), world_size=1)
    assert ds["bf16"]["enabled"] == (precision == "bf16")
    assert ds.get("fp16", {}).get("enabled", False) == (precision == "fp16")
    if precision == "fp16":
        assert ds["fp16"]["loss_scale"] == 0  # dynamic
    # ZeRO-2 accumulates 16-bit gradients in fp32 (its partition is the optimizer's fp32 gradient)
    assert ds.get("data_types") == (None if precision == "fp32" else {"grad_accum_dtype": "fp32"})


def test_fp16_is_refused_where_deepspeed_has_no_fp16_kernels(tmp_path):
    from deepspeed.accelerator import get_accelerator

    from lm_core.zero_adapter import precision_problem

    if get_accelerator().is_fp16_supported():
        pytest.skip("this machine's DeepSpeed accelerator runs fp16")
    assert "train.precision=fp16 needs a device with fp16 kernels" in precision_problem("fp16")
    assert precision_problem("bf16") is None and precision_problem("fp32") is None
    with pytest.raises(ValueError, match="set train.precision=bf16"):
        train(MODEL, train_config(precision="fp16", zero_stage=1), [], None, tmp_path / "ckpt", JsonlTracker(tmp_path / "h.jsonl"))
    assert not (tmp_path / "ckpt").exists()  # refused before any work


@pytest.mark.parametrize("fused", [True, False])
def test_update_ratio_is_rebuilt_from_the_optimizer_state(fused):
    """The update/param ratio from AdamW's moments equals the one from a copy of the weights before the step."""
    torch.manual_seed(0)
    model = GPT(MODEL)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-3, fused=fused)
    for _ in range(3):
        tokens = torch.randint(0, VOCAB, (4, 17))
        model(tokens[:, :-1], tokens[:, 1:])[1].backward()
        before = [p.detach().clone() for p in model.parameters()]
        lrs = [g["lr"] for g in opt.param_groups]
        opt.step()
        opt.zero_grad()
        moved = math.sqrt(sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(model.parameters(), before)))
        expected = moved / math.sqrt(sum(float(b.pow(2).sum()) for b in before))
        tensors = [(p, i) for i, g in enumerate(opt.param_groups) for p in g["params"]]
        assert update_ratio(opt, tensors, lrs, partitioned=False, world_size=1, chunk=100) == pytest.approx(expected, rel=1e-5)


# --- the training loop --------------------------------------------------------------------------

VOCAB, BLOCK = 64, 32
MODEL = GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32)


def train_config(**overrides) -> TrainConfig:
    base = dict(micro_batch_size=4, global_batch_size=8, max_steps=40, warmup_steps=4, lr=3e-3, log_every=10,
                eval_every=20, eval_windows=2, checkpoint_every=20, keep_checkpoints=1, num_threads=1,
                precision="fp32")
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Documents that count upward mod 60 from a random start: learnable (next = this + 1), never trivial."""
    out = write_counting_shards(tmp_path_factory.mktemp("shards"), VOCAB)
    return open_split(out, "train"), open_split(out, "val")


@pytest.fixture(autouse=True)
def restore_torch_threads():
    # train() sets torch's intra-op thread count for the whole process
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_train(cfg, shards, ckpt, history):
    tracker = JsonlTracker(history)
    try:
        return train(MODEL, cfg, shards[0], shards[1], ckpt, tracker)
    finally:
        tracker.close()


def metric(history, name):
    return [(h["step"], h["metrics"][name]) for h in history if name in h.get("metrics", {})]


@pytest.mark.slow
def test_train_learns_logs_and_checkpoints(shards, tmp_path):
    ckpt, history_path = tmp_path / "ckpt", tmp_path / "history.jsonl"
    result = run_train(train_config(), shards, ckpt, history_path)
    history = read_history(history_path)

    losses = metric(history, "train/loss")
    assert [s for s, _ in losses] == [10, 20, 30, 40]
    assert losses[-1][1] < losses[0][1] - 0.5
    assert losses[-1][1] < math.log(VOCAB) - 1.0  # far below the uniform guess
    lrs = dict(metric(history, "train/lr"))
    cfg = train_config()
    # each logged lr is the rate the logged step trained with (step 40 is optimizer step index 39)
    assert lrs[40] == pytest.approx(cfg.lr * cfg.lr_multiplier(39))
    assert lrs[10] == pytest.approx(cfg.lr * cfg.lr_multiplier(9))
    assert all(math.isfinite(v) and v > 0 for _, v in metric(history, "train/grad_norm"))
    assert all(v > 0 for _, v in metric(history, "train/tokens_per_s"))
    val = metric(history, "val/loss")
    assert {s for s, _ in val} == {20, 40}
    assert val[-1][1] < val[0][1]

    assert result.steps == 40 and result.tokens == 40 * 8 * BLOCK and result.resumed_from_step == 0
    assert result.final_loss == pytest.approx(losses[-1][1])
    assert result.final_val_loss == pytest.approx(val[-1][1])

    step_dirs = sorted(p.name for p in ckpt.glob("step*") if p.is_dir())
    assert step_dirs == ["step00000040"]  # keep_checkpoints=1 removed step 20
    assert (ckpt / "latest").read_text().strip() == "step00000040"

    model = result.model
    assert isinstance(model, GPT) and not model.training
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    assert model.lm_head.weight is model.wte.weight


@pytest.mark.slow
def test_resume_from_checkpoint(shards, tmp_path):
    ckpt = tmp_path / "ckpt"
    first = run_train(train_config(max_steps=20, checkpoint_every=0), shards, ckpt, tmp_path / "a.jsonl")
    assert first.resumed_from_step == 0
    second = run_train(train_config(max_steps=40), shards, ckpt, tmp_path / "b.jsonl")
    assert second.resumed_from_step == 20 and second.steps == 40
    logged = [h["step"] for h in read_history(tmp_path / "b.jsonl") if "train/loss" in h["metrics"]]
    assert logged == [30, 40]  # only the new steps ran
    assert sorted(p.name for p in ckpt.glob("step*") if p.is_dir()) == ["step00000040"]


@pytest.mark.slow
def test_resume_is_exact(shards, tmp_path):
    """Stopping at step 20 and resuming gives the same model as training straight through."""
    straight = tmp_path / "straight"
    full = run_train(train_config(keep_checkpoints=2), shards, straight, tmp_path / "full.jsonl")
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(straight / "step00000020", resumed_dir / "step00000020")
    (resumed_dir / "latest").write_text("step00000020")
    resumed = run_train(train_config(keep_checkpoints=2), shards, resumed_dir, tmp_path / "resumed.jsonl")
    assert resumed.resumed_from_step == 20
    assert resumed.final_loss == pytest.approx(full.final_loss, rel=1e-5)
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_rerun_of_a_finished_run_reports_its_loss(shards, tmp_path):
    ckpt = tmp_path / "ckpt"
    done = run_train(train_config(max_steps=10, checkpoint_every=0), shards, ckpt, tmp_path / "a.jsonl")
    again = run_train(train_config(max_steps=10, checkpoint_every=0), shards, ckpt, tmp_path / "b.jsonl")
    assert again.resumed_from_step == 10
    assert again.final_loss == pytest.approx(done.final_loss)


# --- schedules, options, ZeRO stages ------------------------------------------------------------


def test_lr_multiplier_warmup_stable_decay():
    cfg = TrainConfig(schedule="wsd", warmup_steps=10, max_steps=110, decay_fraction=0.2, min_lr_ratio=0.0)
    assert cfg.lr_multiplier(4) == pytest.approx(5 / 10)
    assert [cfg.lr_multiplier(s) for s in (10, 50, 87)] == [1.0, 1.0, 1.0]  # stable until step 88
    assert cfg.lr_multiplier(88) == pytest.approx(1.0)
    assert cfg.lr_multiplier(99) == pytest.approx(0.5)  # halfway through the 22-step linear decay
    assert cfg.lr_multiplier(110) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="train.schedule='step' is not supported; set train.schedule to cosine or wsd"):
        TrainConfig(schedule="step").validate()
    with pytest.raises(ValueError, match=r"train.decay_fraction=1.5 must be in \[0, 1\]"):
        TrainConfig(decay_fraction=1.5).validate()


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = GPT(MODEL)
    idx = torch.randint(0, VOCAB, (2, BLOCK + 1))
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.activation_checkpointing = flag
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("stage, precision", [(2, "fp32"), (3, "fp32"), (2, "bf16")])
def test_zero_checkpoints_resume_exactly(shards, tmp_path, stage, precision):
    """ZeRO-2/3 checkpoints save and reload: 6 steps straight equal 3 steps + resume to 6 (CPU); in bf16
    the checkpoint carries the fp32 master weights, so resuming is exact there too."""
    cfg = dict(zero_stage=stage, max_steps=6, warmup_steps=1, log_every=3, eval_every=0, checkpoint_every=3,
               keep_checkpoints=3, precision=precision)
    full = run_train(train_config(**cfg), shards, tmp_path / "full", tmp_path / "full.jsonl")
    (tmp_path / "part").mkdir()
    shutil.copytree(tmp_path / "full" / "step00000003", tmp_path / "part" / "step00000003")
    (tmp_path / "part" / "latest").write_text("step00000003")
    resumed = run_train(train_config(**cfg), shards, tmp_path / "part", tmp_path / "part.jsonl")
    assert resumed.resumed_from_step == 3
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 3])
def test_bf16_trains_bf16_weights_and_hands_back_the_fp32_masters(shards, tmp_path, stage):
    """precision=bf16 is DeepSpeed's bf16 mode: the forward runs on bf16 parameters, the optimizer steps fp32
    master weights (ZeRO-partitioned from stage 1), and the model handed back holds those masters."""
    cfg = train_config(precision="bf16", zero_stage=stage, max_steps=30, eval_every=0, checkpoint_every=0)
    result = run_train(cfg, shards, tmp_path / "ckpt", tmp_path / "h.jsonl")
    history = read_history(tmp_path / "h.jsonl")
    losses = metric(history, "train/loss")
    assert losses[-1][1] < losses[0][1] - 0.5, losses
    ratios = metric(history, "train/update_ratio")  # every stage, ZeRO-3 included
    assert [s for s, _ in ratios] == [10, 20, 30] and all(0 < r < 1 for _, r in ratios)
    params = list(result.model.parameters())
    assert all(p.dtype == torch.float32 for p in params)
    # the masters carry more bits than bf16: rounding them to bf16 changes them
    assert any(not torch.equal(p, p.bfloat16().float()) for p in params)
    assert result.final_val_loss is not None and math.isfinite(result.final_val_loss)


@pytest.mark.slow
def test_fp16_loss_scaling_absorbs_an_overflow(shards, tmp_path, monkeypatch):
    """fp16 (GPU in production) through DeepSpeed's real fp16 ZeRO-2 path with dynamic loss scaling. This CPU
    has fp16 ops but not the oneDNN fp16 kernels DeepSpeed's CPU accelerator asks for, so the test lifts
    only that capability check. Gradients blown up 1e6x at step 5 overflow at loss scale 2^16: DeepSpeed
    skips that step and the run logs it as loss scaling at work, not as a spike to roll back."""
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: True)
    cfg = train_config(precision="fp16", zero_stage=2, max_steps=30, log_every=5, eval_every=0, checkpoint_every=0,
                       stability=StabilityConfig(inject_fault="grad_spike@5"))
    result = run_train(cfg, shards, tmp_path / "ckpt", tmp_path / "h.jsonl")
    history = read_history(tmp_path / "h.jsonl")
    losses = metric(history, "train/loss")
    assert losses[-1][1] < losses[0][1] - 0.5, losses
    kinds = [e["kind"] for e in result.events]
    assert kinds == ["injected_fault", "loss_scale_overflow"], result.events
    overflow = result.events[1]
    assert overflow["step"] == 6 and overflow["action"] == "skip_update" and "loss scale 65536" in overflow["detail"]
    assert result.skipped_steps == 0 and result.rollbacks == 0  # the detector did not count it
    assert dict(metric(history, "train/update_ratio"))[5] > 0
    scales = dict(metric(history, "train/loss_scale"))
    assert scales[5] == 65536.0 and scales[30] <= 65536.0
    grad_norms = [v for _, v in metric(history, "train/grad_norm")]
    assert all(0 < v < 100 for v in grad_norms), grad_norms  # unscaled: the loss scale is divided out
    assert all(p.dtype == torch.float32 for p in result.model.parameters())


def test_document_attention_needs_bos_id(shards, tmp_path):
    with pytest.raises(ValueError, match="bos_id"):
        run_train(train_config(document_attention=True), shards, tmp_path / "ckpt", tmp_path / "h.jsonl")


@pytest.mark.slow
def test_document_attention_trains(shards, tmp_path):
    # each window packs several counting documents; with attention kept inside documents the model still
    # learns next = this + 1, and the run differs from one whose attention crosses document starts
    cfg = train_config(document_attention=True, eval_every=0, checkpoint_every=0)
    tracker = JsonlTracker(tmp_path / "h.jsonl")
    try:
        result = train(MODEL, cfg, shards[0], shards[1], tmp_path / "ckpt", tracker, bos_id=1)
    finally:
        tracker.close()
    losses = metric(read_history(tmp_path / "h.jsonl"), "train/loss")
    assert losses[-1][1] < losses[0][1] - 0.5, losses
    plain = run_train(train_config(eval_every=0, checkpoint_every=0), shards, tmp_path / "ck2",
                      tmp_path / "h2.jsonl")
    assert not torch.equal(result.model.wte.weight, plain.model.wte.weight)


@pytest.mark.slow
def test_compile_runs_inside_the_engine(shards, tmp_path):
    """train.compile compiles the module DeepSpeed runs (DeepSpeed's own compile, static shapes, tried on one
    batch of the training shape): no fallback, and the same losses as eager up to kernel rounding."""
    cfg = dict(precision="bf16", zero_stage=1, max_steps=4, log_every=2, eval_every=0, checkpoint_every=0)
    eager = run_train(train_config(**cfg), shards, tmp_path / "eager", tmp_path / "eager.jsonl")
    compiled = run_train(train_config(**cfg, compile=True), shards, tmp_path / "compiled", tmp_path / "compiled.jsonl")
    assert not [e for e in compiled.events if e["kind"] == "compile_fallback"]
    a = [v for _, v in metric(read_history(tmp_path / "eager.jsonl"), "train/loss")]
    b = [v for _, v in metric(read_history(tmp_path / "compiled.jsonl"), "train/loss")]
    assert b == pytest.approx(a, rel=1e-3) and eager.final_val_loss == pytest.approx(compiled.final_val_loss, rel=1e-3)


def test_compile_failure_falls_back_to_eager_with_a_reason(shards, tmp_path, monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("no compiler backend here")

    monkeypatch.setattr(torch.nn.Module, "compile", broken)
    result = run_train(train_config(compile=True, max_steps=2, log_every=1, eval_every=0, checkpoint_every=0),
                       shards, tmp_path / "ckpt", tmp_path / "h.jsonl")
    fallback = [e for e in result.events if e["kind"] == "compile_fallback"]
    assert len(fallback) == 1 and "no compiler backend here" in fallback[0]["detail"] and result.steps == 2


def test_zero3_builds_the_model_partitioned_with_the_plain_init():
    """ZeRO-3 builds the GPT inside deepspeed.zero.Init (no rank ever holds the whole model) and fills each
    module gathered, in GPT.init_weights' order: the same weights as a plain build from the same seed."""
    import deepspeed

    from lm_core.zero_adapter import build_model, init_distributed

    init_distributed()
    torch.manual_seed(0)
    plain = GPT(MODEL)
    torch.manual_seed(0)
    partitioned = build_model(MODEL, train_config(zero_stage=3), 1, torch.device("cpu"))
    params = dict(partitioned.named_parameters())
    assert all(p.numel() == 0 for p in params.values())  # partitioned: the data lives in ds_tensor
    with deepspeed.zero.GatheredParameters(list(params.values())):
        for name, param in plain.named_parameters():
            torch.testing.assert_close(params[name].detach().clone(), param.detach(), msg=name)
