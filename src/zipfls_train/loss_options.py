"""Facts about loss options that code without torch needs too (the table builder)."""

from __future__ import annotations

# Loss options that choose how a method is computed, not what it computes (the same numbers to float
# rounding): a checkpoint resumes under another value, and the table builder pools runs across them.
IMPLEMENTATION_OPTIONS = frozenset({"kernel"})
