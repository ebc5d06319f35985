"""Turning step values into stored JSON and back, and the digests that name them."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

import pydantic_core
from pydantic import TypeAdapter, ValidationError

from .errors import SerializationError, WorkflowMismatchError


def to_json(value: Any, what: str) -> Any:
    """Convert ``value`` to plain JSON data, or say clearly what cannot be stored."""
    try:
        return pydantic_core.to_jsonable_python(value)
    except (pydantic_core.PydanticSerializationError, ValueError, TypeError) as exc:
        raise SerializationError(f"{what} is not JSON-serializable: {exc}") from None


def to_standard_json(value: Any) -> Any:
    """Return ``value`` as JSON data any parser accepts: NaN and infinities as null.

    Stored records keep them (``models.StoredModel``) so a resumed step gets its
    float back; JSON itself has no such numbers, and ``JSON.parse`` or ``jq`` reject
    them. What the command line prints and the dashboard serves uses this.
    """
    return _finite(pydantic_core.to_jsonable_python(value))


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def restore(adapter: TypeAdapter[Any], stored: Any, session_id: str, name: str) -> Any:
    """Validate stored JSON back into its declared type.

    Raises:
        WorkflowMismatchError: the stored value no longer fits the type.
    """
    try:
        return adapter.validate_python(stored)
    except ValidationError as exc:
        raise WorkflowMismatchError(
            f"session {session_id}: stored value of {name!r} no longer fits its type: {exc}"
        ) from None


def digest(value: Any, what: str) -> str:
    """Return a short, stable hash of ``value``'s JSON form (an input digest)."""
    data = pydantic_core.to_json(to_json(value, what))
    return hashlib.sha256(data).hexdigest()[:32]


def state_changes(
    before: Mapping[str, Any], after: Mapping[str, Any], by: str
) -> tuple[dict[str, Any], list[str]]:
    """Return the top-level keys set or removed (``by`` a step, say), as JSON: the delta."""
    changed = {
        key: value for key, value in after.items() if key not in before or before[key] != value
    }
    removed = [key for key in before if key not in after]
    return to_json(changed, f"the state set by {by}"), removed
