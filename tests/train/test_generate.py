"""train.generate: a workdir's language model continues a prompt (byte tokenizer for
flaxlab's own runs), deterministic when greedy; user errors are one line."""
import pytest

from train import errors, generate


@pytest.fixture(scope="module")
def lm_workdir(tiny_lm_workdir):
    return tiny_lm_workdir


def test_greedy_continuation_is_deterministic_and_printed(lm_workdir, capsys):
    text = generate.continuation(lm_workdir, "def ", max_new_tokens=8)
    assert text == generate.continuation(lm_workdir, "def ", max_new_tokens=8)
    assert isinstance(text, str) and len(text.encode("utf-8", "replace")) <= 8 * 4
    sampled = generate.continuation(lm_workdir, "def ", max_new_tokens=8, temperature=1.0,
                                    seed=1)
    assert isinstance(sampled, str)
    assert generate.run(["generate", f"--workdir={lm_workdir}", "--prompt=def ",
                         "--max_new_tokens=8"]) == 0
    assert capsys.readouterr().out == "def " + text + "\n"


def test_user_errors_are_one_line(tmp_path, lm_workdir, capsys):
    assert generate.run(["generate", f"--workdir={tmp_path}"]) == errors.EXIT_WORKDIR
    assert generate.run(["generate", f"--workdir={lm_workdir}", "--max_new_tokens=99"]) \
        == errors.EXIT_CONFIG  # longer than model.max_length 32
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("flaxlab:")]
    assert len(lines) == 2 and "no config.json" in lines[0] and "max_length" in lines[1]
