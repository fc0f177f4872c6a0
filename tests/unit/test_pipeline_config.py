"""Unit tests for pipelines.config: YAML + dotted overrides -> a validated PipelineConfig."""

from __future__ import annotations

import pytest

from pipelines.config import CONFIG_DIR, ConfigError, PipelineConfig, SourceConfig, load_config


def test_tiny_config_loads_by_name_and_by_path():
    by_name = load_config("tiny")
    by_path = load_config(CONFIG_DIR / "tiny.yaml")
    assert by_name == by_path
    assert by_name.name == "tiny"
    assert by_name.ingest.sources == [SourceConfig(kind="stdlib", doc_chars=2000, max_docs=300)]
    assert by_name.train.max_steps == 30 and by_name.train.lr == pytest.approx(3e-3)
    # the model takes its vocab size from the tokenizer
    assert by_name.model.vocab_size == by_name.tokenizer.vocab_size == 512


def test_default_config_loads():
    if not (CONFIG_DIR / "default.yaml").is_file():
        pytest.skip("configs/default.yaml does not exist yet")
    cfg = load_config()
    assert isinstance(cfg, PipelineConfig)
    assert cfg == load_config("default")
    assert cfg.model.vocab_size == cfg.tokenizer.vocab_size


def test_dotted_overrides():
    cfg = load_config("tiny", ["train.max_steps=7", "ingest.sources=[{kind: stdlib}]", "eval.sampling.top_k=3",
                               "tokenizer.vocab_size=1024", "name=renamed"])
    assert cfg.train.max_steps == 7
    assert cfg.ingest.sources == [SourceConfig(kind="stdlib")]
    assert cfg.eval.sampling.top_k == 3
    assert cfg.tokenizer.vocab_size == cfg.model.vocab_size == 1024
    assert cfg.name == "renamed"
    assert load_config("tiny").train.max_steps == 30  # overrides never touch the file's values


def test_unknown_override_key_suggests_the_right_one():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["train.max_step=5"])
    assert "'train.max_step'" in str(err.value)
    assert "did you mean 'train.max_steps'" in str(err.value)


def test_wrong_type_override_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.max_steps must be an integer, got str 'abc'"):
        load_config("tiny", ["train.max_steps=abc"])


def test_exponent_float_override_without_a_dot():
    assert load_config("tiny", ["train.lr=3e-3"]).train.lr == pytest.approx(3e-3)


def test_literal_override_lists_choices():
    with pytest.raises(ConfigError, match=r"train\.precision='fp8' is not allowed; choose one of 'fp32', 'bf16', 'fp16'"):
        load_config("tiny", ["train.precision=fp8"])


def test_vocab_size_mismatch_is_refused():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["model.vocab_size=100"])
    assert "model.vocab_size=100 differs from tokenizer.vocab_size=512" in str(err.value)


def test_global_batch_not_divisible_names_both_keys():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["train.global_batch_size=20"])
    message = str(err.value)
    assert "train.global_batch_size=20" in message and "train.micro_batch_size=8" in message
    assert "multiple of 8" in message


def test_stage_validate_errors_become_config_errors():
    with pytest.raises(ConfigError, match=r"a 'text_dir' source needs 'path'"):
        load_config("tiny", ["ingest.sources=[{kind: text_dir}]"])
    with pytest.raises(ConfigError, match=r"names repeat"):
        load_config("tiny", ["ingest.sources=[{kind: stdlib}, {kind: stdlib}]"])


def test_malformed_overrides():
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        load_config("tiny", ["train.max_steps"])
    with pytest.raises(ConfigError, match="'name' is not a section"):
        load_config("tiny", ["name.x=1"])


def test_unknown_config_name_lists_known_ones():
    with pytest.raises(ConfigError) as err:
        load_config("no-such-config")
    assert "'no-such-config' not found" in str(err.value) and "tiny" in str(err.value)


def test_yaml_file_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(path)


def test_config_hash_stable_sensitive_and_independent_of_workspace():
    base = load_config("tiny")
    assert base.config_hash() == load_config("tiny").config_hash()
    assert len(base.config_hash()) == 16
    assert load_config("tiny", ["train.max_steps=31"]).config_hash() != base.config_hash()
    assert load_config("tiny", ["model.n_layer=3"]).config_hash() != base.config_hash()
    assert load_config("tiny", ["workspace=/somewhere/else"]).config_hash() == base.config_hash()


def test_model_preset_on_the_command_line_replaces_the_files_model_shape():
    cfg = load_config("tiny", ["model.preset=gpt2-124m", "model.n_layer=2"])
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size) == (2, 12, 768, 1024)
    assert cfg.model.pos == "learned" and cfg.model.vocab_size == cfg.tokenizer.vocab_size == 512


def test_model_keys_next_to_a_preset_in_a_file_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: c\nmodel:\n  preset: gpt2-350m\n  block_size: 256\n")
    cfg = load_config(str(path))
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.block_size) == (24, 1024, 256)
    with pytest.raises(ConfigError, match="model.preset='big' is not a preset"):
        load_config("tiny", ["model.preset=big"])


def test_fp16_on_a_machine_without_fp16_kernels_is_refused_before_any_stage(tmp_path):
    from deepspeed.accelerator import get_accelerator

    from pipelines.stages import pretrain

    if get_accelerator().is_fp16_supported():
        pytest.skip("this machine's DeepSpeed accelerator runs fp16")
    cfg = load_config("tiny", [f"workspace={tmp_path / 'ws'}", "train.precision=fp16"])
    with pytest.raises(ConfigError, match="train.precision=fp16 needs a device with fp16 kernels"):
        pretrain.preflight(cfg)
    assert not (tmp_path / "ws").exists()
