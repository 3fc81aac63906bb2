"""Configurations that must be refused (issue 14 item 8): exit 2, one line naming the field.

``tests/data/configs/bad/`` holds one file per defect, each the valid
``tests/data/configs/good/base.toml`` broken in one place, with a header
``# expect: <text the message must contain>`` (the field, or for a file that
is not a configuration at all, the reason) and ``# why: <the defect>``. Every
file goes through ``check-config`` and ``run`` as the command line runs them;
a sample also as separate processes. Relative paths in the files are relative
to the repository root.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from devicegw.cli.main import main
from tests.process_harness import ROOT, run_cli

CORPUS = ROOT / "tests" / "data" / "configs"
BAD = sorted((CORPUS / "bad").glob("*.toml"))
# Variables the corpus relies on being unset.
UNSET = ("DEVICEGW_CORPUS_UNSET_PASSWORD", "DEVICEGW_MQTT_PASSWORD")


def expected(path: Path) -> str:
    found = re.search(rb"^# expect: (.+)$", path.read_bytes(), re.M)
    assert found is not None, f"{path.name} has no '# expect:' header"
    return found.group(1).decode()


def cli(*argv: str) -> tuple[object, str, str]:
    """``devicegw ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc: object = main(list(argv))
        except SystemExit as exc:
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(autouse=True)
def _at_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    for name in UNSET:
        monkeypatch.delenv(name, raising=False)


def test_the_corpus_is_large_and_its_base_is_valid() -> None:
    assert len(BAD) >= 75
    rc, out, err = cli("check-config", str(CORPUS / "good" / "base.toml"))
    assert rc == 0, err
    assert ": OK" in out


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
@pytest.mark.parametrize("command", ["check-config", "run"])
def test_bad_config_is_refused_with_one_line(path: Path, command: str) -> None:
    argv = [command, str(path)] if command == "check-config" else [command, "--config", str(path)]
    rc, out, err = cli(*argv)
    assert rc == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("devicegw: ")
    assert expected(path) in lines[0]
    assert "Traceback" not in err and "Traceback" not in out
    assert "\x1b" not in err  # a hostile value is shown, never sent to the terminal


SAMPLE = [
    "nesting_arrays",
    "client_id_70k",
    "host_empty",
    "data_dir_nul",
    "topic_prefix_hash",
    "tls_ca_missing",
    "port_bool",
    "expected_serial_escape",
]


@pytest.mark.parametrize("name", SAMPLE)
def test_bad_config_as_processes(name: str) -> None:
    """The same, as the operator runs it: separate processes, nothing started."""
    path = next(p for p in BAD if p.stem.split("-", 1)[1] == name)
    for argv in (("check-config", str(path)), ("run", "--config", str(path))):
        res = run_cli(*argv, timeout=30)
        assert res.returncode == 2, res
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, res.stderr
        assert expected(path) in lines[0]
        assert "Traceback" not in res.stderr


def test_an_oversized_file_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.toml"
    big.write_text((CORPUS / "good" / "base.toml").read_text() + "# " + "x" * (1 << 20) + "\n")
    rc, _, err = cli("check-config", str(big))
    assert rc == 2
    assert "larger than" in err
