"""One CrewAI tool made pooled: its `run` / `_run` / `arun` / `_arun` replaced on the instance
by wrappers that run the body as one toolpool tool call.

Theory of operation. CrewAI (1.15) runs a tool on two paths: native function calling calls the
tool's `run` (which for `BaseTool` calls `_run`, and for `@tool` functions calls the function
directly), and the text/ReAct path calls the `_run` that `to_structured_tool()` captured.
Replacing all four methods on the instance (a pydantic model: `object.__setattr__`) covers
both paths; a context variable marks the tool whose wrapper is already running, so `run`
calling `_run` is one tool call, not two.

Each call: the auth context (the wrap's fixed one, else the one bound around the kickoff),
a slot of the run's adaptive concurrency limit, then the body inside `tool_call_scope` (where
the httpx clients and `requests` sessions it builds are pooled) and inside the admission of
the destinations the tool uses (wait boundedly while one is saturated; counted against its
capacity while the call runs). A busy error (`BUSY_ERRORS`), raised by
admission or met by the body, becomes `ToolBusy`, whose text CrewAI hands to the model
("Error executing tool: tool 'crm' could not run: destination 'crm' is busy ...").
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from toolpool import AuthContext, auth_context, current_auth
from toolpool.adapters import (
    AdaptiveToolConcurrency,
    Admission,
    AuthSource,
    Held,
    ToolSlot,
    atool_call_scope,
    busy_message,
    denied_message,
    find_busy,
    find_denied,
    retry_after_of,
    tool_call_scope,
)
from toolpool.crewai._loop import in_running_loop, run_on_tool_loop
from toolpool.crewai._mcp import pooled_mcp_run
from toolpool.errors import EgressDenied, ToolpoolError

if TYPE_CHECKING:
    from toolpool import Pool

__all__ = [
    "Binding",
    "RunState",
    "ToolBusy",
    "ToolDenied",
    "current_run",
    "is_wrapped",
    "unwrap_tool",
    "wrap_tool",
]

log = logging.getLogger("toolpool.crewai")

#: The methods replaced on a tool instance; together they cover every CrewAI execution path.
TOOL_METHODS = ("run", "_run", "arun", "_arun")

_MISSING: Any = object()


class ToolBusy(ToolpoolError):
    """A tool call could not run because a destination it uses is busy or resting.

    Raised from the wrapped tool so that CrewAI reports it as a tool error the model reads
    and may retry, instead of failing the run. `str()` is the model-facing text.
    """

    def __init__(self, tool_name: str, cause: BaseException) -> None:
        self.tool_name = tool_name
        self.destination: str | None = getattr(cause, "destination", None)
        self.retry_after = retry_after_of(cause)
        super().__init__(busy_message(cause, tool_name))


class ToolDenied(ToolpoolError):
    """A tool call could not run because the egress policy refused the address it was about
    to connect to (`toolpool.EgressDenied`). Raised from the wrapped tool so that CrewAI
    reports it as a tool error the model reads; `str()` is the model-facing text."""

    def __init__(self, tool_name: str, cause: EgressDenied) -> None:
        self.tool_name = tool_name
        self.destination = cause.destination
        self.rule = cause.rule
        super().__init__(denied_message(cause, tool_name))


@dataclass(frozen=True)
class Binding:
    """What a wrapped crew, agent or tool is bound to (shared by its copies)."""

    #: The pool tool traffic goes through.
    pool: Pool
    #: The wrap's `auth=`: a fixed context, a function of the kickoff input, or None.
    auth: AuthSource
    #: Gate for tool calls on saturated destinations; None: no admission wait.
    admission: Admission | None
    #: Initial limit of a run's parallel tool calls (AIMD); None: no limit.
    tool_concurrency: int | None
    #: Pool the httpx clients and requests sessions that tool bodies build themselves.
    pool_httpx: bool


@dataclass(frozen=True)
class RunState:
    """One kickoff in progress: whom it acts for and its tool-call concurrency limit."""

    owner: object
    binding: Binding
    ctx: AuthContext | None
    limiter: AdaptiveToolConcurrency | None


_run: contextvars.ContextVar[RunState | None] = contextvars.ContextVar(
    "toolpool_crewai_run", default=None
)
# The tool whose wrapper is running in this context (`run` -> `_run` is one call).
_inside: contextvars.ContextVar[_ToolHook | None] = contextvars.ContextVar(
    "toolpool_crewai_tool", default=None
)


def current_run() -> RunState | None:
    """The wrapped kickoff the running code belongs to, if any."""
    return _run.get()


@contextlib.contextmanager
def run_scope(state: RunState) -> Iterator[RunState]:
    """Bind a kickoff's run state (and its auth context) for the enclosed code."""
    token = _run.set(state)
    try:
        with auth_context(state.ctx):
            yield state
    finally:
        _run.reset(token)


class _ToolHook:
    """The wrapper state of one tool instance: its binding and the attributes it replaced."""

    __slots__ = ("binding", "saved", "tool")

    def __init__(self, tool: Any, binding: Binding) -> None:
        self.tool = tool
        self.binding = binding
        self.saved: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return str(getattr(self.tool, "name", type(self.tool).__name__))

    def context(self) -> tuple[AuthContext | None, AdaptiveToolConcurrency | None]:
        """The auth context of a call now, and the limiter of its run."""
        binding = self.binding
        run = _run.get()
        limiter = run.limiter if run is not None and run.binding.pool is binding.pool else None
        if isinstance(binding.auth, AuthContext):
            return binding.auth, limiter
        return current_auth(), limiter


def _label(ctx: AuthContext | None) -> str | None:
    return ctx.label if ctx is not None else None


@contextlib.contextmanager
def _slot_sync(
    limiter: AdaptiveToolConcurrency | None, ctx: AuthContext | None
) -> Iterator[ToolSlot | None]:
    if limiter is None:
        yield None
    else:
        with limiter.slot_sync(_label(ctx)) as slot:
            yield slot


@contextlib.asynccontextmanager
async def _slot(limiter: AdaptiveToolConcurrency | None, ctx: AuthContext | None) -> Any:
    if limiter is None:
        yield None
    else:
        async with limiter.slot(_label(ctx)) as slot:
            yield slot


@contextlib.contextmanager
def _hold_sync(
    admission: Admission | None, tool_name: str, ctx: AuthContext | None
) -> Iterator[Held]:
    """Admission for the whole call: wait (boundedly) while a destination the tool uses is
    saturated, and count the call against its capacity while it runs."""
    if admission is None:
        yield Held()
    else:
        with admission.hold_sync(tool_name, ctx) as held:
            yield held


@contextlib.asynccontextmanager
async def _hold(admission: Admission | None, tool_name: str, ctx: AuthContext | None) -> Any:
    if admission is None:
        yield Held()
    else:
        async with admission.hold(tool_name, ctx) as held:
            yield held


def _congested(call: Any, held: Held) -> bool:
    """The call met a busy destination or waited at a saturated one (it caught the error
    itself, or admission made it wait): the run's tool-call limit narrows."""
    return call.busy is not None or call.waited or held.waited


def _report(slot: ToolSlot | None, busy: bool) -> None:
    if slot is not None:
        if busy:
            slot.busy()
        else:
            slot.success()


def _call_sync(hook: _ToolHook, original: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    if _inside.get() is hook:
        # `run` calling `_run`: already inside this call's scope. An async `_run` would be
        # asyncio.run() by `run` on a throwaway loop: run it on the tool loop instead.
        result = original(*args, **kwargs)
        if inspect.iscoroutine(result) and not in_running_loop():
            return run_on_tool_loop(result)
        return result
    binding = hook.binding
    name = hook.name
    ctx, limiter = hook.context()
    token = _inside.set(hook)
    try:
        with _slot_sync(limiter, ctx) as slot:
            try:
                with (
                    tool_call_scope(
                        binding.pool,
                        ctx,
                        tool_name=name,
                        pool_httpx=binding.pool_httpx,
                        admission=binding.admission,
                    ) as call,
                    _hold_sync(binding.admission, name, ctx) as held,
                ):
                    result = original(*args, **kwargs)
                    if inspect.iscoroutine(result) and not in_running_loop():
                        # An async body behind a sync entry point (CrewAI would asyncio.run
                        # it on a throwaway loop): run it now, on the long-lived tool loop.
                        result = run_on_tool_loop(result)
            except Exception as exc:
                busy = find_busy(exc)
                if busy is None:
                    _report(slot, False)
                    denied = find_denied(exc)
                    if denied is not None:
                        raise ToolDenied(name, denied) from exc
                    raise
                _report(slot, True)
                raise ToolBusy(name, busy) from exc
            _report(slot, _congested(call, held))
    finally:
        _inside.reset(token)
    if inspect.iscoroutine(result):
        # Called from a running event loop, which will await the body later: it gets its
        # own scope when it runs.
        return _call_async(hook, lambda: result, (), {}, admit=False)
    return result


async def _call_async(
    hook: _ToolHook,
    original: Callable[..., Awaitable[Any]],
    args: Any,
    kwargs: Any,
    *,
    admit: bool = True,
) -> Any:
    if _inside.get() is hook:
        return await original(*args, **kwargs)
    binding = hook.binding
    name = hook.name
    ctx, limiter = hook.context()
    token = _inside.set(hook)
    try:
        async with _slot(limiter, ctx) as slot:
            try:
                async with (
                    atool_call_scope(
                        binding.pool,
                        ctx,
                        tool_name=name,
                        pool_httpx=binding.pool_httpx,
                        admission=binding.admission,
                    ) as call,
                    _hold(binding.admission if admit else None, name, ctx) as held,
                ):
                    result = await original(*args, **kwargs)
            except Exception as exc:
                busy = find_busy(exc)
                if busy is None:
                    _report(slot, False)
                    denied = find_denied(exc)
                    if denied is not None:
                        raise ToolDenied(name, denied) from exc
                    raise
                _report(slot, True)
                raise ToolBusy(name, busy) from exc
            _report(slot, _congested(call, held))
            return result
    finally:
        _inside.reset(token)


def _make_wrapper(hook: _ToolHook, attr: str, original: Callable[..., Any]) -> Callable[..., Any]:
    if attr == "func":
        # `Tool` (the @tool decorator) calls its function straight from `run`, then
        # asyncio.run()s a coroutine result on a throwaway loop; the scope is already set by
        # the `run` / `_run` wrapper, only the loop has to change.
        @functools.wraps(original)
        def func_wrapper(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            if inspect.iscoroutine(result) and not in_running_loop():
                return run_on_tool_loop(result)
            return result

        wrapper: Callable[..., Any] = func_wrapper
    elif attr in ("arun", "_arun"):

        @functools.wraps(original)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            return await _call_async(hook, original, args, kwargs)

        wrapper = async_wrapper
    else:

        @functools.wraps(original)
        def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
            return _call_sync(hook, original, args, kwargs)

        wrapper = sync_wrapper
    wrapper.__toolpool_hook__ = hook  # type: ignore[attr-defined]
    return wrapper


def _hook_of(tool: Any) -> _ToolHook | None:
    wrapper = vars(tool).get("_run") if hasattr(tool, "__dict__") else None
    hook = getattr(wrapper, "__toolpool_hook__", None)
    return hook if isinstance(hook, _ToolHook) else None


def is_wrapped(tool: Any) -> bool:
    """Whether `tool` runs through toolpool (wrapped by `toolpool.crewai.wrap`)."""
    return _hook_of(tool) is not None


def wrap_tool(tool: Any, binding: Binding) -> bool:
    """Make `tool`'s calls pooled under `binding`; True if it was not wrapped before.

    Wrapping a wrapped tool again only rebinds it (the newest binding wins).
    """
    hook = _hook_of(tool)
    if hook is not None:
        if hook.binding.pool is not binding.pool:
            log.warning(
                "tool %r was wrapped for another toolpool.Pool; it now uses %r",
                hook.name,
                binding.pool,
            )
        hook.binding = binding
        return False
    hook = _ToolHook(tool, binding)
    own = vars(tool)
    attrs = TOOL_METHODS + (("func",) if inspect.iscoroutinefunction(own.get("func")) else ())
    # CrewAI's MCP tools of streamable HTTP servers run on pooled MCP sessions instead.
    mcp_run = pooled_mcp_run(tool, binding.pool)
    for attr in attrs:
        original = getattr(tool, attr, None)
        if attr == "_run" and mcp_run is not None:
            original = mcp_run
        if original is None or not callable(original):
            continue
        hook.saved[attr] = own.get(attr, _MISSING)
        # BaseTool is a pydantic model: bypass its __setattr__ (these are not fields).
        object.__setattr__(tool, attr, _make_wrapper(hook, attr, original))
    return True


def unwrap_tool(tool: Any) -> bool:
    """Restore `tool`'s own methods; True if it was wrapped."""
    hook = _hook_of(tool)
    if hook is None:
        return False
    for attr, saved in hook.saved.items():
        if saved is _MISSING:
            with contextlib.suppress(AttributeError):
                object.__delattr__(tool, attr)
        else:
            object.__setattr__(tool, attr, saved)
    return True
