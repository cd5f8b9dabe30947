"""The doctor's answer: one PASS / WARN / FAIL / SKIP line per check, and the verdict.

Kept apart from the checks so every check module (and `require_ready`) shares one line format
and one rule for "a run can proceed" (no FAIL line).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"


@dataclass(frozen=True)
class Check:
    """One line of the doctor's answer."""

    name: str
    status: str  # PASS | WARN | FAIL | SKIP
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status:<4}  {self.name:<15} {self.detail}"
        return f"{text} -> fix: {self.fix}" if self.fix and self.status in (FAIL, WARN) else text


@dataclass
class DoctorReport:
    target: str
    where: str  # "local" or user@host:port
    checks: list[Check] = field(default_factory=list)
    board: dict[str, Any] | None = None  # Jetson power/clock/thermal state, when probed

    @property
    def ok(self) -> bool:
        """A run can proceed: nothing FAILed."""
        return all(c.status != FAIL for c in self.checks)

    def add(self, name: str, status: str, detail: str, fix: str = "") -> None:
        self.checks.append(Check(name, status, " ".join(str(detail).split()), " ".join(fix.split())))

    def lines(self) -> list[str]:
        head = f"doctor: target {self.target} on {self.where}"
        verdict = "a run can proceed" if self.ok else "a run cannot proceed: fix the FAIL lines"
        return [head, *(c.line() for c in self.checks), f"{'OK' if self.ok else 'FAILED'}: {verdict}"]

    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

