"""Distilled sets in other projects' formats: ``moedd export`` writes a moedd set in one,
``moedd import`` reads one into a moedd set (so ``moedd evaluate`` judges it under the one
protocol). One module per format, registered in :data:`FORMATS` by name."""

from __future__ import annotations

from moedd.formats.base import FORMATS, SetFormat
from moedd.formats import folder as _folder  # noqa: F401  (registers "folder")

__all__ = ["FORMATS", "SetFormat"]
