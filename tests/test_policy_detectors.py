"""Classification: PII detectors (RE2 candidates, checksum validators), normalisation against
Unicode tricks, bounded work on pathological input, fail-closed budgets, raise-never-lower."""

import time

import pytest

from serve_app.errors import ConfigError, InvalidRequest
from serve_app.policy.classify import DataClass, Finding, classify, normalize
from serve_app.policy.detectors import DEFAULT_DETECTORS, DetectorSet, PiiDetector
from serve_app.policy.registry import make

ZWSP, ZWJ, SOFT_HYPHEN, WORD_JOINER = "\u200b", "\u200d", "\u00ad", "\u2060"


def found(detector: str, text: str) -> list[str]:
    det = make(PiiDetector, detector)
    finding = det.detect(normalize(text), det.budget())
    return [] if finding is None else [finding.detector]


def nir(body: str) -> str:
    return body + f"{97 - int(body) % 97:02d}"


@pytest.mark.parametrize(
    "detector, text",
    [
        ("email", "write to jane.doe+x@example.co.uk please"),
        ("phone", "call me on +49 30 1234567"),
        ("phone", "mobile +33 6 12 34 56 78"),
        ("phone", "office 030 1234 5678"),
        ("phone", "Zürich 044 668 18 00"),
        ("iban", "pay DE89 3704 0044 0532 0130 00 today"),
        ("iban", "GB82WEST12345698765432"),
        ("iban", "lower case de89 3704 0044 0532 0130 00"),
        ("card", "card 4111 1111 1111 1111 exp 12/29"),
        ("card", "5500-0000-0000-0004"),
        ("card", "4111 1111 1111 1111 2029"),  # digits around the number do not hide it
        ("es_dni", "DNI 12345678Z"),
        ("es_dni", "NIE X1234567L"),
        ("nl_bsn", "BSN 111222333"),
        ("nl_bsn", "BSN x111222333"),  # glued to a letter
        ("fr_nir", "NIR " + nir("2550814168025")),
        ("it_codice_fiscale", "CF RSSMRA85T10A562S"),
        ("uk_nino", "NI number AB 12 34 56 C"),
    ],
)
def test_each_detector_finds_its_pii(detector, text):
    assert found(detector, text) == [detector]


@pytest.mark.parametrize(
    "detector, text",
    [
        ("email", "no at sign here, just example.com"),
        ("phone", "order 12345 shipped"),
        ("phone", "timestamp 1700000000123"),
        ("iban", "DE89 3704 0044 0532 0130 01"),  # checksum off by one
        ("card", "4111 1111 1111 1112"),  # fails Luhn
        ("card", "version 2026.11.22 build 7"),
        ("es_dni", "12345678A"),  # wrong letter
        ("nl_bsn", "123456789"),  # fails the 11-test
        ("nl_bsn", "1112223330"),  # ten digits are no BSN
        ("fr_nir", "2550814168025" + "00"),
        ("uk_nino", "QQ 12 34 56 E"),
        ("uk_nino", "GB 12 34 56 C"),  # a prefix never issued
    ],
)
def test_detectors_reject_lookalikes(detector, text):
    assert found(detector, text) == []


@pytest.mark.parametrize(
    "detector, text",
    [
        ("email", f"john{ZWSP}@example.com"),  # zero-width space
        ("email", "john\uff20example.com"),  # fullwidth at sign
        ("email", f"jo{SOFT_HYPHEN}hn@exa{WORD_JOINER}mple.com"),
        ("iban", ZWJ.join(["DE89", "3704", "0044", "0532", "0130", "00"])),  # zero-width joiners
        ("card", "4111.1111.1111.1111"),  # dots as separators
        ("card", "\uff14\uff11\uff11\uff11 1111 1111 1111"),  # fullwidth digits
        ("card", "\u0664\u0661\u0661\u0661 \u0661\u0661\u0661\u0661 \u0661\u0661\u0661\u0661 \u0661\u0661\u0661\u0661"),
        ("phone", f"+41{ZWSP}44{ZWSP}668{ZWSP}18{ZWSP}00"),
        ("nl_bsn", f"111{WORD_JOINER}222{WORD_JOINER}333"),
        ("iban", "DE89\ufe0f3704 0044 0532 0130 00"),  # a variation selector
    ],
)
def test_unicode_tricks_do_not_hide_pii(detector, text):
    assert found(detector, text) == [detector]


def test_normalisation_folds_compatibility_forms_and_drops_invisibles():
    assert normalize("plain ascii stays as it is") == "plain ascii stays as it is"
    assert normalize(f"a{ZWSP}b{ZWJ}c{SOFT_HYPHEN}d\u202ee") == "abcde"
    assert normalize("\uff21\uff22\uff10\uff11") == "AB01"
    assert normalize("\u0967\u0968\u0969") == "123"  # Devanagari digits


@pytest.mark.parametrize("hostile", [
    "a." * 200_000,  # made Python's re backtrack for 110 s with the old e-mail pattern
    "a@" * 200_000,
    "@" * 400_000,
    "+1" * 200_000,
    "0" * 400_000,
    "1 " * 200_000,
    "x@y." * 100_000,
    ("4111 " * 80_000),
])
def test_pathological_input_costs_linear_bounded_time(hostile):
    detectors = DetectorSet.from_names()
    started = time.perf_counter()
    detectors.scan([normalize(hostile)])
    # 400 KB through all nine detectors; the old e-mail regex alone needed minutes on the first one.
    assert time.perf_counter() - started < 2.0


def test_too_many_candidates_fail_closed_instead_of_scanning_forever():
    det = make(PiiDetector, "nl_bsn", {"max_candidates": 10})
    finding = det.detect(" ".join(["123456789"] * 50), det.budget())  # 50 invalid BSN-shaped numbers
    assert finding is not None and finding.detector == "nl_bsn:too_many_candidates"
    assert finding.data_class is DataClass.confidential
    roomy = make(PiiDetector, "nl_bsn", {"max_candidates": 100})
    budget = roomy.budget()
    assert roomy.detect(" ".join(["123456789"] * 50), budget) is None and budget.left == 50


def test_header_parsing():
    assert DataClass.parse(None) is DataClass.public
    assert DataClass.parse(" Confidential ") is DataClass.confidential
    with pytest.raises(InvalidRequest, match="x-data-classification"):
        DataClass.parse("secret-ish")


def test_findings_raise_but_never_lower_the_class():
    detectors = DetectorSet.from_names()
    assert detectors.scan(["hello world"]) == ()
    findings = detectors.scan(["my email is a@b.io", "IBAN DE89370400440532013000"])
    raised = classify(DataClass.internal, findings)
    assert raised.data_class is DataClass.confidential and raised.raised_by == ["email", "iban"]
    kept = classify(DataClass.restricted, (Finding("email", DataClass.confidential),))
    assert kept.data_class is DataClass.restricted and kept.raised_by == []  # never lowers a declared class


def test_detector_class_is_configurable_and_unknown_names_fail():
    detectors = DetectorSet.from_names(["card"], {"card": {"data_class": "restricted"}})
    assert classify(DataClass.public, detectors.scan(["4111111111111111"])).data_class is DataClass.restricted
    with pytest.raises(ConfigError, match="Unknown pii_detector policy 'ssn'; known: card"):
        DetectorSet.from_names(["ssn"])
    with pytest.raises(ConfigError, match="invalid parameters"):
        DetectorSet.from_names(["card"], {"card": {"threshold": 3}})
    assert set(DEFAULT_DETECTORS) == set(PiiDetector.registered())


def test_separate_strings_never_combine_into_a_match():
    detectors = DetectorSet.from_names()
    assert detectors.scan(["card 4111 1111", "1111 1111 end"]) == ()  # one card number only when joined
    assert [f.detector for f in detectors.scan(["x", "card 4111 1111 1111 1111", "y"])] == ["card"]
