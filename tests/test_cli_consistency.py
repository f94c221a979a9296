"""One CLI: every option documented, --backend a choice everywhere, --json a path everywhere, flags in errors."""

from __future__ import annotations

import socket

import click
import pytest
from click.testing import CliRunner

from deploykit.cli import main


def _commands():
    ctx = click.Context(main, info_name="deploykit")
    for name in main.list_commands(ctx):
        yield name, main.get_command(ctx, name)


def test_every_option_has_help():
    missing = [f"{name} {'/'.join(p.opts)}" for name, cmd in _commands() for p in cmd.params
               if isinstance(p, click.Option) and not p.help and "--help" not in p.opts]
    assert missing == []


def test_backend_is_a_choice_and_json_a_path_everywhere():
    for name, cmd in _commands():
        for p in cmd.params:
            if "--backend" in p.opts:
                assert isinstance(p.type, click.Choice), name
            if "--json" in p.opts:
                assert not p.is_flag and isinstance(p.type, click.Path), name


def test_serve_local_refuses_unknown_backend(tmp_path):
    r = CliRunner().invoke(main, ["serve-local", str(tmp_path), "--backend", "onnx"])
    assert r.exit_code == 2 and "'onnx' is not one of" in r.output


def test_port_in_use_is_one_line_exit_2(trained_engine):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        r = CliRunner().invoke(main, ["serve-local", str(trained_engine), "--port", str(port)])
    assert r.exit_code == 2, r.output
    assert r.output.count("\n") == 1 and r.output.startswith(f"error: can't listen on 127.0.0.1:{port}")
    assert "--port" in r.output


@pytest.mark.parametrize("cmd", [["export", "{run}", "-o", "{eng}"], ["quantize", "{eng}", "-o", "{eng2}"]])
def test_errors_name_flags_not_keywords(cmd, trained_run, trained_engine, tmp_path):
    import shutil

    eng = tmp_path / "eng"
    shutil.copytree(trained_engine, eng)
    eng2 = tmp_path / "eng2"
    shutil.copytree(trained_engine, eng2)
    args = [a.format(run=trained_run, eng=eng, eng2=eng2) for a in cmd]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "pass --force" in r.output and "=True" not in r.output
