"""xtext (RFC 3461) encoding as used in envelope files and AUTH= parameters."""

import pytest

from emailrelay.util import xtext


@pytest.mark.parametrize("plain, encoded", [
    ("", ""),
    ("alice@example.com", "alice@example.com"),
    ("a+b=c", "a+2Bb+3Dc"),
    ("two words", "two+20words"),
    ("tab\there", "tab+09here"),
    ("caf\u00e9", "caf+C3+A9"),
    ("<>", "<>"),
    ("~!", "~!"),
])
def test_encode_and_decode(plain, encoded):
    assert xtext.encode(plain) == encoded
    assert xtext.decode(encoded) == plain


def test_decode_is_lenient():
    assert xtext.decode("a+zzb") == "a+zzb"
    assert xtext.decode("end+") == "end+"
    assert xtext.decode("end+4") == "end+4"
    assert xtext.decode("lower+2b") == "lower+"


def test_undecodable_octets_round_trip():
    text = xtext.decode("+FF+FE")
    assert xtext.encode(text) == "+FF+FE"


def test_valid():
    assert xtext.valid("abc+2B")
    assert xtext.valid("")
    assert not xtext.valid("a b")
    assert not xtext.valid("a+2b")
    assert not xtext.valid("a+")
    assert not xtext.valid("a=b")
