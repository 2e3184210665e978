"""Data classification: what class a request's data is, and why.

The class comes from the ``x-data-classification`` header (default: public)
and is raised, never lowered, by PII detectors run over the prompt. Detectors
are policies registered by name; the ones with a published checksum (IBAN
mod-97, card Luhn, Spanish DNI letter, Dutch BSN 11-test, French NIR key)
check it, so random digit runs do not count as PII.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar, Iterable

from pydantic import Field, field_validator

from serve_app.errors import InvalidRequest
from serve_app.policy.registry import Policy, PolicyParams, make

HEADER_DATA_CLASS = "x-data-classification"


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
                f"{HEADER_DATA_CLASS} must be one of {', '.join(c.name for c in cls)}; got {value!r}",
                param=HEADER_DATA_CLASS,
            ) from None


@dataclass(frozen=True)
class Finding:
    detector: str
    data_class: DataClass


@dataclass(frozen=True)
class Classification:
    data_class: DataClass
    declared: DataClass
    findings: tuple[Finding, ...] = field(default_factory=tuple)

    @property
    def raised_by(self) -> list[str]:
        """Detector names that raised the class above the declared one (never the matched text)."""
        return sorted({f.detector for f in self.findings if f.data_class > self.declared})


class DetectorParams(PolicyParams):
    data_class: DataClass = Field(default=DataClass.confidential, description="Class a match raises the request to.")

    @field_validator("data_class", mode="before")
    @classmethod
    def _by_name(cls, value):
        return DataClass.parse(value) if isinstance(value, str) else value


class PiiDetector(Policy, kind="pii_detector"):
    """Finds one kind of personal data in text. ``_matches`` decides; ``detect`` wraps."""

    Params: ClassVar[type[PolicyParams]] = DetectorParams
    pattern: ClassVar[re.Pattern[str]]

    def detect(self, text: str) -> Finding | None:
        for match in self.pattern.finditer(text):
            if self._valid(match.group(0)):
                return Finding(self.name, self.params.data_class)
        return None

    def _valid(self, candidate: str) -> bool:
        return True


def _digits(text: str) -> str:
    return re.sub(r"\D", "", text)


def luhn_valid(number: str) -> bool:
    digits = [int(d) for d in number]
    total = 0
    for index, digit in enumerate(reversed(digits)):
        if index % 2 == 1:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


def iban_valid(candidate: str) -> bool:
    iban = re.sub(r"\s", "", candidate).upper()
    if not 15 <= len(iban) <= 34:
        return False
    rearranged = iban[4:] + iban[:4]
    numeric = "".join(str(int(ch, 36)) for ch in rearranged)
    return int(numeric) % 97 == 1


class EmailDetector(PiiDetector, name="email"):
    pattern = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")


class PhoneDetector(PiiDetector, name="phone"):
    """International (+CC ...) or European national (0 ...) numbers with 9 to 15 digits."""

    pattern = re.compile(r"(?<![\w+])(?:\+|00)[1-9]\d{0,2}[\s./-]?(?:\(?\d+\)?[\s./-]?){2,6}\d|(?<![\w+])0\d{2,4}[\s./-]?\d{3,4}[\s./-]?\d{2,4}(?!\w)")

    def _valid(self, candidate: str) -> bool:
        return 9 <= len(_digits(candidate)) <= 15


class IbanDetector(PiiDetector, name="iban"):
    pattern = re.compile(r"\b[A-Z]{2}\d{2}(?:\s?[A-Z0-9]{4}){2,7}(?:\s?[A-Z0-9]{1,4})?\b")

    def _valid(self, candidate: str) -> bool:
        return iban_valid(candidate)


class CardDetector(PiiDetector, name="card"):
    pattern = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")

    def _valid(self, candidate: str) -> bool:
        digits = _digits(candidate)
        return 13 <= len(digits) <= 19 and luhn_valid(digits)


class SpanishDniDetector(PiiDetector, name="es_dni"):
    pattern = re.compile(r"\b\d{8}-?[A-Za-z]\b")
    LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"

    def _valid(self, candidate: str) -> bool:
        return self.LETTERS[int(candidate[:8]) % 23] == candidate[-1].upper()


class DutchBsnDetector(PiiDetector, name="nl_bsn"):
    pattern = re.compile(r"(?<!\d)\d{9}(?!\d)")

    def _valid(self, candidate: str) -> bool:
        weights = [9, 8, 7, 6, 5, 4, 3, 2, -1]
        return sum(int(d) * w for d, w in zip(candidate, weights)) % 11 == 0 and candidate != "000000000"


class FrenchNirDetector(PiiDetector, name="fr_nir"):
    """French social security number: 13 digits (Corsica 2A/2B allowed) and a mod-97 key."""

    pattern = re.compile(r"\b[12]\s?\d{2}\s?\d{2}\s?(?:\d{2}|2[AB])\s?\d{3}\s?\d{3}\s?\d{2}\b")

    def _valid(self, candidate: str) -> bool:
        compact = re.sub(r"\s", "", candidate).upper()
        body, key = compact[:13], int(compact[13:])
        body = body.replace("2A", "19").replace("2B", "18")
        return 97 - int(body) % 97 == key


class ItalianFiscalCodeDetector(PiiDetector, name="it_codice_fiscale"):
    pattern = re.compile(r"\b[A-Z]{6}\d{2}[A-EHLMPRST]\d{2}[A-Z]\d{3}[A-Z]\b")


class UkNinoDetector(PiiDetector, name="uk_nino"):
    pattern = re.compile(r"\b(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]\s?\d{2}\s?\d{2}\s?\d{2}\s?[A-D]\b")


DEFAULT_DETECTORS = ("email", "phone", "iban", "card", "es_dni", "nl_bsn", "fr_nir", "it_codice_fiscale", "uk_nino")


class Classifier:
    """Declared class (header) raised by every detector that finds something in the texts."""

    def __init__(self, detectors: Iterable[PiiDetector]):
        self.detectors = list(detectors)

    @classmethod
    def from_names(cls, names: Iterable[str] = DEFAULT_DETECTORS, params: dict[str, dict] | None = None) -> "Classifier":
        params = params or {}
        return cls(make(PiiDetector, name, params.get(name)) for name in names)

    def classify(self, declared: DataClass, texts: Iterable[str]) -> Classification:
        findings: list[Finding] = []
        remaining = list(self.detectors)
        for text in texts:
            if not text:
                continue
            for detector in list(remaining):
                finding = detector.detect(text)
                if finding is not None:
                    findings.append(finding)
                    remaining.remove(detector)  # one finding per detector is enough
        level = max([declared, *(f.data_class for f in findings)])
        return Classification(DataClass(level), declared, tuple(findings))


def request_texts(body: dict) -> list[str]:
    """Every piece of user-supplied text in a chat or completions body (never logged)."""
    texts: list[str] = []
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        texts.append(prompt)
    elif isinstance(prompt, list):
        texts.extend(p for p in prompt if isinstance(p, str))
    for message in body.get("messages") or []:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(part.get("text", "") for part in content if isinstance(part, dict))
        for call in message.get("tool_calls") or []:
            if isinstance(call, dict) and isinstance(call.get("function"), dict):
                texts.append(str(call["function"].get("arguments", "")))
    return texts
