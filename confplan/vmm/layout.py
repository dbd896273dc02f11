"""Moved to ``confplan.guest.layout`` (the plan's rules compute the smallest guest with it, and the plan
may not import the VMM); re-exported here so existing imports keep working."""

from __future__ import annotations

from confplan.guest.layout import LEDGER_ENTRY, WL_STACK_SIZE, GuestLayout, GuestShape

__all__ = ["LEDGER_ENTRY", "WL_STACK_SIZE", "GuestLayout", "GuestShape"]
