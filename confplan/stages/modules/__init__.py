"""The stages of a migration, one module each; importing this package registers them all.

Every stage talks to the two VMM processes through ``_common.vmm`` (reconnecting to a VMM a previous
apply started), and every stage before resume-target registers only undo steps that leave the source
guest running: resume its vCPUs, close the stream. docs/migration.md walks through them.
"""

from confplan.stages.modules import (
    _reconcile,
    attest_target,
    cleanup_source,
    launch_source,
    precopy,
    provision_target,
    resume_target,
    start_incoming,
    stop_and_copy,
    verify,
)

__all__ = [
    "_reconcile",
    "attest_target",
    "cleanup_source",
    "launch_source",
    "precopy",
    "provision_target",
    "resume_target",
    "start_incoming",
    "stop_and_copy",
    "verify",
]
