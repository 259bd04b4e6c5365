"""The task group an S3 sink or source runs its parallel calls in (part uploads,
read-ahead ranges): its own while inside its ``async with`` block (entered and left by
the owner's ``__aenter__``/``__aexit__``, so it nests in the caller's scopes), else the
storage's while inside ``storage.background()`` (how a job runs its devices), so calls
started by one ``write`` keep going while the caller prepares the next. Outside both,
each call opens a group and returns when all it started ended.
Each call runs shielded (a started request runs to its end, bounded by its retries) in
a scope only its owner cancels, and never raises into the group: the owner collects
its outcome, so no exception group comes out of this package.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable
from typing import Generic, Self, TypeVar

import anyio
from anyio.abc import TaskGroup

from vdistream.errors import StorageError

__all__ = ("BACKGROUNDS", "Background", "Call", "TaskOwner")

_T = TypeVar("_T")


class Call(Generic[_T]):
    """One background call: shielded, cancellable by its owner, its outcome kept."""

    def __init__(self, make: Callable[[], Awaitable[_T]], what: str, settled: Callable[[], None]):
        self.what, self._make, self._settled = what, make, settled
        self._scope = anyio.CancelScope(shield=True)
        self._done = anyio.Event()
        self._value: tuple[_T] | None = None
        self._error: Exception | None = None

    async def run(self) -> None:
        try:
            with self._scope:
                try:
                    self._value = (await self._make(),)
                except Exception as exc:  # for the owner; never raised into the group
                    self._error = exc
        finally:
            self._done.set()
            self._settled()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        self._scope.cancel()

    async def wait(self) -> None:
        await self._done.wait()

    def result(self, *, url: str, device: str | None = None) -> _T:
        """The call's value; re-raises its error; a cancelled call is a ``StorageError``."""
        if self._error is not None:
            raise self._error
        if self._value is None:
            raise StorageError(f"{self.what} was cancelled", url=url, device=device)
        return self._value[0]


class Background:
    """One ``S3Storage.background()`` block: its task group, open while the block lasts."""

    def __init__(self, storage: object, group: TaskGroup) -> None:
        self.storage, self.group, self.open = storage, group, True


#: The background blocks the current task runs inside, innermost first. A context
#: variable, not an attribute of the storage: two jobs sharing one storage, or nested
#: blocks, each see their own block (tasks inherit it from the job that started them).
BACKGROUNDS: contextvars.ContextVar[tuple[Background, ...]] = contextvars.ContextVar(
    "vdistream_s3_backgrounds", default=()
)


class TaskOwner:
    """Mixin: the owner's task group (see the module docstring); ``_finish`` is what
    leaving ``async with`` does first (abort, close)."""

    _group: TaskGroup | None = None
    #: the storage's block (``S3Storage.background``) the owner was opened in, if any
    _shared: Background | None = None
    _lifetime: contextlib.AsyncExitStack | None = None
    _settled: anyio.Event | None = None

    async def __aenter__(self) -> Self:
        self._lifetime = contextlib.AsyncExitStack()
        self._group = await self._lifetime.enter_async_context(anyio.create_task_group())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self._finish()  # every call ends here
        finally:
            stack, self._lifetime, self._group = self._lifetime, None, None
            if stack is not None:
                await stack.aclose()

    async def _finish(self) -> None:
        raise NotImplementedError

    @contextlib.asynccontextmanager
    async def _tasks(self) -> AsyncIterator[TaskGroup]:
        """The owner's group, or one for this call that waits for what it started; an
        error of the call itself comes out after that, unwrapped."""
        if self._background is not None:
            yield self._background
            return
        failure: Exception | None = None
        async with anyio.create_task_group() as group:
            try:
                yield group
            except Exception as exc:
                failure = exc
        if failure is not None:
            raise failure

    @property
    def _background(self) -> TaskGroup | None:
        """The group calls may outlive their caller in: the owner's, else the storage's."""
        if self._group is not None:
            return self._group
        shared = self._shared  # once its block ended, each call has a group of its own
        return shared.group if shared is not None and shared.open else None

    def _start(self, group: TaskGroup, make: Callable[[], Awaitable[_T]], what: str) -> Call[_T]:
        call = Call(make, what, self._notify)
        group.start_soon(call.run, name=what)
        return call

    def _notify(self) -> None:
        if self._settled is not None:
            self._settled.set()

    async def _wait_any(self, calls: Collection[Call[_T]]) -> None:
        """Until one of ``calls`` is done (each is bounded by its retries)."""
        while calls and not any(call.done for call in calls):
            self._settled = anyio.Event()
            await self._settled.wait()

    @staticmethod
    async def _cancel(calls: Iterable[Call[_T]]) -> None:
        """Cancel ``calls`` and wait until each has ended."""
        calls = list(calls)
        for call in calls:
            call.cancel()
        for call in calls:
            await call.wait()
