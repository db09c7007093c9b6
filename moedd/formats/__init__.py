"""Distilled sets in other projects' formats: ``moedd export`` writes a moedd set in one,
``moedd import`` reads one into a moedd set (so ``moedd evaluate`` judges it under the one
protocol). One module per format, registered in :data:`FORMATS` by name."""

from __future__ import annotations

from moedd.formats.base import FORMATS, Imported, ImportOptions, SetFormat
from moedd.formats import dc as _dc, datm as _datm, folder as _folder, idc as _idc, mtt as _mtt  # noqa: F401  (register)

__all__ = ["FORMATS", "Imported", "ImportOptions", "SetFormat"]
