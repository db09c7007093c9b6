"""What a set format implements, and the registry of formats."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from moedd.data import Prepared
from moedd.registry import Registry
from moedd.synthetic import SyntheticMeta, SyntheticSet


class SetFormat(ABC):
    """A distilled-set format of another project: how a moedd set is written in it and read from it."""

    name: str

    @abstractmethod
    def export(self, syn: SyntheticSet, out: Path) -> list[Path]:
        """Write ``syn`` (every expert, decoded) at ``out``; return the files written."""

    @abstractmethod
    def read(self, path: Path, prepared: Prepared, method: str, learned_lr: float | None) -> tuple[list, list, list[SyntheticMeta]]:
        """(images per expert, labels per expert, metadata per expert) of the set at ``path``, in
        ``prepared``'s normalised space and label order (one line for anything that does not fit)."""


FORMATS: Registry[type[SetFormat]] = Registry("set format")
"""Formats by name (``folder``; the DC / MTT / DATM / IDC formats are not implemented yet)."""
