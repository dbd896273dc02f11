"""Moved to ``confplan.guest.abi`` (the plan's rules check a guest against the same limits, and the plan
may not import the VMM); re-exported here so existing imports keep working."""

from __future__ import annotations

from confplan.guest.abi import *  # noqa: F403
