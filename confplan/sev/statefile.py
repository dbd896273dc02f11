"""Moved to ``confplan.statefile`` (the handover's durable records use it too, and they are not SEV's);
re-exported here so existing imports keep working."""

from __future__ import annotations

from confplan.statefile import pack_state, unpack_state, write_private

__all__ = ["pack_state", "unpack_state", "write_private"]
