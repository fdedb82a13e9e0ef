"""Bad own-data files: each a one-line error naming the file (and line), exit 2, before any
model is loaded, nothing written."""

from __future__ import annotations

import json

import pytest

from engine.__main__ import main
from engine.errors import ConfigError
from engine.evaluate.own_data import read_jsonl, read_text


CASES = {
    "missing-answer": (b'{"prompt": "a"}\n', "line 1: 'answer' is missing"),
    "answer-not-str": (b'{"prompt": "a", "answer": 3}\n', "line 1: 'answer' is not a string"),
    "second-line-bad": (b'{"prompt": "a", "answer": "b"}\n{"prompt": "a"\n', "line 2 is not valid JSON"),
    "not-object": (b'["prompt", "answer"]\n', "line 1 is not a JSON object"),
    "duplicate-key": (b'{"prompt": "a", "answer": "b", "answer": "c"}\n', "duplicate key 'answer'"),
    "empty": (b"", "the file is empty"),
    "blank-lines": (b"\n \n\n", "the file is empty"),
    "non-utf8": (b'{"prompt": "a", "answer": "b"}\n\xff\xfe\n', "line 2 is not UTF-8"),
    "deep": (b"[" * 100_000 + b"]" * 100_000 + b"\n", "line 1 is not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_jsonl_is_one_line_naming_file_and_line(tmp_path, case):
    data, needle = CASES[case]
    path = tmp_path / "mine.jsonl"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        read_jsonl(path)
    message = str(info.value)
    assert str(path) in message and needle in message and "\n" not in message


def test_a_text_file_of_one_10mb_line_is_refused(tmp_path):
    path = tmp_path / "big.txt"
    path.write_bytes(b"a" * (10 * 2**20))
    with pytest.raises(ConfigError, match="line 1 is 10485760 bytes"):
        read_text(path)


def test_the_cli_refuses_before_loading_any_model(tmp_path, capsys, monkeypatch):
    import engine.evaluate.loading as loading

    monkeypatch.setattr(loading, "load_model_folder",
                        lambda *a, **k: pytest.fail("a model was loaded for a bad file"))
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p"}\n')
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["eval", str(tmp_path), "--data", str(good), "--data", str(bad)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "bad.jsonl" in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_missing_file_and_mixed_options(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--chat-template"]) == 2
    assert "--chat-template" in capsys.readouterr().err
