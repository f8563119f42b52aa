"""Run `lint-imports` (import-linter, contracts in pyproject.toml) over the whole `toolpool`
package.

toolpool is one package spread over four folders (packages/core, langchain, crewai,
autogen; its `__init__` extends `__path__` at run time), which import-linter's static graph
cannot follow. This copies the four folders into one temporary `toolpool` tree, puts it
first on PYTHONPATH and runs `lint-imports` on it, so the contracts see every module.

    python tools/lint_imports.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ADAPTERS = ("langchain", "crewai", "autogen")


def main() -> int:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    with tempfile.TemporaryDirectory(prefix="toolpool-imports-") as tmp:
        view = Path(tmp) / "toolpool"
        shutil.copytree(ROOT / "packages" / "core" / "toolpool", view, ignore=ignore)
        for name in ADAPTERS:
            shutil.copytree(
                ROOT / "packages" / name / "toolpool" / name, view / name, ignore=ignore
            )
        env = {**os.environ, "PYTHONPATH": tmp}
        linter = Path(sys.executable).with_name("lint-imports")
        command = [str(linter), "--no-cache", str(ROOT / "pyproject.toml")]
        return subprocess.run(command, env=env, cwd=tmp, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
