"""Why the client aborted reaches an engine in another process in the client's words:
``signal_abort(reason)`` puts them after "the client signalled abort" in the set's
reason, which the STATE record carries; a job passes its own abort's reason."""

from __future__ import annotations

import anyio
import pytest

from tests.transport.test_engine import activate, directory, engine, served
from vdistream.errors import VDAbortError
from vdistream.protocol import CommandCode, Completion, ServerState, SetAbortCause
from vdistream.transport.rendezvous import RuntimeDirectory

__all__ = ("directory",)  # the fixture, used by name

pytestmark = pytest.mark.asyncio


async def test_the_clients_reason_reaches_the_engine(directory: RuntimeDirectory) -> None:
    async with served(directory) as s, engine(directory, s.name) as sds:
        (device,), (client_device,) = await activate(sds, s)
        pending = device.send_command(CommandCode.FLUSH)
        await client_device.get_command(1)
        s.client.signal_abort("device 2: write failed: No space left on device")
        with anyio.fail_after(1):
            result = await pending
        assert result.completion == Completion.OPERATION_ABORTED
        assert sds.state is ServerState.ABORTED
        assert sds.aborted_by is SetAbortCause.CLIENT
        assert sds.abort_reason == (
            "the client signalled abort: device 2: write failed: No space left on device"
        )
        with pytest.raises(VDAbortError, match="No space left on device"):
            await sds.allocate_buffer(4096)
        await sds.close()
    assert s.client.abort_reason == sds.abort_reason


async def test_without_a_reason_the_words_stay_the_spec_models(
    directory: RuntimeDirectory,
) -> None:
    async with served(directory) as s, engine(directory, s.name) as sds:
        await activate(sds, s)
        s.client.signal_abort()
        with anyio.fail_after(1):
            while sds.state is not ServerState.ABORTED:  # noqa: ASYNC110 - the STATE record
                await anyio.sleep(0.01)
        assert sds.abort_reason == "the client signalled abort"
        await sds.close()
