"""Which `AuthContext` a framework run acts for: `resolve_auth` over an adapter's `auth=`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

from toolpool._auth_context import AuthContext, current_auth
from toolpool.errors import ConfigError

__all__ = ["AuthSource", "resolve_auth"]

#: What an adapter's `auth=` accepts: a fixed context, a function of the framework's run
#: input (LangChain: the tool call's runtime, CrewAI: the kickoff inputs, AutoGen: the agent or
#: None) returning the context, or None for the ambient `toolpool.auth_context(...)`.
AuthSource: TypeAlias = "AuthContext | Callable[[Any], AuthContext | None] | None"

# Errors a resolver raises when the run does not carry what it reads (a missing key, a
# context object without the attribute, `None` where a context was expected).
_MISSING = (KeyError, AttributeError, TypeError, IndexError)


def resolve_auth(
    auth: AuthContext | Callable[[Any], AuthContext | None] | None,
    run_input: Any,
    *,
    framework: str,
    hint: str,
) -> AuthContext | None:
    """The `AuthContext` one tool call of a `framework` run acts for.

    - an `AuthContext`: itself (every run acts for it);
    - a callable: called with `run_input`; it returns the context (or None for the
      destination's shared identity);
    - None: `toolpool.current_auth()`, the context the caller set around the run.

    A callable that cannot find the tenant (it raises KeyError, AttributeError, TypeError or
    IndexError) or returns something other than an AuthContext raises `ConfigError` whose
    message ends with `hint`: what the caller has to pass.

    >>> resolve_auth(lambda inputs: AuthContext(tenant=inputs["tenant"]), {"tenant": "acme"},
    ...              framework="crewai", hint="pass inputs={'tenant': ...} to kickoff()")
    AuthContext(tenant='acme', subject=None, credentials=<0 redacted>)
    """
    if auth is None:
        return current_auth()
    if isinstance(auth, AuthContext):
        return auth
    if not callable(auth):
        raise ConfigError(
            f"toolpool.{framework}: auth= must be a toolpool.AuthContext, a function returning "
            f"one, or None (use the ambient toolpool.auth_context); got {type(auth).__name__}"
        )
    try:
        ctx = auth(run_input)
    except _MISSING as exc:
        raise ConfigError(
            f"toolpool.{framework}: the auth resolver could not find the tenant of this run "
            f"({type(exc).__name__}: {exc}); {hint}"
        ) from exc
    if ctx is None or isinstance(ctx, AuthContext):
        return ctx
    raise ConfigError(
        f"toolpool.{framework}: the auth resolver returned {type(ctx).__name__}, not a "
        f"toolpool.AuthContext; return toolpool.AuthContext(tenant=...) (or None for the "
        f"shared identity); {hint}"
    )
