"""md5state: the emailrelay-passwd hash and CRAM-MD5 from a stored state."""

import base64
import hashlib
import hmac
import os

import pytest

from emailrelay.auth import md5state

# E-MailRelay's own examples: the reference's secrets file (':'-prefixed form)
# and the emailrelay-passwd vector.
REFERENCE_EXAMPLES = [
    ("password123", "OvTdiEWFV6ru0pDltV2rfsKUfTWwNken2+tV5ZqlvuOh"),
    ("e=mc2", "Or9RzqbiyG274KCY4bnnqKsH77SKdgvoDANvOZHvscaM"),
    ("my password", "OselCSkBfX+x34UtTPj1uLPK1yKE/i/lqKi8/qwcEim8"),
    ("foobar", "Ot6SDdGj23eWjdEuKICgN8Nj9z/Vx9IV3ISz9VvmnaUB"),
]


def test_passwd_vector():
    assert md5state.encode_state("foobar") == "3pIN0aPbd5aN0S4ogKA3w2P3P9XH0hXchLP1W+adpQE="


@pytest.mark.parametrize("password,stored", REFERENCE_EXAMPLES)
def test_reference_examples_decode(password, stored):
    assert md5state.decode_state(stored) == md5state.hmac_md5_state(password.encode())


def test_dotted_round_trip():
    dotted = md5state.encode_dotted("foobar")
    assert dotted.count(".") == 7
    assert md5state.decode_state(dotted) == md5state.hmac_md5_state(b"foobar")


@pytest.mark.parametrize("bad", ["", "abc", "!!!!", base64.b64encode(b"x" * 31).decode(),
                                 "1.2.3.4.5.6.7.99999999999", "1.2.3.4.5.6.7.x"])
def test_bad_states(bad):
    with pytest.raises(md5state.StateError):
        md5state.decode_state(bad)


def test_compress_matches_hashlib():
    for n in (0, 1, 55, 56, 63, 64, 65, 119, 120, 300):
        data = os.urandom(n)
        assert md5state.resume(md5state._INIT, data, 0) == hashlib.md5(data).digest()


@pytest.mark.parametrize("keylen", [0, 1, 16, 63, 64, 65, 200])
@pytest.mark.parametrize("msglen", [0, 1, 55, 56, 64, 100, 1000])
def test_cram_from_state_equals_hmac(keylen, msglen):
    key, msg = os.urandom(keylen), os.urandom(msglen)
    state = md5state.hmac_md5_state(key)
    assert md5state.cram_md5_from_state(state, msg) == hmac.new(key, msg, "md5").hexdigest()


def test_long_password_is_hashed_first():
    key = b"k" * 100
    assert md5state.hmac_md5_state(key) == md5state.hmac_md5_state(hashlib.md5(key).digest())
