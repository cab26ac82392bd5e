"""Training step, evaluation JSON and sparsity, and one-line errors from the CLI."""

import json

import pytest
import torch

from conftest import tiny_model
from turbo_demo import cli
from turbo_demo.offline.evaluate import evaluate, keep_top
from turbo_demo.offline.train import make_optimizer, settings_for, train_step


def test_training_steps_lower_loss_on_a_repeated_batch():
    model = tiny_model("drelu").train()
    opt = make_optimizer(model, settings_for("drelu", l1=1e-4))
    x = torch.randint(0, 300, (4, 16))
    y = torch.roll(x, -1, dims=1)
    first, sparsity = train_step(model, opt, x, y, l1=1e-4)
    for _ in range(5):
        last, _ = train_step(model, opt, x, y, l1=1e-4)
    assert last < first
    assert 0.0 < sparsity < 1.0


def test_keep_top_keeps_the_largest_magnitudes():
    h = torch.tensor([[0.1, -3.0, 2.0, 0.5, -0.2, 1.0, 0.0, 4.0, -0.3, 0.05]])
    assert keep_top(h, 0.8).tolist() == [[0, -3.0, 0, 0, 0, 0, 0, 4.0, 0, 0]]
    assert torch.equal(keep_top(h, 0.0), h)


def test_eval_json_keys_and_hand_built_sparsity():
    model = tiny_model("drelu")
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight.zero_()  # relu(0) = 0: every neuron off
    tokens = torch.randint(0, 300, (600,), dtype=torch.int32)
    result = evaluate(model, tokens, seq_len=32, max_tokens=256)
    assert set(result) == {"loss", "perplexity", "tokens", "sparsity", "topk_perplexity"}
    assert set(result["topk_perplexity"]) == {"0.5", "0.8", "0.9"}
    assert result["tokens"] == 256
    assert result["sparsity"]["per_layer"][0] == 1.0
    assert 0.3 < result["sparsity"]["per_layer"][1] < 1.0
    dense = evaluate(tiny_model("dense"), tokens, seq_len=32, max_tokens=256)
    assert dense["sparsity"]["mean"] == 0.0
    assert dense["topk_perplexity"]["0.9"] != dense["perplexity"]


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_bad_input_gives_one_clear_line(capsys, tmp_path, tiny_dirs):
    code, err = run_cli(capsys, "eval", str(tmp_path / "missing"))
    assert code == 2 and err == [f"error: model directory not found: {tmp_path / 'missing'}"]

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    (corrupt / "model.safetensors").write_bytes(b"garbage")
    code, err = run_cli(capsys, "eval", str(corrupt))
    assert code == 2 and len(err) == 1 and str(corrupt) in err[0]

    code, err = run_cli(capsys, "eval", str(tiny_dirs["drelu"]), "--text-file", str(tmp_path / "nope.txt"))
    assert code == 2 and err[-1] == f"error: text file not found: {tmp_path / 'nope.txt'}"

    code, err = run_cli(capsys, "train", "--preset", "swish", "--out", str(tmp_path / "x"))
    presets = "dense, drelu, relufy, moe-dense, moe-drelu"
    assert code == 2 and err == [f"error: unknown preset 'swish'; choose one of {presets}"]

    for flag, value, message in (
        ("--target-recall", "0", "--target-recall must be in (0, 1], got 0.0"),
        ("--tokens", "100", "--tokens must be at least one sequence of 256 tokens, got 100"),
    ):
        code, err = run_cli(capsys, "predictors", str(tiny_dirs["drelu"]), flag, value)
        assert code == 2 and err == [f"error: {message}"]


def test_eval_command_prints_json_for_a_text_file(capsys, tmp_path, tiny_dirs):
    text = tmp_path / "t.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 40)
    assert cli.main(["eval", str(tiny_dirs["dense"]), "--text-file", str(text), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["text"] == str(text) and result["tokens"] > 0


@pytest.mark.parametrize("command", ["train", "eval"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0 and "usage" in capsys.readouterr().out
