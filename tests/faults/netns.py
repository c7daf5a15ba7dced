"""Network namespaces joined to the host by veth pairs, and the faults put on them (``ip``, ``nft``, ``tc``).

Every name made here starts with :data:`PREFIX` and carries the pytest process's pid (``epf<pid>n<i>`` for a
namespace, ``epf<pid>h<i>``/``epf<pid>d<i>`` for the host and device ends of its veth pair), so that a later run
can tell its own leftovers from another live run's (:func:`sweep_stale`). Addresses are /30s in 10.231.0.0/16,
host end ``.1``, device end ``.2``; nothing here touches any other address or interface.

Link faults are put on the *device* end (``ip link set DEV down`` inside the namespace): like a cable pulled at
the device, the host keeps its route and sees silence (timeouts), not an immediate "network unreachable".
"""
from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

PREFIX = "epf"
SUBNET = ipaddress.ip_network("10.231.0.0/16")
NFT_TABLE = "edgeprune_fault"
IP = shutil.which("ip") or "/usr/sbin/ip"
TC = shutil.which("tc") or "/usr/sbin/tc"
NFT = shutil.which("nft") or "/usr/sbin/nft"


class NetError(RuntimeError):
    pass


def sh(*argv: str, ns: Optional[str] = None, check: bool = True, timeout: float = 20.0) -> str:
    """Run a command (inside namespace ``ns`` when given); its stdout. NetError with stderr on failure."""
    cmd = [IP, "netns", "exec", ns, *argv] if ns else list(argv)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise NetError("%s: exit %d: %s" % (" ".join(cmd), r.returncode, (r.stderr or r.stdout).strip()))
    return r.stdout


def missing_requirements() -> Optional[str]:
    """Why the fault suite cannot run here (None when it can): root, ip netns, nft and tc are needed."""
    if os.geteuid() != 0:
        return "fault injection needs root (network namespaces, nftables, tc)"
    for tool, path in (("ip", IP), ("nft", NFT), ("tc", TC)):
        if not os.access(path, os.X_OK):
            return "%s not installed (%s): apt-get install iproute2 nftables" % (tool, path)
    probe = "%s%dprobe" % (PREFIX, os.getpid())
    try:
        sh(IP, "netns", "add", probe)
        try:
            sh(NFT, "list", "tables", ns=probe)
        finally:
            sh(IP, "netns", "del", probe, check=False)
    except (NetError, OSError, subprocess.TimeoutExpired) as e:
        return "cannot create a network namespace with nftables in it here: %s" % e
    return None


def namespaces() -> List[str]:
    out = sh(IP, "netns", "list", check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def links() -> List[str]:
    out = sh(IP, "-o", "link", "show", check=False)
    return [m.group(1) for m in re.finditer(r"^\d+: ([^:@\s]+)[@:]", out, re.M)]


def ns_pids(ns: str) -> List[int]:
    return [int(p) for p in sh(IP, "netns", "pids", ns, check=False).split()]


def _used_subnets() -> set:
    used = set()
    for m in re.finditer(r"inet (10\.231\.\d+\.\d+)/", sh(IP, "-4", "-o", "addr", "show", check=False)):
        used.add(ipaddress.ip_network(m.group(1) + "/30", strict=False))
    return used


@dataclass
class VethNamespace:
    """One namespace, its veth pair and the faults currently on it."""

    name: str
    host_if: str
    dev_if: str
    host_ip: str
    dev_ip: str

    # ------------------------------------------------------------------ life cycle
    @classmethod
    def create(cls, index: int) -> "VethNamespace":
        tag = "%s%d" % (PREFIX, os.getpid())
        name, host_if, dev_if = "%sn%d" % (tag, index), "%sh%d" % (tag, index), "%sd%d" % (tag, index)
        if len(host_if) > 15:
            raise NetError("interface name %s is too long" % host_if)
        used = _used_subnets()
        start = (os.getpid() * 16 + index) % (SUBNET.num_addresses // 4)
        subnets = list(SUBNET.subnets(new_prefix=30))
        net = next(subnets[(start + k) % len(subnets)] for k in range(len(subnets))
                   if subnets[(start + k) % len(subnets)] not in used)
        host_ip, dev_ip = str(net.network_address + 1), str(net.network_address + 2)
        self = cls(name, host_if, dev_if, host_ip, dev_ip)
        try:
            sh(IP, "netns", "add", name)
            sh(IP, "link", "add", host_if, "type", "veth", "peer", "name", dev_if)
            sh(IP, "link", "set", dev_if, "netns", name)
            sh(IP, "addr", "add", host_ip + "/30", "dev", host_if)
            sh(IP, "link", "set", host_if, "up")
            sh(IP, "addr", "add", dev_ip + "/30", "dev", dev_if, ns=name)
            sh(IP, "link", "set", dev_if, "up", ns=name)
            sh(IP, "link", "set", "lo", "up", ns=name)
        except BaseException:
            self.destroy()
            raise
        return self

    def destroy(self) -> None:
        """Kill whatever runs in the namespace, then delete it (its veth pair, nft table and qdiscs go with it)."""
        if self.name in namespaces():
            for pid in ns_pids(self.name):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while ns_pids(self.name) and time.monotonic() < deadline:
                time.sleep(0.05)
            sh(IP, "netns", "del", self.name, check=False)
        if self.host_if in links():
            sh(IP, "link", "del", self.host_if, check=False)

    def pids(self) -> List[int]:
        return ns_pids(self.name)

    # ------------------------------------------------------------------ faults
    def link(self, up: bool) -> None:
        sh(IP, "link", "set", self.dev_if, "up" if up else "down", ns=self.name)
        if up:
            # back means usable: the host end has its carrier again, and no neighbour entry left FAILED by the
            # outage answers the next connect with "No route to host" before ARP is tried again
            carrier = Path("/sys/class/net/%s/carrier" % self.host_if)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    if carrier.read_text().strip() == "1":
                        break
                except OSError:     # no carrier yet: reading it fails with EINVAL
                    pass
                time.sleep(0.01)
            sh(IP, "neigh", "flush", "dev", self.host_if, check=False)
            sh(IP, "neigh", "flush", "dev", self.dev_if, ns=self.name, check=False)

    def loss(self, percent: int) -> None:
        """Drop ``percent`` % of the packets entering and leaving the device (nftables in its namespace)."""
        self.clear_loss()
        rule = "numgen random mod 100 < %d drop" % percent
        script = ("table inet %s {\n chain input { type filter hook input priority 0; policy accept; %s; }\n"
                  " chain output { type filter hook output priority 0; policy accept; %s; }\n}\n"
                  % (NFT_TABLE, rule, rule))
        r = subprocess.run([IP, "netns", "exec", self.name, NFT, "-f", "-"], input=script, capture_output=True,
                           text=True, timeout=20)
        if r.returncode != 0:
            raise NetError("nft: %s" % r.stderr.strip())

    def clear_loss(self) -> None:
        if NFT_TABLE in sh(NFT, "list", "tables", ns=self.name, check=False):
            sh(NFT, "delete", "table", "inet", NFT_TABLE, ns=self.name)

    def nft_tables(self) -> str:
        return sh(NFT, "list", "tables", ns=self.name, check=False)

    def rate(self, rate: str = "1mbit") -> None:
        """Token-bucket limit both ends of the veth pair to ``rate`` (each direction)."""
        self.clear_rate()
        args = ["tbf", "rate", rate, "burst", "32kbit", "latency", "400ms"]
        sh(TC, "qdisc", "add", "dev", self.host_if, "root", *args)
        sh(TC, "qdisc", "add", "dev", self.dev_if, "root", *args, ns=self.name)

    def clear_rate(self) -> None:
        sh(TC, "qdisc", "del", "dev", self.host_if, "root", check=False)
        sh(TC, "qdisc", "del", "dev", self.dev_if, "root", ns=self.name, check=False)

    def qdiscs(self) -> str:
        return sh(TC, "qdisc", "show", "dev", self.host_if, check=False) + sh(
            TC, "qdisc", "show", "dev", self.dev_if, ns=self.name, check=False)


def ours(name: str) -> bool:
    """Whether this process made that namespace or interface."""
    return re.match(r"^%s%d[nhd]\d+$" % (PREFIX, os.getpid()), name) is not None


def sweep_stale() -> List[str]:
    """Delete namespaces and veths left by an earlier run that died (its pid, in the name, is gone)."""
    removed = []
    for kind, names in (("netns", namespaces()), ("link", links())):
        for name in names:
            m = re.match(r"^%s(\d+)[nhd]\d+$" % PREFIX, name)
            if not m or int(m.group(1)) == os.getpid() or Path("/proc/%s" % m.group(1)).exists():
                continue
            if kind == "netns":
                for pid in ns_pids(name):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                sh(IP, "netns", "del", name, check=False)
            elif name in links():                 # (gone already if its namespace held the other end)
                sh(IP, "link", "del", name, check=False)
            else:
                continue
            removed.append(name)
    return removed
