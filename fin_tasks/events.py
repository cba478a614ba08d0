"""Machine-readable events from a stage to whoever runs it, beside the human log.

With `FIN_TASKS_EVENTS=1` in its environment (the Prefect flows set it), a `fin-tasks`
command writes one line per event on stdout: `EVENT_PREFIX` then a JSON object with an
`event` key, e.g. `{"event": "progress", "step": 5, "total": 20}`. A stage that runs out of
memory exits with `EXIT_OUT_OF_MEMORY` after an `out_of_memory` event, so the orchestrator
retries it without reading error messages. Without the variable nothing is written.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

ENV = "FIN_TASKS_EVENTS"
EVENT_PREFIX = "fin-tasks-event: "
EXIT_OUT_OF_MEMORY = 3
"""Exit status of a stage that ran out of memory (2: bad input or params; 130: interrupted)."""


def emit(event: str, **fields: Any) -> None:
    """Write one event line, when the process runs under an orchestrator that reads them."""
    if os.environ.get(ENV) == "1":
        print(EVENT_PREFIX + json.dumps({"event": event} | fields), file=sys.stdout, flush=True)


def parse(line: str) -> dict[str, Any] | None:
    """The event a line of a stage's output carries, or None for a human log line."""
    if not line.startswith(EVENT_PREFIX):
        return None
    try:
        event = json.loads(line[len(EVENT_PREFIX):])
    except ValueError:  # cut or garbled: a log line after all
        return None
    return event if isinstance(event, dict) and "event" in event else None


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an exception is the accelerator's or the host's allocator giving up."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True  # torch.OutOfMemoryError (CUDA, MPS, XPU), Python's own MemoryError
    # torch's CPU allocator raises a plain RuntimeError
    return isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate" in str(error)
