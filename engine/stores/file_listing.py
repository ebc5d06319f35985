"""What a listing needs from a stored session, read without building the session.

A listing row (``SessionInfo``) needs a handful of top-level fields. Decoding the
whole ``Session`` to get them validates every tool result, output and event it
holds: at 100,000 sessions that is most of the time and memory a runner spends
on ``resume_all``. These models name only the row's fields; pydantic skips the
rest of the JSON without building it. Their defaults are ``Session``'s and
``Checkpoint``'s, since stored records leave default fields out.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from ..models import SessionInfo, SessionStatus, Timestamp


class CheckpointHead(BaseModel):
    """The fields of a stored ``Checkpoint`` a listing row follows."""

    model_config = ConfigDict(extra="ignore")

    revision: int
    status: SessionStatus
    last_activity: Timestamp
    expires_at: Timestamp
    step: str | None = None


class SessionHead(BaseModel):
    """The fields of a stored ``Session`` a listing row shows, kept current by ``apply``."""

    model_config = ConfigDict(extra="ignore")

    id: str
    status: SessionStatus = "pending"
    workflow: str | None = None
    created_at: Timestamp
    last_activity: Timestamp
    expires_at: Timestamp
    steps_done: list[str] = []
    revision: int = 0

    def apply(self, checkpoint: CheckpointHead) -> None:
        """Follow one checkpoint, as ``Session.apply`` does for these fields."""
        if checkpoint.step is not None:
            self.steps_done.append(checkpoint.step)
        self.status = checkpoint.status
        self.last_activity = checkpoint.last_activity
        self.expires_at = checkpoint.expires_at
        self.revision = checkpoint.revision

    @property
    def cursor(self) -> int:
        """Return how many steps are done, as ``Session.cursor`` does."""
        return len(self.steps_done)

    def info(self) -> SessionInfo:
        """Return the listing row, as ``SessionInfo.of`` makes it from the whole session."""
        return SessionInfo.of(self)
