"""stepvault: durable workflows and checkpoints for Python.

Declare a workflow's steps with ``@wf.step``; a ``Runner`` checkpoints each
step's output atomically and durably, and resumes interrupted sessions from
their last completed step.
"""

from __future__ import annotations

from .errors import (
    CorruptSessionError,
    DecryptionError,
    EngineError,
    InvalidArgumentError,
    InvalidSessionIdError,
    LeaseLostError,
    SerializationError,
    SessionBusyError,
    SessionCancelledError,
    SessionExistsError,
    SessionExpiredError,
    SessionLimitError,
    SessionNotFoundError,
    StepFailedError,
    StepTimeoutError,
    StorageError,
    WorkflowDefinitionError,
    WorkflowMismatchError,
)
from .log import configure_logging
from .models import (
    Checkpoint,
    CleanupResult,
    Session,
    SessionContext,
    SessionInfo,
    SessionMetadata,
    SessionMetrics,
    SessionStatus,
    ToolResult,
)
from .runner import Runner, RunnerHook, StepEvent
from .sessions import SessionManager
from .stores import FileStore, Lease, MemoryStore, PostgresStore, SQLiteStore, Store, open_store
from .workflow import Step, StepContext, Workflow

__all__ = [
    "Checkpoint",
    "CleanupResult",
    "CorruptSessionError",
    "DecryptionError",
    "EngineError",
    "FileStore",
    "InvalidArgumentError",
    "InvalidSessionIdError",
    "Lease",
    "LeaseLostError",
    "MemoryStore",
    "PostgresStore",
    "Runner",
    "RunnerHook",
    "SQLiteStore",
    "SerializationError",
    "Session",
    "SessionBusyError",
    "SessionCancelledError",
    "SessionContext",
    "SessionExistsError",
    "SessionExpiredError",
    "SessionInfo",
    "SessionLimitError",
    "SessionManager",
    "SessionMetadata",
    "SessionMetrics",
    "SessionNotFoundError",
    "SessionStatus",
    "Step",
    "StepContext",
    "StepEvent",
    "StepFailedError",
    "StepTimeoutError",
    "StorageError",
    "Store",
    "ToolResult",
    "Workflow",
    "WorkflowDefinitionError",
    "WorkflowMismatchError",
    "configure_logging",
    "open_store",
]
