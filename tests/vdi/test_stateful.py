"""Random legal and illegal call sequences from both sides, checked against a model.

The machine drives one set from both sides, one call per step, on one event loop.
After every step it checks that no completion was lost (every command the server sent
is either queued, held by the client, or done), that no command was handed out with a
released buffer or a buffer the server had freed, and that per-device delivery kept
stream order. At teardown it drives the set to its end and fails if that would block:
the model must never deadlock.

``TestDeviceSetAcrossProcesses`` runs the same machine with the engine side in a child
process (``tests/transport/agent.py``, one for the whole module): every rule ends with
``World.sync()`` (both processes quiet, nothing in flight), so the checks see what the
in-process machine sees. Two things are told apart by their nature, not weakened: a
delivered command is matched to the oldest undelivered one of its device (the two
processes number commands each their own way; FIFO delivery makes that the right one,
and its code and size are checked), and "queued" is counted per device rather than
found by identity (the client's queue holds the host's own command objects).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import anyio
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tests.transport.remote_proxy import AgentProcess, World, settle
from vdistream import (
    ClientState,
    ClientVirtualDeviceSet,
    Command,
    CommandCode,
    Completion,
    Features,
    PendingCommand,
    VDAbortError,
    VDClosedError,
    VDConfig,
    VDIError,
    VDInvalidError,
    VDProtocolError,
    VDTimeoutError,
)

T = TypeVar("T")
DEVICES = 3
SLOTS = 4


@dataclasses.dataclass
class Sent:
    device: int
    pending: PendingCommand
    code: CommandCode
    size: int
    buffer: memoryview | None
    delivered: bool = False


class DeviceSetMachine(RuleBasedStateMachine):
    agent: AgentProcess | None = None  # set for the machine across processes

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.world = World.inproc() if self.agent is None else self.run(World.xproc_on(self.agent))
        self.registry = self.world.registry
        self.client = ClientVirtualDeviceSet(registry=self.registry)
        self.server = self.world.server_set()
        self.client.create("m", VDConfig(device_count=DEVICES, prefix_zone_size=8))
        self.run(self._configure())
        self.run(self.client.get_configuration(0))
        names = ["m", "m1", "m2"]
        self.cdevs = [self.client.open_device(n) for n in names]
        self.sdevs = [self.run(settle(self.server.open_device(n))) for n in names]
        self.sync()
        self.free: list[memoryview] = []
        self.allocated: list[memoryview] = []
        self.sent: list[Sent] = []
        self.held: list[tuple[int, Command, Sent]] = []
        self.delivered_serials: list[list[int]] = [[] for _ in range(DEVICES)]
        self.closed = [False] * DEVICES
        self.aborted = False

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)

    async def _configure(self) -> None:
        await settle(self.server.open(None, "m"))
        await settle(self.server.begin_configuration(Features.WRITE_MEDIA, 512, 0, 65536))
        await settle(self.server.request_buffers(4096, 0, SLOTS))
        await settle(self.server.end_configuration())

    async def _client_abort(self) -> None:
        self.client.signal_abort()

    def sync(self) -> None:
        """Across processes: wait until both sides are quiet (no-op in-process)."""
        if self.world.xproc:
            self.run(self.world.sync())

    # --- server rules ------------------------------------------------------------

    @precondition(lambda self: not self.aborted)
    @rule()
    def allocate(self) -> None:
        try:
            if self.run(settle(self.server.query_available_buffers(4096))) == 0:
                return
        except VDProtocolError:  # the table allows no query once terminated
            assert self.server.state.name == "NORMALLY_TERMINATED"
            return
        view = self.run(self.server.allocate_buffer(4096))
        self.allocated.append(view)

    @rule(index=st.integers(0, SLOTS - 1))
    def free_buffer(self, index: int) -> None:
        if index >= len(self.allocated):
            return
        view = self.allocated[index]
        in_use = any(s.buffer is view and not s.pending.done() for s in self.sent)
        try:
            self.server.free_buffer(view)
        except VDInvalidError:
            assert in_use
            assert not self.aborted
            return
        assert self.aborted or not in_use
        if not self.aborted:
            self.allocated.pop(index)
        self.sync()

    @rule(
        device=st.integers(0, DEVICES - 1),
        code=st.sampled_from(
            [CommandCode.WRITE, CommandCode.READ, CommandCode.FLUSH, CommandCode.CLEAR_ERROR]
        ),
        index=st.integers(0, SLOTS - 1),
        size=st.integers(0, 4096),
    )
    def send(self, device: int, code: CommandCode, index: int, size: int) -> None:
        buffer = None
        if code in (CommandCode.WRITE, CommandCode.READ):
            if index >= len(self.allocated) or self.aborted:
                return
            buffer = self.allocated[index]
        errored = self.cdevs[device].core.state.name == "ERRORED"
        pending = self.sdevs[device].send_command(code, size, buffer=buffer)
        self.sync()
        if self.aborted:
            assert pending.result().completion == Completion.OPERATION_ABORTED
        elif self.closed[device]:
            assert pending.result().completion == Completion.INVALID_HANDLE
        elif errored and code is not CommandCode.CLEAR_ERROR:
            assert pending.result().completion == Completion.IO_DEVICE
        else:
            assert not pending.done()
        self.sent.append(Sent(device, pending, code, size, buffer))

    @rule(device=st.integers(0, DEVICES - 1))
    def close_device(self, device: int) -> None:
        try:
            self.run(settle(self.sdevs[device].close_device()))
        except VDClosedError:
            assert self.closed[device]
            return
        except VDProtocolError:
            assert self.server.state.name != "ACTIVE"
            return
        self.closed[device] = True
        self.sync()

    @rule(side=st.sampled_from(["client", "server"]), dice=st.integers(0, 9))
    def signal_abort(self, side: str, dice: int) -> None:
        if dice:  # rare: most sequences should get deep before an abort
            return
        if side == "client" and self.world.xproc:
            self.run(self._client_abort())  # from the loop, as a pump would (requests 3)
        else:
            (self.client if side == "client" else self.server).signal_abort()
        self.aborted = True
        self.sync()

    # --- client rules --------------------------------------------------------------

    @rule(device=st.integers(0, DEVICES - 1))
    def get_command(self, device: int) -> None:
        try:
            command = self.run(self.cdevs[device].get_command(0))
        except VDTimeoutError:
            return
        except VDClosedError:
            assert self.closed[device]
            return
        except VDAbortError:
            assert self.aborted
            return
        except VDProtocolError:
            assert self.client.state is ClientState.NORMALLY_TERMINATED
            return
        assert not self.aborted
        if self.world.xproc:
            # the oldest command of this device not yet delivered nor done (module doc)
            sent = next(
                s
                for s in self.sent
                if s.device == device and not s.delivered and not s.pending.done()
            )
            assert (sent.code, sent.size) == (command.code, command.size)
        else:
            (sent,) = [s for s in self.sent if s.pending.serial == command.serial]
        sent.delivered = True
        assert sent.device == device
        assert not sent.pending.done()
        if command.buffer is not None:
            assert command.buffer.nbytes == command.size  # not released
            assert any(v is sent.buffer for v in self.allocated)  # never a freed buffer
        self.delivered_serials[device].append(command.serial)
        self.held.append((device, command, sent))
        self.sync()

    @rule(
        index=st.integers(0, 20),
        completion=st.sampled_from([Completion.SUCCESS, Completion.SUCCESS, Completion.DISK_FULL]),
    )
    def complete(self, index: int, completion: Completion) -> None:
        if index >= len(self.held):
            return
        device, command, sent = self.held.pop(index)
        try:
            self.cdevs[device].complete_command(command, completion, command.size)
        except VDAbortError:
            assert self.aborted
            return
        self.sync()
        assert sent.pending.result().completion == completion

    @rule(device=st.integers(0, DEVICES - 1))
    def complete_a_stranger(self, device: int) -> None:
        bogus = Command(CommandCode.FLUSH, serial=10**9)
        try:
            self.cdevs[device].complete_command(bogus, 0)
        except VDAbortError:
            assert self.aborted
        except (VDInvalidError, VDProtocolError):
            pass
        else:
            raise AssertionError("a command that was never sent was accepted")

    # --- invariants ---------------------------------------------------------------

    @invariant()
    def no_completion_lost(self) -> None:
        if self.world.xproc:
            held_ids = {id(sent) for _, _, sent in self.held}
            for index, cdev in enumerate(self.cdevs):
                queued = sum(isinstance(item, PendingCommand) for item in cdev.core.queue)
                waiting = [
                    s
                    for s in self.sent
                    if s.device == index and not s.pending.done() and id(s) not in held_ids
                ]
                assert len(waiting) == queued, (index, waiting, queued)
            return
        held = {command.serial for _, command, _ in self.held}
        for sent in self.sent:
            device = self.cdevs[sent.device].core
            queued = any(item is sent.pending for item in device.queue)
            assert sent.pending.done() or queued or sent.pending.serial in held, sent

    @invariant()
    def stream_order(self) -> None:
        for serials in self.delivered_serials:
            assert serials == sorted(serials)

    @invariant()
    def abort_completes_everything(self) -> None:
        if self.aborted:
            assert all(s.pending.done() for s in self.sent)

    def teardown(self) -> None:
        try:
            self.run(self._drain())
        finally:
            try:
                self.run(self.world.close())
            finally:
                self.runner.close()

    async def _drain(self) -> None:
        """Bring the set to its end; a deadlock shows up as a timeout."""
        with anyio.fail_after(5):
            for device, command, _ in self.held:
                try:
                    self.cdevs[device].complete_command(command, 0)
                except VDIError:
                    assert self.aborted
            for i, sdev in enumerate(self.sdevs):
                if not self.closed[i]:
                    try:
                        await settle(sdev.close_device())
                    except VDProtocolError:
                        pass
            for cdev in self.cdevs:
                while not self.aborted:
                    try:
                        command = await cdev.get_command(1)
                    except (VDClosedError, VDProtocolError):
                        break
                    except VDAbortError:
                        break
                    if command.code is CommandCode.CLEAR_ERROR:
                        cdev.complete_command(command, 0)
                    else:
                        cdev.complete_command(command, 0, command.size)
            for sent in self.sent:
                await sent.pending  # every command gets its result
            self.client.close()
            await settle(self.server.close())


DeviceSetMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None
)
TestDeviceSet = DeviceSetMachine.TestCase


class DeviceSetMachineAcrossProcesses(DeviceSetMachine):
    """The same machine, the engine side in the module's agent process."""


DeviceSetMachineAcrossProcesses.TestCase.settings = settings(
    max_examples=40, stateful_step_count=60, deadline=None
)
TestDeviceSetAcrossProcesses = DeviceSetMachineAcrossProcesses.TestCase


@pytest.fixture(scope="module", autouse=True)
def _agent() -> Iterator[None]:
    """One engine-side agent for every example of the machine across processes."""
    process = AgentProcess()
    DeviceSetMachineAcrossProcesses.agent = process
    yield
    DeviceSetMachineAcrossProcesses.agent = None
    process.stop()
