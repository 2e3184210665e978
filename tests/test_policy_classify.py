"""Classification: header parsing, PII detectors with checksums, raise-never-lower."""

import pytest

from serve_app.errors import ConfigError, InvalidRequest
from serve_app.policy.classify import (
    DEFAULT_DETECTORS,
    Classifier,
    DataClass,
    PiiDetector,
    iban_valid,
    luhn_valid,
    request_texts,
)
from serve_app.policy.registry import make


def nir(body: str) -> str:
    return body + f"{97 - int(body) % 97:02d}"


@pytest.mark.parametrize(
    "detector, text",
    [
        ("email", "write to jane.doe+x@example.co.uk please"),
        ("phone", "call me on +49 30 1234567"),
        ("phone", "mobile +33 6 12 34 56 78"),
        ("phone", "office 030 1234 5678"),
        ("iban", "pay DE89 3704 0044 0532 0130 00 today"),
        ("iban", "GB82WEST12345698765432"),
        ("card", "card 4111 1111 1111 1111 exp 12/29"),
        ("card", "5500-0000-0000-0004"),
        ("es_dni", "DNI 12345678Z"),
        ("nl_bsn", "BSN 111222333"),
        ("fr_nir", "NIR " + nir("2550814168025")),
        ("it_codice_fiscale", "CF RSSMRA85T10A562S"),
        ("uk_nino", "NI number AB 12 34 56 C"),
    ],
)
def test_each_detector_finds_its_pii(detector, text):
    assert make(PiiDetector, detector).detect(text) is not None


@pytest.mark.parametrize(
    "detector, text",
    [
        ("email", "no at sign here, just example.com"),
        ("phone", "order 12345 shipped"),
        ("iban", "DE89 3704 0044 0532 0130 01"),  # checksum off by one
        ("card", "4111 1111 1111 1112"),  # fails Luhn
        ("card", "version 2026.11.22 build 7"),
        ("es_dni", "12345678A"),  # wrong letter
        ("nl_bsn", "123456789"),  # fails the 11-test
        ("fr_nir", "2550814168025" + "00"),
        ("uk_nino", "QQ 12 34 56 E"),
    ],
)
def test_detectors_reject_lookalikes(detector, text):
    assert make(PiiDetector, detector).detect(text) is None


def test_checksums():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert iban_valid("DE89370400440532013000") and not iban_valid("DE89370400440532013001")


def test_header_parsing():
    assert DataClass.parse(None) is DataClass.public
    assert DataClass.parse(" Confidential ") is DataClass.confidential
    with pytest.raises(InvalidRequest, match="x-data-classification"):
        DataClass.parse("secret-ish")


def test_pii_raises_but_never_lowers_the_class():
    classifier = Classifier.from_names()
    plain = classifier.classify(DataClass.public, ["hello world"])
    assert plain.data_class is DataClass.public and plain.raised_by == []
    raised = classifier.classify(DataClass.internal, ["my email is a@b.io", "IBAN DE89370400440532013000"])
    assert raised.data_class is DataClass.confidential
    assert raised.raised_by == ["email", "iban"]
    kept = classifier.classify(DataClass.restricted, ["a@b.io"])
    assert kept.data_class is DataClass.restricted  # a detector never lowers a declared class
    assert kept.raised_by == []


def test_detector_class_is_configurable_and_unknown_names_fail():
    classifier = Classifier.from_names(["card"], {"card": {"data_class": "restricted"}})
    assert classifier.classify(DataClass.public, ["4111111111111111"]).data_class is DataClass.restricted
    with pytest.raises(ConfigError, match="Unknown pii_detector policy 'ssn'; known: card"):
        Classifier.from_names(["ssn"])
    with pytest.raises(ConfigError, match="invalid parameters"):
        Classifier.from_names(["card"], {"card": {"threshold": 3}})
    assert set(DEFAULT_DETECTORS) == set(PiiDetector.registered())


def test_request_texts_cover_prompts_messages_parts_and_tool_arguments():
    body = {
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": [{"type": "text", "text": "part"}]},
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": '{"iban": "x"}'}}]},
        ],
        "prompt": ["p1", "p2"],
    }
    assert request_texts(body) == ["p1", "p2", "sys", "part", '{"iban": "x"}']
