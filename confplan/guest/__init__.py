"""The guest as the firmware, the VMM and the plan all see it: the ABI (``abi``, a mirror of
firmware/include/confplan_abi.h) and where everything sits in guest RAM (``layout``).

It sits below both ``plan`` and ``vmm`` so the plan's rules and the VMM check a guest against the same
numbers: ``confplan validate`` refuses what the VMM would refuse, from one source.
"""
