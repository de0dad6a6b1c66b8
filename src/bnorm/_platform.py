"""Which processor this is, from Linux's ``/proc/cpuinfo``.

Two things depend on it: the kernels' choice of loops where the best one differs between
processors (``kernels.numba_cpu.RUN_BLOCK_BYTES``), and the name of ``bnorm bench``'s results
file (machines of one kind here come with Intel or AMD processors, whose ratios differ).
"""

from __future__ import annotations

from pathlib import Path

#: where the processor is described (a module attribute, so that tests can point it elsewhere)
CPUINFO = Path("/proc/cpuinfo")

_VENDORS = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}


def cpuinfo(field: str) -> str | None:
    """The first value of ``field`` (e.g. ``"model name"``) in ``/proc/cpuinfo``, or None
    (not Linux, or no such field)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == field:
            return value.strip()
    return None


def cpu_vendor() -> str | None:
    """``"intel"``, ``"amd"``, another vendor's id in lower case, or None where unknown."""
    vendor = cpuinfo("vendor_id")
    return None if vendor is None else _VENDORS.get(vendor, vendor.lower())
