"""systemd's service notification protocol (``sd_notify(3)``), for ``vdistream serve``.

The protocol: the service manager passes a Unix datagram socket in ``NOTIFY_SOCKET``
(a path, or ``@name`` for the abstract namespace); the service sends it newline
separated ``KEY=VALUE`` assignments, one datagram per message: ``READY=1``,
``STATUS=...``, ``STOPPING=1``, ``RELOADING=1``, ``WATCHDOG=1``. With ``WatchdogSec=``
the manager also sets ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, the process it means)
and restarts a service whose pings stop for that long.

Why a module of our own and not a package: the protocol is one ``sendto`` on a Unix
datagram socket. ``systemd-python`` and ``cysystemd`` are C extensions that need
libsystemd's headers to build; the pure-Python packages are a few dozen lines each and
unkept or unfit (``sdnotify`` 0.3.2, 2017: connects once and swallows every error
unless told otherwise; ``systemd-watchdog``: a blocking socket, abstract names marked
untested). What the daemon needs besides the send is small and its own: the datagram
never blocks the event loop (a non-blocking socket: a full queue drops a message
rather than stalling, the next ping follows), ``WATCHDOG_PID`` is honoured, and the
variables are taken out of the environment so that the engines' tools the daemon
starts do not inherit them (``sd_notify``'s ``unset_environment``).

Contract:

* ``SystemdNotifier.from_environment()`` is ``None`` when ``NOTIFY_SOCKET`` is not set
  (not run by systemd, or not ``Type=notify``): then nothing is ever sent. Only
  ``vdistream serve`` calls it; importing vdistream or embedding ``Service`` sends
  nothing unless the host passes a notifier (``Service(notify=...)``).
* ``send`` never raises: systemd not listening (a restarted manager, a test that went
  away) is logged once (``sd_notify_failed``) and otherwise ignored; a notification is
  never a reason for the daemon to fail. It returns whether the datagram went out.
* ``watchdog_interval`` is half of ``WATCHDOG_USEC`` in seconds (``None``: no
  watchdog); ``run_watchdog()`` pings at that interval from the event loop until
  cancelled, so a loop that is stuck stops pinging and systemd restarts the daemon.
* ``vsock:`` addresses (systemd 253+, for virtual machines) are not supported: logged
  (``sd_notify_unsupported``) and treated as unset.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import MutableMapping

import anyio

from vdistream.log import get_logger

__all__ = ("ENV_NAMES", "SystemdNotifier")

log = get_logger(__name__)

#: The variables systemd sets for a notify service (removed by ``from_environment``).
ENV_NAMES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class SystemdNotifier:
    """Sends notifications to one ``NOTIFY_SOCKET`` address (module doc)."""

    def __init__(self, address: str, *, watchdog_usec: int | None = None) -> None:
        if not address or not (address.startswith("/") or address.startswith("@")):
            raise ValueError(f"NOTIFY_SOCKET must be a path or an @abstract name: {address!r}")
        self.address = address
        # "@name" is the abstract namespace: a leading NUL byte in the address.
        self._target = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._sock: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environment(
        cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = True
    ) -> SystemdNotifier | None:
        """The notifier systemd asks for in ``environ`` (default ``os.environ``), or
        ``None``; ``unset``: remove ``ENV_NAMES`` from it (module doc)."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        usec_text = env.get("WATCHDOG_USEC", "")
        pid_text = env.get("WATCHDOG_PID", "")
        if unset:
            for name in ENV_NAMES:
                env.pop(name, None)
        if not address:
            return None
        if not (address.startswith("/") or address.startswith("@")):
            log.warning("sd_notify_unsupported", address=address)
            return None
        usec: int | None = None
        # WATCHDOG_PID names the process the watchdog is for: not us (a child that
        # inherited the environment) means no pings from here.
        if usec_text.isdigit() and (not pid_text or pid_text == str(os.getpid())):
            usec = int(usec_text)
        return cls(address, watchdog_usec=usec)

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between two pings: half the watchdog timeout (``None``: none)."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2_000_000

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; whether it went out."""
        message = "".join(f"{a}\n" for a in assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._sock.sendto(message, self._target)
        except OSError as exc:
            if not self._failed:  # once: a manager that went away would flood the log
                self._failed = True
                log.warning("sd_notify_failed", address=self.address, error=str(exc))
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: start-up is complete (and ``STATUS=``)."""
        return self.send("READY=1", *_status(status))

    def status(self, text: str) -> bool:
        """``STATUS=``: one line shown by ``systemctl status``."""
        return self.send(*_status(text))

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: the shutdown has begun."""
        return self.send("STOPPING=1", *_status(status))

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (systemd 253+ wants it); send
        ``ready()`` when the reload is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: one keep-alive ping."""
        return self.send("WATCHDOG=1")

    async def run_watchdog(self) -> None:
        """Ping every ``watchdog_interval`` seconds until cancelled (returns at once
        without a watchdog). From the event loop: a stuck loop stops the pings."""
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            self.watchdog()
            await anyio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(text: str | None) -> tuple[str, ...]:
    # A newline would end the assignment early: the status is one line.
    return () if text is None else (f"STATUS={' '.join(text.split())}",)
