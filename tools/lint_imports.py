"""Run `lint-imports` (import-linter, contracts in pyproject.toml) over the whole `toolpool`
package.

toolpool is one package spread over four folders (packages/core, langchain, crewai,
autogen; its `__init__` extends `__path__` at run time), which import-linter's static graph
cannot follow. This copies the four folders into one temporary `toolpool` tree, puts it
first on PYTHONPATH (and tools/, for the project's contract types in
`tools/import_contracts.py`) and runs `lint-imports` on it, so the contracts see every module.

    python tools/lint_imports.py              # check the contracts
    python tools/lint_imports.py --self-test  # prove the adapters contract catches violations

`--self-test` stages the same tree plus a fake adapter module that imports a private core
module created for the test (so unknown to any list) and a private module of a public
subpackage, and fails unless `lint-imports` breaks the adapters contract on both imports and
keeps the other contracts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ADAPTERS = ("langchain", "crewai", "autogen")
ADAPTERS_CONTRACT = "adapters-public-api"

# The self-test's staged violations: module (relative to the view) -> source.
_NEW_PRIVATE = "toolpool/_lint_self_test_new.py"
_FAKE_ADAPTER = "toolpool/langchain/_lint_self_test.py"
_FAKE_ADAPTER_SOURCE = (
    '"""Staged by tools/lint_imports.py --self-test: imports the core\'s private modules."""\n'
    "from toolpool import _lint_self_test_new\n"
    "from toolpool.resilience._layer import PolicyRuntime\n"
    "\n"
    "__all__ = ['PolicyRuntime', '_lint_self_test_new']\n"
)


def _stage(tmp: str) -> Path:
    """The four folders as one `toolpool` tree under `tmp`."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    view = Path(tmp) / "toolpool"
    shutil.copytree(ROOT / "packages" / "core" / "toolpool", view, ignore=ignore)
    for name in ADAPTERS:
        shutil.copytree(ROOT / "packages" / name / "toolpool" / name, view / name, ignore=ignore)
    return view


def _lint(tmp: str, *extra: str, capture: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tmp, str(ROOT / "tools")])}
    linter = Path(sys.executable).with_name("lint-imports")
    command = [str(linter), "--no-cache", str(ROOT / "pyproject.toml"), *extra]
    return subprocess.run(command, env=env, cwd=tmp, check=False, text=True, capture_output=capture)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="toolpool-imports-") as tmp:
        _stage(tmp)
        return _lint(tmp).returncode


def self_test() -> int:
    """0 when the adapters contract breaks on the staged violations, 1 (saying why) if not."""
    with tempfile.TemporaryDirectory(prefix="toolpool-imports-self-test-") as tmp:
        _stage(tmp)
        (Path(tmp) / _NEW_PRIVATE).write_text('"""A private core module added by the test."""\n')
        (Path(tmp) / _FAKE_ADAPTER).write_text(_FAKE_ADAPTER_SOURCE)
        adapters = _lint(tmp, "--contract", ADAPTERS_CONTRACT, capture=True)
        others = _lint(tmp, "--contract", "core-layers", capture=True)
    out = adapters.stdout + adapters.stderr
    wanted = [
        "Framework adapters import only the core's public API BROKEN",
        "toolpool.langchain._lint_self_test -> toolpool._lint_self_test_new",
        "toolpool.langchain._lint_self_test -> toolpool.resilience._layer",
    ]
    missing = [text for text in wanted if text not in out]
    problems = []
    if adapters.returncode == 0:
        problems.append("lint-imports passed with an adapter importing private core modules")
    if missing:
        problems.append("its output lacks: " + "; ".join(missing))
    if others.returncode != 0:
        problems.append("the staged files broke another contract:\n" + others.stdout)
    if problems:
        print("lint_imports --self-test FAILED:", *problems, "--- output:", out, sep="\n")
        return 1
    print(f"lint_imports --self-test: {ADAPTERS_CONTRACT} catches private imports (ok)")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--self-test", action="store_true", help="see the module docstring")
    args = parser.parse_args()
    sys.exit(self_test() if args.self_test else main())
