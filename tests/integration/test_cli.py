"""The `lmforge` command as a user runs it (a subprocess): bad input stops before any work with one
`lmforge: error: ...` line naming the problem and the fix; the happy path runs and samples."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from process_fixtures import lmforge

from pipelines.config import load_config

pytestmark = pytest.mark.integration



def error_line(done: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in done.stderr, f"a traceback instead of an error message:\n{done.stderr[-3000:]}"
    lines = [line for line in done.stderr.splitlines() if line.startswith("lmforge: error: ")]
    assert len(lines) == 1, f"expected one 'lmforge: error:' line on stderr, got:\n{done.stderr[-3000:]}"
    return lines[0]


# --- bad input: exit 2 before any work -------------------------------------------------------------


def _corpus(tmp_path: Path, kind: str) -> Path:
    corpus = tmp_path / f"corpus-{kind}"
    corpus.mkdir()
    if kind == "empty_txt":
        (corpus / "empty.txt").write_text("")
    elif kind == "no_txt":
        (corpus / "notes.md").write_text("Markdown, not text: the glob **/*.txt matches nothing here.\n" * 5)
    elif kind == "blank_txt":
        (corpus / "blank.txt").write_text("   \n\n\t\n  \n")
    return corpus


BAD_INPUT = [
    pytest.param(["run", "--no-prefect", "train.max_step=5"], None,
                 ["'train.max_step'", "did you mean", "'train.max_steps'"], id="unknown-key"),
    # the Prefect path must validate before it starts a flow, too
    pytest.param(["run", "train.max_step=5"], None, ["'train.max_step'", "did you mean"], id="unknown-key-flow"),
    pytest.param(["run", "--no-prefect", "train.max_steps=abc"], None,
                 ["train.max_steps", "integer", "abc"], id="wrong-type"),
    pytest.param(["run", "--no-prefect", "train.max_steps=-1"], None, ["train.max_steps=-1", ">= 1"], id="bad-value"),
    pytest.param(["run", "--no-prefect", "trainmax_steps"], None, ["trainmax_steps", "key.path=value"], id="not-an-override"),
    pytest.param(["run", "--no-prefect", "ingest.sources=[{kind: text_dir, path: /nonexistent-lmforge-corpus}]"], None,
                 ["/nonexistent-lmforge-corpus", "does not exist", "ingest.sources"], id="missing-corpus"),
    pytest.param(["run", "--no-prefect"], "empty_txt", ["empty", "corpus-empty_txt"], id="empty-corpus-file"),
    pytest.param(["run", "--no-prefect"], "no_txt", ["no files match", "**/*.txt", "corpus-no_txt"], id="no-corpus-files"),
    pytest.param(["run", "--no-prefect"], "blank_txt", ["empty", "ingest.sources"], id="whitespace-only-corpus"),
    pytest.param(["run", "--no-prefect", "-c", "no-such-config"], None,
                 ["'no-such-config' not found", "default", "tiny"], id="unknown-config-file"),
    pytest.param(["config", "train.max_step=5"], None, ["'train.max_step'", "did you mean"], id="config-unknown-key"),
    pytest.param(["run", "--no-prefect", "ingest.sources=[{kind: "], None, ["not valid YAML", "ingest.sources"],
                 id="bad-yaml-override"),
    pytest.param(["run", "--no-prefect", "eval.max_windows=-1"], None, ["eval.max_windows=-1", ">= 1"], id="max-windows"),
    pytest.param(["run", "--no-prefect", "train.lr=nan"], None, ["train.lr=nan", "finite"], id="lr-nan"),
    pytest.param(["run", "--no-prefect", "train.checkpoint_every=-1"], None, ["train.checkpoint_every=-1", ">= 0"],
                 id="checkpoint-every"),
    pytest.param(["run", "--no-prefect", "ingest.min_chars=-1"], None, ["ingest.min_chars=-1", ">= 0"], id="min-chars"),
    pytest.param(["run", "--no-prefect", "ingest.min_chars=100", "ingest.max_chars=50"], None,
                 ["ingest.max_chars=50", "below ingest.min_chars=100"], id="max-below-min"),
]


@pytest.mark.parametrize("args, corpus_kind, expected", BAD_INPUT)
def test_bad_input_fails_before_any_work(tmp_path, args, corpus_kind, expected):
    ws = tmp_path / "ws"
    args = list(args)
    if "-c" not in args:
        args[1:1] = ["-c", "tiny"]
    if corpus_kind:
        args.append(f"ingest.sources=[{{kind: text_dir, path: {_corpus(tmp_path, corpus_kind)}}}]")
    if args[0] == "run":
        args += ["--workspace", str(ws)]
    done = lmforge(*args, cwd=tmp_path)
    assert done.returncode == 2, f"exit {done.returncode}\n{done.stderr[-3000:]}"
    line = error_line(done)
    for text in expected:
        assert text in line, f"{text!r} not in {line!r}"
    assert not (ws / "catalog.duckdb").exists(), "work started before the input was checked"
    assert not (ws / "artifacts").exists()


def test_a_workspace_that_is_a_file_or_a_damaged_catalog_is_one_line(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    done = lmforge("run", "-c", "tiny", "--no-prefect", "--workspace", tmp_path / "a-file", cwd=tmp_path)
    assert done.returncode == 2 and "is a file, not a directory" in error_line(done)
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "catalog.duckdb").write_bytes(b"DUCK" + bytes(2000))  # what a truncated copy looks like
    done = lmforge("run", "-c", "tiny", "--no-prefect", "--workspace", tmp_path / "ws", cwd=tmp_path)
    line = error_line(done)
    assert done.returncode == 2 and "damaged" in line and "--from ingest" in line
    assert not (tmp_path / "ws" / "artifacts").exists()  # checked before any stage, so a cached run notices too


def test_unexpected_errors_are_one_line_with_the_traceback_kept(capsys):
    from flows.cli import ERROR_LOG, _report
    from lm_core.shards import ShardError

    assert _report(ShardError("shard x is corrupted or truncated; rerun the shard stage")) == 2
    assert capsys.readouterr().err.strip() == "lmforge: error: shard x is corrupted or truncated; rerun the shard stage"
    assert _report(RuntimeError("boom\nsecond line")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmforge: error: RuntimeError: boom second line") and "--debug" in err[0]
    assert "Traceback" in ERROR_LOG.read_text() or "RuntimeError" in ERROR_LOG.read_text()


def test_generate_without_an_export_says_what_to_do(tmp_path):
    done = lmforge("generate", "--workspace", tmp_path / "nothing-here", "--prompt", "def ", cwd=tmp_path)
    assert done.returncode == 2
    line = error_line(done)
    assert "no export" in line and "lmforge run" in line
    assert done.stdout == ""


def test_generate_from_a_directory_that_is_no_model(tmp_path):
    done = lmforge("generate", "--model", tmp_path / "not-a-model", "--prompt", "def ", cwd=tmp_path)
    assert done.returncode == 2
    assert "not an lmforge model directory" in error_line(done)


def test_unknown_stage_is_an_argparse_error(tmp_path):
    done = lmforge("run", "-c", "tiny", "--only", "bogus", "--workspace", tmp_path / "ws", cwd=tmp_path)
    assert done.returncode == 2
    assert "invalid choice: 'bogus'" in done.stderr and "tokenizer" in done.stderr
    assert not (tmp_path / "ws").exists()


# --- help and config -------------------------------------------------------------------------------


def test_help_lists_the_commands(tmp_path):
    done = lmforge("--help", cwd=tmp_path)
    assert done.returncode == 0
    for command in ("run", "generate", "config"):
        assert f"    {command} " in done.stdout, f"--help does not list {command}"
    bare = lmforge(cwd=tmp_path)
    assert bare.returncode == 2 and "usage: lmforge" in bare.stdout


def test_help_does_not_import_the_heavy_stack(tmp_path):
    probe = (
        "import sys\nfrom flows.cli import main\n"
        "for argv in (['--help'], ['run', '--help'], ['generate', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "heavy = ('torch', 'deepspeed', 'prefect', 'mlflow', 'duckdb', 'sentencepiece')\n"
        "print(sorted(m for m in heavy if m in sys.modules), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "[]", f"--help imported: {done.stderr.strip()}"


def test_config_prints_yaml_and_its_hash(tmp_path):
    done = lmforge("config", "-c", "tiny", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    data = yaml.safe_load(done.stdout)
    assert data["name"] == "tiny" and data["train"]["max_steps"] == 30
    last = done.stdout.strip().splitlines()[-1]
    assert last == f"# config_hash: {load_config('tiny').config_hash()}"

    changed = lmforge("config", "-c", "tiny", "--workspace", tmp_path / "elsewhere", "train.max_steps=31", cwd=tmp_path)
    assert changed.returncode == 0, changed.stderr
    data = yaml.safe_load(changed.stdout)
    assert data["train"]["max_steps"] == 31 and data["workspace"] == str(tmp_path / "elsewhere")
    assert changed.stdout.strip().splitlines()[-1] == f"# config_hash: {load_config('tiny', ['train.max_steps=31']).config_hash()}"
    assert changed.stdout.strip().splitlines()[-1] != last


# --- happy path ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_workspace(tiny_cli_run):
    return tiny_cli_run


@pytest.mark.slow
def test_run_then_generate(cli_workspace):
    root, ws, run = cli_workspace
    assert "lmforge run 'tiny' finished" in run.stdout
    for stage in ("ingest", "register"):
        assert f"  {stage} " in run.stdout
    export = Path((ws / "LATEST_EXPORT").read_text().strip())
    assert (export / "model.safetensors").is_file()
    assert json.loads((export / "config.json").read_text())["lineage"]["lmforge.config_name"] == "tiny"

    args = ("generate", "--workspace", ws, "--prompt", "def ", "--max-new-tokens", "8", "--seed", "1")
    done = lmforge(*args, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("def ") and len(done.stdout.rstrip("\n")) > len("def ")
    assert lmforge(*args, cwd=root).stdout == done.stdout, "the same seed gave different text"
    by_dir = lmforge("generate", "--model", export, *args[3:], cwd=root)
    assert by_dir.returncode == 0 and by_dir.stdout == done.stdout


@pytest.mark.slow
def test_generate_from_the_registered_model(cli_workspace):
    root, ws, _ = cli_workspace
    done = lmforge("generate", "--workspace", ws, "--model", "models:/lmforge-tiny@candidate", "--prompt", "def ",
                   "--max-new-tokens", "8", "--seed", "1", cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    local = lmforge("generate", "--workspace", ws, "--prompt", "def ", "--max-new-tokens", "8", "--seed", "1", cwd=root)
    assert done.stdout == local.stdout


def test_generate_from_an_unknown_registered_model(cli_workspace):
    root, ws, _ = cli_workspace
    done = lmforge("generate", "--workspace", ws, "--model", "models:/no-such-model@candidate", "--prompt", "def ", cwd=root)
    assert done.returncode == 2
    assert "no-such-model" in error_line(done)


@pytest.mark.slow
def test_generate_rejects_bad_sampling_before_printing(cli_workspace):
    root, ws, _ = cli_workspace
    done = lmforge("generate", "--workspace", ws, "--prompt", "def ", "--max-new-tokens", "-3", cwd=root)
    assert done.returncode == 2
    assert "max_new_tokens" in error_line(done)
    assert done.stdout == ""


@pytest.mark.slow
def test_eval_scores_an_existing_model_without_a_run(cli_workspace, tmp_path):
    root, ws, _ = cli_workspace
    text = tmp_path / "snippet.txt"
    text.write_text("def add(a, b):\n    return a + b\n\nimport os\nprint(os.getcwd())\n" * 20)
    task = tmp_path / "toy.jsonl"
    task.write_text("".join(json.dumps({"context": f"import {m}", "choices": ["\\n", " zebra"], "answer": 0}) + "\n"
                            for m in ("os", "sys", "re", "json")))
    done = lmforge("eval", "--workspace", ws, "--texts", text, "--tasks", task, "--json", cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    scores = json.loads(done.stdout)["scores"]
    assert 0 < scores["text.snippet.bpb"] < 8 and scores["mc.toy.n"] == 4 and 0 <= scores["mc.toy.acc"] <= 1
    registered = lmforge("eval", "--workspace", ws, "--model", "models:/lmforge-tiny@champion", "--texts", text, cwd=root)
    assert registered.returncode == 0 and "text.snippet.bpb" in registered.stdout, registered.stderr[-3000:]
    nothing = lmforge("eval", "--workspace", ws, cwd=root)
    assert nothing.returncode == 2 and "--texts FILE" in error_line(nothing)
