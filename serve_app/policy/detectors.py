"""PII detectors: a linear-time candidate search, then a validator.

Each detector is a policy registered by name. Its ``pattern`` is RE2 syntax (google-re2): matching
is linear in the text whatever the input, so no prompt can make the router backtrack (Python's
``re`` took 110 s on ``"a." * 200000`` with the old e-mail pattern). Every quantifier is bounded,
so a match is at most a few hundred characters long. RE2 has no look-around: a detector states
which characters may not touch a match (``edge``) and the check runs on the match's neighbours.

Validators come from well-kept libraries where one exists: python-stdnum for IBAN (ISO 13616
country formats and mod-97), card numbers (Luhn), Spanish DNI/NIE, Dutch BSN (11-test), French NIR
and Italian codice fiscale (check characters), Google's phonenumbers for phone numbers (numbering
plans per country). Random digit runs therefore rarely count as PII.

Work is bounded per request: a detector validates at most ``max_candidates`` matches. A text with
more candidates than that is reported as a finding (fail closed: the request is treated as if it
held the data) rather than scanned without end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterable

import re2
from pydantic import Field, field_validator

from serve_app.policy.classify import DataClass, Finding
from serve_app.policy.registry import Policy, PolicyParams, make

DIGITS = "0123456789"
ALNUM = DIGITS + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
RE2_OPTIONS = re2.Options()
RE2_OPTIONS.max_mem = 64 << 20
MAX_GROUP_STARTS = 32  # start groups tried within one run of digits
SEPARATOR = "\n"  # between the strings of one body; no pattern below matches a line break


class DetectorParams(PolicyParams):
    data_class: DataClass = Field(default=DataClass.confidential, description="Class a match raises the request to.")
    max_candidates: int = Field(
        default=1024, gt=0,
        description="Matches (and digit groups within runs) examined per request; past it, a finding (fail closed).",
    )

    @field_validator("data_class", mode="before")
    @classmethod
    def _by_name(cls, value):
        return DataClass.parse(value) if isinstance(value, str) else value


class PhoneParams(DetectorParams):
    regions: tuple[str, ...] = Field(
        default=("DE", "FR", "ES", "IT", "NL", "BE", "AT", "CH", "GB", "IE", "PT", "PL", "SE", "DK", "US"),
        description="Countries whose national format (no +country code) is recognised, ISO 3166 alpha-2.",
    )


@dataclass
class Budget:
    """Candidates a detector may still validate for this request."""

    left: int


class PiiDetector(Policy, kind="pii_detector"):
    """Finds one kind of personal data in normalised text. ``detect`` searches and counts;
    ``_valid`` decides whether a candidate is the real thing."""

    Params: ClassVar[type[PolicyParams]] = DetectorParams
    pattern: ClassVar[str]
    edge: ClassVar[str] = ""  # characters that may not directly precede or follow a match
    _compiled: ClassVar[object]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "pattern" in cls.__dict__:
            cls._compiled = re2.compile(cls.pattern, RE2_OPTIONS)

    def budget(self) -> Budget:
        return Budget(self.params.max_candidates)

    def detect(self, text: str, budget: Budget) -> Finding | None:
        """A finding when ``text`` holds a valid match, or when the budget of candidates runs out."""
        for match in self._compiled.finditer(text):
            candidate = match.group(0)
            cost = self._cost(candidate)
            if cost > budget.left:
                return Finding(f"{self.name}:too_many_candidates", self.params.data_class)
            budget.left -= cost
            start, end = match.start(), match.end()
            if self.edge and ((start > 0 and text[start - 1] in self.edge) or (end < len(text) and text[end] in self.edge)):
                continue
            if self._valid(candidate):
                return Finding(self.name, self.params.data_class)
        return None

    def spans(self, text: str, budget: Budget) -> list[tuple[int, int]] | None:
        """Every valid match's ``(start, end)``, for redaction; ``None`` when the budget ran out
        (the caller must then treat the text as holding data it could not find: fail closed)."""
        found = []
        for match in self._compiled.finditer(text):
            candidate = match.group(0)
            cost = self._cost(candidate)
            if cost > budget.left:
                return None
            budget.left -= cost
            start, end = match.start(), match.end()
            if self.edge and ((start > 0 and text[start - 1] in self.edge) or (end < len(text) and text[end] in self.edge)):
                continue
            if self._valid(candidate):
                found.append((start, end))
        return found

    def _cost(self, candidate: str) -> int:
        """Budget units examining ``candidate`` takes."""
        return 1

    def _valid(self, candidate: str) -> bool:
        return True


def _compact(candidate: str, drop: str = " .-/()\t") -> str:
    return candidate.translate({ord(c): None for c in drop})


class EmailDetector(PiiDetector, name="email"):
    """Something@domain.tld; RE2 keeps even unbounded repetitions linear, and their automaton small."""

    pattern = r"[\pL\pN._%+\-]+@[\pL\pN\-]+(?:\.[\pL\pN\-]+)*\.\pL{2,}"


SEPARATORS = " .-/()\t+"


def _group_count(run: str) -> int:
    return 1 + sum(run.count(c) for c in SEPARATORS)


def _groups(run: str, separators: str = SEPARATORS) -> list[str]:
    """The digit groups of a run ("+41 44 668" -> ["41", "44", "668"])."""
    return [g for g in run.translate({ord(c): " " for c in separators}).split(" ") if g]


def _windows(groups: list[str], min_digits: int, max_digits: int, starts: int = MAX_GROUP_STARTS):
    """Digit strings made of consecutive groups with ``min_digits`` to ``max_digits`` digits, for a
    number written next to others in one run ("4111 1111 1111 1111 2025"). Bounded: at most
    ``starts`` start groups."""
    for first in range(min(len(groups), starts)):
        digits = ""
        for group in groups[first:]:
            digits += group
            if len(digits) > max_digits:
                break
            if len(digits) >= min_digits:
                yield digits


class PhoneDetector(PiiDetector, name="phone"):
    """International numbers (+CC or 00CC) and national numbers of the configured countries,
    accepted only when valid in that country's numbering plan. A candidate is a maximal run of
    digits and separators, so a long digit string is one candidate, not thousands."""

    Params = PhoneParams
    pattern = r"(?:\+|00)?\(?\d(?:[ \t().\-/]{0,2}\d){6,}"

    def _cost(self, candidate: str) -> int:
        return _group_count(candidate)

    def _valid(self, candidate: str) -> bool:
        import phonenumbers

        international = candidate.startswith("+") or candidate.startswith("00")
        groups = _groups(candidate[2:] if candidate.startswith("00") else candidate)
        for digits in _windows(groups, 7, 15, starts=1 if international else MAX_GROUP_STARTS):
            if international and _valid_phone(phonenumbers, "+" + digits, None):
                return True
            if not international and digits.startswith("0") and any(
                    _valid_phone(phonenumbers, digits, region) for region in self.params.regions):
                return True
        return False


def _valid_phone(phonenumbers, number: str, region: str | None) -> bool:
    try:
        return phonenumbers.is_valid_number(phonenumbers.parse(number, region))
    except phonenumbers.NumberParseException:
        return False


class IbanDetector(PiiDetector, name="iban"):
    """Printed compact or in groups of four; validated against the country's format and mod-97."""

    pattern = r"(?i)[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?"
    edge = ALNUM

    def _valid(self, candidate: str) -> bool:
        from stdnum import iban

        return iban.is_valid(_compact(candidate).upper())


class CardDetector(PiiDetector, name="card"):
    """13 to 19 digits, separated by spaces, dots or dashes or not at all, passing the Luhn check.
    A candidate is a maximal run, so digits around the number do not hide it (and a long run is
    one candidate)."""

    pattern = r"\d(?:[ .\-]?\d){12,}"

    def _cost(self, candidate: str) -> int:
        return _group_count(candidate)

    def _valid(self, candidate: str) -> bool:
        from stdnum import luhn

        return any(luhn.is_valid(digits) for digits in _windows(_groups(candidate), 13, 19))


class SpanishDniDetector(PiiDetector, name="es_dni"):
    """Spanish DNI (8 digits and a check letter) and NIE (X/Y/Z, 7 digits, check letter)."""

    pattern = r"(?i)(?:[XYZ][ \-]?\d{7}|\d{8})[ \-]?[A-Z]"
    edge = ALNUM

    def _valid(self, candidate: str) -> bool:
        from stdnum.es import dni, nie

        compact = _compact(candidate).upper()
        return (nie if compact[0] in "XYZ" else dni).is_valid(compact)


class DutchBsnDetector(PiiDetector, name="nl_bsn"):
    """Nine digits (or 1234.56.789) passing the 11-test; a longer digit run is not a BSN."""

    pattern = r"\d{4}\.\d{2}\.\d{3}|\d{9,}"
    edge = DIGITS

    def _valid(self, candidate: str) -> bool:
        from stdnum.nl import bsn

        compact = _compact(candidate)
        return len(compact) == 9 and bsn.is_valid(compact)


class FrenchNirDetector(PiiDetector, name="fr_nir"):
    """French social security number: 13 characters (Corsica 2A/2B) and a mod-97 key."""

    pattern = r"(?i)[12] ?\d{2} ?\d{2} ?(?:\d{2}|2[AB]) ?\d{3} ?\d{3} ?\d{2}"
    edge = ALNUM

    def _valid(self, candidate: str) -> bool:
        from stdnum.fr import nir

        return nir.is_valid(_compact(candidate).upper())


class ItalianFiscalCodeDetector(PiiDetector, name="it_codice_fiscale"):
    """Including omocodia variants (letters standing for digits), with the check character."""

    pattern = r"(?i)[A-Z]{6}[0-9LMNPQRSTUV]{2}[A-EHLMPRST][0-9LMNPQRSTUV]{2}[A-Z][0-9LMNPQRSTUV]{3}[A-Z]"
    edge = ALNUM

    def _valid(self, candidate: str) -> bool:
        from stdnum.it import codicefiscale

        return codicefiscale.is_valid(candidate.upper())


class UkNinoDetector(PiiDetector, name="uk_nino"):
    """UK National Insurance number; prefixes that are never issued do not count."""

    pattern = r"(?i)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]"
    edge = ALNUM
    NEVER_ISSUED = frozenset({"BG", "GB", "NK", "KN", "TN", "NT", "ZZ"})

    def _valid(self, candidate: str) -> bool:
        return candidate[:2].upper() not in self.NEVER_ISSUED


DEFAULT_DETECTORS = ("email", "phone", "iban", "card", "es_dni", "nl_bsn", "fr_nir", "it_codice_fiscale", "uk_nino")


class DetectorSet:
    """The detectors a router runs, each stopping at its first finding."""

    def __init__(self, detectors: Iterable[PiiDetector]):
        self.detectors = list(detectors)

    @classmethod
    def from_names(cls, names: Iterable[str] = DEFAULT_DETECTORS, params: dict[str, dict] | None = None) -> "DetectorSet":
        params = params or {}
        return cls(make(PiiDetector, name, params.get(name)) for name in names)

    def scan(self, texts: Iterable[str]) -> tuple[Finding, ...]:
        """Findings over normalised ``texts`` (at most one per detector). The texts are joined by
        a line break, which no pattern matches across, so each detector makes one pass however
        many small strings a body holds."""
        text = SEPARATOR.join(texts)
        findings = []
        for detector in self.detectors:
            finding = detector.detect(text, detector.budget())
            if finding is not None:
                findings.append(finding)
        return tuple(findings)
