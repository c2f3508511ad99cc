"""Stop 34, unicode: YAML strings are text (a JSON-style escape pair joined, a lone surrogate refused by
file:line, in every YAML file and in overrides), and attack files refuse what the data readers refuse."""

from __future__ import annotations

import json

import pytest

from posttrain.config.schema import apply_override, load_yaml, read_yaml
from posttrain.data.readers import text_lines
from posttrain.errors import ConfigError, DataError
from posttrain.safety.attacks import load_attacks


def test_yaml_joins_escape_pairs_in_values_and_keys():
    data = load_yaml('"k\\ud83d\\ude00": ["a \\ud83d\\ude00", {x: "\\U0001F600"}]\nplain: caf\u00e9\n', "c.yaml")
    assert data == {"k\U0001F600": ["a \U0001F600", {"x": "\U0001F600"}], "plain": "caf\u00e9"}


@pytest.mark.parametrize("text,line", [
    ('a: 1\nb: "lone \\ud800 here"\n', 2),
    ('a: 1\n\n"\\udc00key": 2\n', 3),
    ('a:\n  - ok\n  - "reversed \\ude00\\ud83d"\n', 3),  # low then high: no pair
])
def test_yaml_refuses_a_lone_surrogate_with_its_line(tmp_path, text, line):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"c\.yaml:{line}: a lone surrogate \(\\u(d800|dc00|de00)\)") as info:
        read_yaml(path)
    assert "\n" not in str(info.value)


def test_yaml_errors_keep_the_callers_error_type():
    with pytest.raises(DataError, match=r"x\.yaml:1: a lone surrogate"):
        load_yaml('- "\\ud800"\n', "x.yaml", DataError)


def test_an_override_joins_an_escape_pair_and_refuses_a_lone_surrogate():
    data: dict = {}
    apply_override(data, 'adapter.init_text="Smile \\ud83d\\ude00"')
    assert data["adapter"]["init_text"].value == "Smile \U0001F600"
    with pytest.raises(ConfigError, match="override .*: a lone surrogate"):
        apply_override(data, 'adapter.init_text="\\ud83d alone"')


def test_text_lines_split_at_newline_only():
    assert text_lines('{"a": "x\u2028y\u0085z"}\r\n\n{"b": 1}') == ['{"a": "x\u2028y\u0085z"}', "", '{"b": 1}']
    assert text_lines('{"a": 1}\r{"b": 2}\r') == ['{"a": 1}', '{"b": 2}']  # old Mac OS line ends, as the readers
    assert text_lines("") == []


@pytest.mark.parametrize("row,where", [
    ({"name": "nul", "template": "a\x00 {prompt}"}, "'template'"),
    ({"name": "desc", "template": "{prompt}", "description": "bad \udfff"}, "'description'"),
])
def test_an_attack_row_with_unusable_text_is_refused_with_its_line(tmp_path, row, where):
    path = tmp_path / "a.jsonl"
    ok = json.dumps({"name": "ok", "template": "{prompt}"})
    path.write_text(ok + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"a\.jsonl:2: .* at {where}"):
        load_attacks([], str(path))


def test_a_yaml_attack_with_a_lone_surrogate_is_refused_with_its_line(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text('- name: ok\n  template: "{prompt}"\n- name: bad\n  template: "\\ud83d {prompt}"\n',
                    encoding="utf-8")
    with pytest.raises(ConfigError, match=r"a\.yaml:4: a lone surrogate"):
        load_attacks([], str(path))
