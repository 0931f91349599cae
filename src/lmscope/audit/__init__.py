"""The audit: concept batteries, probes at every layer with controls, inside vs outside, a backdoor scan, and a
report with a traffic light per finding (see docs/audit.md)."""

from lmscope.audit.backdoor import ScanConfig, backdoor_scan
from lmscope.audit.batteries import BUILDERS, Battery, Item, Pair, Text, battery, read_battery, split_battery
from lmscope.audit.inside_outside import inside_outside
from lmscope.audit.probes import ProbeConfig, probe_battery, validity
from lmscope.audit.report import AuditConfig, run_audit, summary

__all__ = [
    "BUILDERS", "AuditConfig", "Battery", "Item", "Pair", "ProbeConfig", "ScanConfig", "Text", "backdoor_scan",
    "battery", "inside_outside", "probe_battery", "read_battery", "run_audit", "split_battery", "summary", "validity",
]  # fmt: skip
