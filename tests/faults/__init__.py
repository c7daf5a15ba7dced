"""Fault injection for the SSH fleet (``tests/test_faults.py``, pytest marker ``faults``).

Devices are real sshd processes, each in its own network namespace joined to the host by a veth pair
(:mod:`tests.faults.netns`), driven by the real fleet code (leases, retries, the device cache) and recorded in the
real results store (:mod:`tests.faults.lab`). Faults: the veth link taken down, nftables packet loss, tc token
bucket bandwidth limits, a delaying TCP proxy (:mod:`tests.faults.proxy`: this kernel has no netem), sshd or the
agent killed, the agent's address space limited, its process group stopped, cache files corrupted, a full tmpfs,
a stale lease. Needs root, ``ip``, ``nft``, ``tc`` and OpenSSH's sshd; skipped, saying which is missing, without.
"""
