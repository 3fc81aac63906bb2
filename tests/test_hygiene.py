"""The conftest hygiene fixture fails a test that leaks (pytester runs the bad tests)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent


def test_a_leaked_task_and_an_unclosed_file_fail_their_tests(pytester: pytest.Pytester) -> None:
    shutil.copy(ROOT / "tests" / "conftest.py", pytester.path / "conftest.py")
    (pytester.path / "tests").mkdir()
    shutil.copy(ROOT / "tests" / "mqtt_helpers.py", pytester.path / "tests" / "mqtt_helpers.py")
    (pytester.path / "tests" / "__init__.py").write_text("")
    pytester.makepyfile(
        test_bad="""
        import asyncio
        import logging
        import sys

        async def test_leaks_a_task():
            asyncio.create_task(asyncio.sleep(3600), name="forgotten")

        async def test_cleans_up():
            task = asyncio.create_task(asyncio.sleep(3600))
            task.cancel()

        def test_leaves_a_file_open(tmp_path):
            open(tmp_path / "f", "w")

        def test_installs_a_handler():
            logging.getLogger().addHandler(logging.StreamHandler(sys.stderr))

        def test_handler_is_gone():
            assert not [
                h for h in logging.getLogger().handlers
                if type(h) is logging.StreamHandler
            ]
        """
    )
    result = pytester.runpytest_subprocess(
        "-p",
        "no:randomly",
        "-p",
        "no:cacheprovider",
        "-o",
        "asyncio_mode=auto",
        "-o",
        "asyncio_default_fixture_loop_scope=function",
        "-W",
        "error",
    )
    result.assert_outcomes(passed=4, errors=1, failed=1)
    result.stdout.fnmatch_lines(["*left 1 asyncio task(s) running: forgotten*"])
    result.stdout.fnmatch_lines(["*test_leaves_a_file_open*"])
