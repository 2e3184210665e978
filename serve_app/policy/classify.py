"""Data classes, text normalisation, and the classification of a request's scanned text.

The class of a request comes from the ``x-data-classification`` header (else the router's default)
and is raised, never lowered, by what a scan of the body finds:

- a PII detector's match (detectors live in ``serve_app.policy.detectors``);
- content the router cannot read as text (token-id prompts, images, audio, files): it is raised
  to ``opaque_data_class`` (confidential by default) unless the client declared a class;
- a scan that failed: fail closed, confidential.

Matching runs on normalised text, so the cheap tricks do not hide data: NFKC folds fullwidth and
compatibility forms (``＠`` -> ``@``, ``４`` -> ``4``), format characters (zero-width space and
joiners, soft hyphen, bidi controls, tags) and variation selectors are removed, and decimal digits
of every script become ASCII digits.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from enum import IntEnum
from functools import lru_cache

from serve_app.errors import InvalidRequest

HEADER_DATA_CLASS = "x-data-classification"
CLASSIFIER_ERROR = "classifier_error"


class DataClass(IntEnum):
    """Ordered: a higher value is more sensitive."""

    public = 0
    internal = 1
    confidential = 2
    restricted = 3

    @classmethod
    def parse(cls, value: str | None, default: "DataClass | None" = None) -> "DataClass":
        if value is None or value == "":
            return default if default is not None else cls.public
        try:
            return cls[value.strip().lower()]
        except KeyError:
            raise InvalidRequest(
                f"{HEADER_DATA_CLASS} must be one of {', '.join(c.name for c in cls)}",
                param=HEADER_DATA_CLASS,
            ) from None


@dataclass(frozen=True)
class Finding:
    """A detector (or a rule, such as opaque content) that raised the class, never the matched text."""

    detector: str
    data_class: DataClass


@dataclass(frozen=True)
class Classification:
    data_class: DataClass
    declared: DataClass
    findings: tuple[Finding, ...] = field(default_factory=tuple)

    @property
    def raised_by(self) -> list[str]:
        """Names of what raised the class above the declared one."""
        return sorted({f.detector for f in self.findings if f.data_class > self.declared})


def classify(declared: DataClass, findings: tuple[Finding, ...]) -> Classification:
    level = max([declared, *(f.data_class for f in findings)])
    return Classification(DataClass(level), declared, findings)


# ---- normalisation ---------------------------------------------------------------------------

# Invisible characters that are not format characters (category Cf) but hide text all the same.
_EXTRA_INVISIBLE = [0x034F, 0x115F, 0x1160, 0x3164, 0xFFA0, *range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0)]


@lru_cache(maxsize=1)
def _translation() -> dict[int, int | None]:
    """Code point -> replacement: format characters and invisibles removed, every decimal digit
    mapped to its ASCII digit. Built once per process (about 0.2 s)."""
    table: dict[int, int | None] = {}
    for code in range(0x80, 0x110000):
        category = unicodedata.category(chr(code))
        if category == "Cf":
            table[code] = None
        elif category == "Nd":
            table[code] = ord("0") + unicodedata.decimal(chr(code))
    for code in _EXTRA_INVISIBLE:
        table[code] = None
    return table


def normalize(text: str) -> str:
    """The text detectors see. ASCII text is returned as it is (nothing to fold or hide in it)."""
    if text.isascii():
        return text
    return unicodedata.normalize("NFKC", text).translate(_translation())
