"""One way to write a log line: ``event key=value ...``.

Every line a node logs is an event's name, then its fields; a value with a space
(or none at all) is quoted, and a quote inside it becomes ``'``, so a line
splits back into its fields (``ops/cluster/logs.py`` reads them so). Here,
below every module that logs, so that storage, the data dir's checks and the
replication write the same form without importing one another.
"""

from __future__ import annotations

from typing import Any


def format_fields(event: str, fields: dict[str, Any]) -> str:
    parts = [event]
    for key, value in fields.items():
        text = str(value)
        if " " in text or not text:
            text = '"' + text.replace('"', "'") + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


def os_why(exc: OSError) -> str:
    """What an OS error says, for a ``why`` field or a sentence."""
    return exc.strerror or str(exc)
