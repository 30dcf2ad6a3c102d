"""The CLI framework: grouped help, unknown commands, user errors."""
from __future__ import annotations

import subprocess
import sys

from lmforge import cli
from lmforge.config import build_config, parse_overrides
from lmforge.errors import UserError

import dataclasses
import pytest


def test_help_lists_stages(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: lmforge COMMAND" in out
    assert "Stage" in out


def test_unknown_command_exits_2(capsys):
    assert cli.main(["no-such-command"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_every_registered_command_has_help_with_example():
    for name, command in cli.COMMANDS.items():
        if not cli._available(command):
            continue
        parser = cli.build_command_parser(name)
        text = parser.format_help()
        subactions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if subactions:
            for sub_name, sub in subactions[0].choices.items():
                assert "example:" in sub.format_help(), f"lmforge {name} {sub_name} --help has no example"
                # The group's own help ends with every action's example.
                example = sub.epilog.removeprefix("example:\n").strip().splitlines()[0]
                assert example in text.split("examples:\n", 1)[-1], f"lmforge {name} --help lacks {example!r}"
        else:
            assert "example:" in text, f"lmforge {name} --help has no example"


@dataclasses.dataclass
class _Inner:
    width: int = 4


@dataclasses.dataclass
class _Outer:
    lr: float = 1e-3
    name: str = "x"
    use_ema: bool = False
    inner: _Inner = dataclasses.field(default_factory=_Inner)


def test_overrides_coerce_and_nest():
    config = build_config(_Outer, overrides=["lr=3e-4", "use_ema=true", "inner.width=8"])
    assert config.lr == 3e-4 and config.use_ema is True and config.inner.width == 8
    assert parse_overrides(["a.b=1"]) == {"a": {"b": "1"}}


def test_unknown_key_lists_valid_keys():
    with pytest.raises(UserError) as error:
        build_config(_Outer, overrides=["lrr=1"])
    message = str(error.value)
    assert "unknown config key 'lrr'" in message and "did you mean 'lr'" in message
    assert "inner.width" in message


def test_bad_value_type_is_clear():
    with pytest.raises(UserError, match="expects int"):
        build_config(_Outer, overrides=["inner.width=abc"])


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "lmforge", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "lmforge" in result.stdout


@pytest.mark.parametrize("encoding, found", [("utf-16", "is UTF-16"), ("utf-16-le", "is not UTF-8 text"),
                                             ("latin-1", "is not UTF-8")])
def test_a_config_file_that_is_not_utf8_is_one_clear_error(tmp_path, capsys, encoding, found):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes("name: caf\u00e9\nmax_steps: 3\n".encode(encoding))
    with pytest.raises(UserError, match=rf"config '.*recipe.yaml' {found} .*save it as UTF-8"):
        build_config(_Outer, recipe=recipe)
    # The same through the CLI: one line, exit code 2, no traceback.
    assert cli.main(["pretrain", "--config", str(recipe), "--print-config"]) == 2
    assert capsys.readouterr().err.startswith(f"lmforge pretrain: error: config '{recipe}' {found}")


def test_a_utf8_config_with_a_byte_order_mark_still_loads(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes("lr: 0.5\n".encode("utf-8-sig"))
    assert build_config(_Outer, recipe=recipe).lr == 0.5


def test_deeply_nested_yaml_is_a_user_error(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(UserError, match="recipe.yaml"):
        build_config(_Outer, recipe=recipe)


def test_infinite_value_for_an_int_key_is_a_user_error():
    with pytest.raises(UserError, match="config key 'inner.width' expects int"):
        build_config(_Outer, overrides=["inner.width=.inf"])


def test_an_override_that_is_a_value_and_a_section_is_refused():
    with pytest.raises(UserError, match=r"override 'lr.x=2' sets a key inside 'lr'"):
        parse_overrides(["lr=1", "lr.x=2"])
