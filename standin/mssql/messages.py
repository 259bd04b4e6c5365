"""SQL Server's messages as the stand-in emits them (numbers, severities and texts)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = (
    "Message",
    "StatementFailed",
    "error",
    "info",
    "os_error_text",
    "terminating",
)


@dataclass(frozen=True)
class Message:
    """One message of a statement; severity <= 10 is informational (sqlcmd prints the text)."""

    number: int
    severity: int
    text: str
    state: int = 1

    def wire(self) -> dict[str, object]:
        return {
            "number": self.number,
            "severity": self.severity,
            "state": self.state,
            "text": self.text,
        }


def error(number: int, text: str, severity: int = 16) -> Message:
    return Message(number, severity, text)


def info(number: int, text: str) -> Message:
    return Message(number, 0 if number == 0 else 10, text)


class StatementFailed(Exception):
    """The statement ends with these messages (the reasons, then e.g. 3013)."""

    def __init__(self, *messages: Message) -> None:
        super().__init__("; ".join(m.text for m in messages))
        self.messages = list(messages)


_OS_TEXT = {
    0: "The operation completed successfully.",
    5: "Access is denied.",
    38: "Reached the end of the file.",
    39: "The disk is full.",
    50: "The request is not supported.",
    112: "There is not enough space on the disk.",
    995: "The I/O operation has been aborted because of either a thread exit or an "
    "application request.",
    1117: "The request could not be performed because of an I/O device error.",
    1460: "This operation returned because the timeout period expired.",
}


def os_error_text(code: int) -> str:
    """``112(There is not enough space on the disk.)`` as SQL Server prints OS errors."""
    text = _OS_TEXT.get(code, "failed to retrieve text for this error. Reason: 15105")
    return f"{code}({text})"


def terminating(operation: str) -> Message:
    """Message 3013 for ``BACKUP DATABASE``, ``RESTORE LOG``, ``VERIFY DATABASE``, ..."""
    return error(3013, f"{operation} is terminating abnormally.")
