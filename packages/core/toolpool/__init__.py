"""toolpool: shared, auth-affine, burst-tolerant connection pools for AI-agent tool calls."""

from __future__ import annotations

import pkgutil

# The adapters (toolpool.langchain, toolpool.crewai, toolpool.autogen) live in their own
# folders of the repository; in an editable install each folder is a sys.path entry, so the
# package path is extended over them. In a wheel they sit inside this folder already.
__path__ = pkgutil.extend_path(__path__, __name__)

from toolpool._version import __version__  # noqa: E402

__all__ = ["__version__"]
