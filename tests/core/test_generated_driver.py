"""The thread driver's request path is generated from the asyncio one (tools/unasync.py): the
committed file must be what the tool generates, and the tool's check must notice an edit."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("unasync_tool", ROOT / "tools" / "unasync.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_sync_request_path_is_the_generated_one() -> None:
    tool = _tool()
    for name in tool.FILES:
        committed = (tool.CORE / "_sync" / name).read_text()
        assert committed == tool.generate(name), f"_sync/{name} is stale: run `make unasync`"


def test_every_async_request_path_has_a_generated_sync_twin() -> None:
    """Only the drivers' connection modules are hand-written: every other module of
    `_async/` (the HTTP/1.1 request path, the HTTP/2 one) is generated into `_sync/`."""
    tool = _tool()
    written_by_hand = {"__init__.py", "connection.py"}
    async_modules = {p.name for p in (tool.CORE / "_async").glob("*.py")} - written_by_hand
    assert set(tool.FILES) == async_modules == {"request.py", "h2.py"}
    for name in tool.FILES:
        assert (tool.CORE / "_sync" / name).read_text().startswith("# Generated from")


def test_the_check_fails_on_an_edited_async_original_until_regenerated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tool = _tool()
    core = tmp_path / "toolpool"
    for part in ("_async", "_sync"):
        shutil.copytree(tool.CORE / part, core / part)
    assert tool.main(["--check"], core) == 0
    source = core / "_async" / "request.py"
    edited = source.read_text().replace(
        "    dest.release(got, True)\n",
        "    assert got is not None\n    dest.release(got, True)\n",
    )
    assert edited != source.read_text()
    source.write_text(edited)
    assert tool.main(["--check"], core) == 1
    assert "run `make unasync`" in capsys.readouterr().err
    assert tool.main([], core) == 0  # regenerates
    assert "    assert got is not None\n" in (core / "_sync" / "request.py").read_text()
    assert tool.main(["--check"], core) == 0
