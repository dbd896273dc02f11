"""The VMM process: one machine behind the control RPC (``confplan vmm`` locally, ``confplan agent`` on a
remote host), and the orchestrator's handle on it. docs/migration.md describes both."""
