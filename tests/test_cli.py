"""The command-line tool: help text with examples, info, predict and clean errors."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from lmscope.cli.app import app
from tiny_models import save_tiny_with_tokenizer

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmscope.cli.common import console, err_console

    for c in (console, err_console):
        monkeypatch.setattr(c, "width", 200)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_with_tokenizer("gemma2", str(tmp_path_factory.mktemp("tiny-gemma2")))


COMMANDS = sorted(c.name or c.callback.__name__ for c in app.registered_commands)


def test_the_cli_has_every_command():
    expected = {"info", "predict", "harvest", "verify", "train", "eval", "atlas", "serve", "explain", "score",
                "label", "steer", "demo", "version"}  # fmt: skip
    assert expected <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Examples" in result.output


@pytest.mark.parametrize("command", ["info", "predict", "demo", "harvest", "eval", "atlas", "steer"])
def test_model_commands_take_a_device_and_a_dtype(command):
    result = runner.invoke(app, [command, "--help"])
    assert "--device" in result.output and "--dtype" in result.output


def test_info_lists_every_hook_with_its_shape(tiny_dir):
    result = runner.invoke(app, ["info", tiny_dir, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "family: gemma2" in result.output
    assert "layers 3 · d_model 32 · d_mlp 64" in result.output
    assert "blocks.2.mlp_out" in result.output and "post_feedforward_layernorm" in result.output
    assert "[1, 4, 64]" in result.output  # mlp_hidden is d_mlp wide
    assert "softcapped" in result.output  # Gemma 2's final logit softcap is called out


def test_predict_prints_probabilities(tiny_dir):
    result = runner.invoke(app, ["predict", tiny_dir, "The capital of", "--top", "3"])
    assert result.exit_code == 0, result.output
    assert result.output.count("0.0") >= 3  # three probabilities from a random tiny model


def test_errors_are_one_clean_line(tmp_path):
    result = runner.invoke(app, ["info", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert "error:" in result.output and "no such model file or directory" in result.output
    assert "Traceback" not in result.output
    bad = runner.invoke(app, ["info", "smollm2-135m", "--dtype", "float8"])
    assert bad.exit_code == 2 and "unknown dtype 'float8'" in bad.output


@pytest.mark.smollm2
def test_predict_on_the_default_model(smollm2, monkeypatch):
    monkeypatch.setattr("lmscope.cli.model_cmds.load_model", lambda *a, **k: smollm2)
    result = runner.invoke(app, ["predict", "smollm2-135m", "The capital of France is", "--top", "2"])
    assert result.exit_code == 0, result.output
    assert "' Paris'" in result.output
