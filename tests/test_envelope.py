"""Envelope files in E-MailRelay's exact byte format: #2821.8 and the older ones."""

import pytest

from emailrelay.store.envelope import Envelope, EnvelopeError, reason_lines

CERT = ("-----BEGIN CERTIFICATE-----\n"
        "MIIBszCCAVmgAwIBAgIUX\n"
        "-----END CERTIFICATE-----")

# Written the way E-MailRelay 2.5 writes it (every empty value keeps the
# space after the colon; the certificate is folded).
V8 = (b"X-MailRelay-Format: #2821.8\r\n"
      b"X-MailRelay-Content: 8bit\r\n"
      b"X-MailRelay-From: sender@example.com\r\n"
      b"X-MailRelay-ToCount: 3\r\n"
      b"X-MailRelay-To-Local: postmaster\r\n"
      b"X-MailRelay-To-Remote: one@example.net\r\n"
      b"X-MailRelay-To-Remote: two@example.net\r\n"
      b"X-MailRelay-Authentication: alice+20smith\r\n"
      b"X-MailRelay-Client: 192.168.1.2:40022\r\n"
      b"X-MailRelay-ClientCertificate: -----BEGIN CERTIFICATE-----\r\n"
      b" MIIBszCCAVmgAwIBAgIUX\r\n"
      b" -----END CERTIFICATE-----\r\n"
      b"X-MailRelay-MailFromAuthIn: alice\r\n"
      b"X-MailRelay-MailFromAuthOut: <>\r\n"
      b"X-MailRelay-ForwardTo: \r\n"
      b"X-MailRelay-ForwardToAddress: \r\n"
      b"X-MailRelay-ClientAccountSelector: \r\n"
      b"X-MailRelay-Utf8MailboxNames: 0\r\n"
      b"X-MailRelay-End: 1\r\n")

V5 = (b"X-MailRelay-Format: #2821.5\r\n"
      b"X-MailRelay-Content: 7bit\r\n"
      b"X-MailRelay-From: old@example.com\r\n"
      b"X-MailRelay-ToCount: 1\r\n"
      b"X-MailRelay-To-Remote: you@example.net\r\n"
      b"X-MailRelay-Authentication: \r\n"
      b"X-MailRelay-Client: 127.0.0.1\r\n"
      b"X-MailRelay-ClientCertificate: \r\n"
      b"X-MailRelay-MailFromAuthIn: \r\n"
      b"X-MailRelay-MailFromAuthOut: \r\n"
      b"X-MailRelay-End: 1\r\n")

V4 = (b"X-MailRelay-Format: #2821.4\r\n"
      b"X-MailRelay-Content: 8bit\r\n"
      b"X-MailRelay-From: old@example.com\r\n"
      b"X-MailRelay-ToCount: 1\r\n"
      b"X-MailRelay-To-Remote: you@example.net\r\n"
      b"X-MailRelay-Authentication: bob\r\n"
      b"X-MailRelay-Client: 10.0.0.1\r\n"
      b"X-MailRelay-ClientName: host.example\r\n"
      b"X-MailRelay-ClientCertificate: \r\n"
      b"X-MailRelay-End: 1\r\n")

V3 = (b"X-MailRelay-Format: #2821.3\r\n"
      b"X-MailRelay-Content: 7bit\r\n"
      b"X-MailRelay-From: \r\n"
      b"X-MailRelay-ToCount: 1\r\n"
      b"X-MailRelay-To-Remote: you@example.net\r\n"
      b"X-MailRelay-Authentication: \r\n"
      b"X-MailRelay-Client: 10.0.0.1\r\n"
      b"X-MailRelay-End: 1\r\n")

V7 = (b"X-MailRelay-Format: #2821.7\r\n"
      b"X-MailRelay-Content: binarymime\r\n"
      b"X-MailRelay-From: s@example.com\r\n"
      b"X-MailRelay-ToCount: 1\r\n"
      b"X-MailRelay-To-Remote: \xc3\xa9@example.net\r\n"
      b"X-MailRelay-Authentication: \r\n"
      b"X-MailRelay-Client: [::1]:25\r\n"
      b"X-MailRelay-ClientCertificate: \r\n"
      b"X-MailRelay-MailFromAuthIn: \r\n"
      b"X-MailRelay-MailFromAuthOut: \r\n"
      b"X-MailRelay-ForwardTo: smarthost\r\n"
      b"X-MailRelay-ForwardToAddress: 10.1.1.1:25\r\n"
      b"X-MailRelay-Utf8MailboxNames: 1\r\n"
      b"X-MailRelay-End: 1\r\n")


def test_parse_current_format():
    e = Envelope.parse(V8)
    assert e.format == "#2821.8"
    assert e.content == "8bit"
    assert e.from_ == "sender@example.com"
    assert e.to_local == ["postmaster"]
    assert e.to_remote == ["one@example.net", "two@example.net"]
    assert e.authentication == "alice smith"
    assert e.client == "192.168.1.2:40022"
    assert e.client_certificate == CERT
    assert e.mail_from_auth_in == "alice"
    assert e.mail_from_auth_out == "<>"
    assert e.forward_to == "" and e.forward_to_address == "" and e.client_account_selector == ""
    assert e.utf8_mailbox_names is False
    assert e.trailer == b""


def test_write_is_byte_for_byte_emailrelay():
    assert Envelope.parse(V8).to_bytes() == V8
    e = Envelope(content="8bit", from_="sender@example.com", to_local=["postmaster"],
                 to_remote=["one@example.net", "two@example.net"], authentication="alice smith",
                 client="192.168.1.2:40022", client_certificate=CERT + "\n",
                 mail_from_auth_in="alice", mail_from_auth_out="<>")
    assert e.to_bytes() == V8


def test_older_formats_read_with_defaults_and_write_as_current():
    e5 = Envelope.parse(V5)
    assert (e5.format, e5.from_, e5.to_remote, e5.client) == \
        ("#2821.5", "old@example.com", ["you@example.net"], "127.0.0.1")
    assert e5.forward_to == "" and e5.utf8_mailbox_names is False
    assert e5.to_bytes().startswith(b"X-MailRelay-Format: #2821.8\r\n")
    assert Envelope.parse(e5.to_bytes()).to_remote == ["you@example.net"]

    e4 = Envelope.parse(V4)
    assert e4.authentication == "bob" and e4.content == "8bit" and e4.client == "10.0.0.1"
    e3 = Envelope.parse(V3)
    assert e3.from_ == "" and e3.client_certificate == ""
    e7 = Envelope.parse(V7)
    assert e7.utf8_mailbox_names is True and e7.content == "binarymime"
    assert e7.to_remote == ["\u00e9@example.net"]
    assert (e7.forward_to, e7.forward_to_address) == ("smarthost", "10.1.1.1:25")
    assert Envelope.parse(e7.to_bytes()).to_bytes() == e7.to_bytes()


def test_lenient_about_order_lf_and_unknown_fields():
    shuffled = (b"X-MailRelay-Format: #2821.8\n"
                b"X-MailRelay-From: a@b\n"
                b"X-MailRelay-To-Remote: c@d\n"
                b"X-MailRelay-Content: 7bit\n"
                b"X-MailRelay-Something-New: whatever\n"
                b"X-MailRelay-ToCount: 1\n"
                b"X-MailRelay-Client: 1.2.3.4:5\n"
                b"X-MailRelay-End: 1\n")
    e = Envelope.parse(shuffled)
    assert (e.from_, e.to_remote, e.client) == ("a@b", ["c@d"], "1.2.3.4:5")


def test_one_cr_per_line_ending_goes_and_values_keep_their_octets():
    data = (b"X-MailRelay-Format: #2821.8\r\n"
            b"X-MailRelay-From: a\xc3\xa9\xff@b\r\r\n"
            b"X-MailRelay-ToCount: 1\n"
            b"X-MailRelay-To-Remote: c@d\r\n"
            b"X-MailRelay-End: 1\r\n"
            b"after\r\n")
    e = Envelope.parse(data)
    assert e.from_ == "a\xe9\udcff@b\r" and e.to_remote == ["c@d"]
    assert e.trailer == b"after\r\n"
    # An overlong line before End is an error, one after it is trailer.
    long_line = b"X-MailRelay-Client: " + b"x" * 70000 + b"\r\n"
    with pytest.raises(EnvelopeError, match="longer than"):
        Envelope.parse(data.replace(b"X-MailRelay-End", long_line + b"X-MailRelay-End"))
    assert Envelope.parse(data + long_line).trailer == b"after\r\n" + long_line


def test_trailer_is_kept_verbatim_and_reasons_read():
    trailer = (b"X-MailRelay-Reason: 550 no such user\r\nX-MailRelay-ReasonCode: 550\r\n"
               b"odd stuff\n")
    e = Envelope.parse(V8 + trailer)
    assert e.trailer == trailer
    assert e.to_bytes() == V8 + trailer
    assert e.reasons() == ["550 no such user"]


def test_reason_lines_as_emailrelay_appends_them():
    assert reason_lines("refused", 550) == \
        b"X-MailRelay-Reason: refused\r\nX-MailRelay-ReasonCode: 550\r\n"
    assert reason_lines("two\r\nlines\x00", None) == \
        b"X-MailRelay-Reason: two\\r\\nlines\\x00\r\nX-MailRelay-ReasonCode:\r\n"


@pytest.mark.parametrize("data, why", [
    (b"", "End"),
    (V8.replace(b"#2821.8", b"#2821.9"), "format"),
    (V8.replace(b"X-MailRelay-End: 1\r\n", b""), "End"),
    (V8.replace(b"ToCount: 3", b"ToCount: 2"), "ToCount"),
    (V8.replace(b"ToCount: 3", b"ToCount: x"), "ToCount"),
    (b"X-MailRelay-Content: 7bit\r\n" + V8, "Format"),
    (V8.replace(b"X-MailRelay-From: sender@example.com\r\n", b""), "From"),
    (V8.replace(b"X-MailRelay-Client:", b"Garbage"), "bad envelope line"),
    (b"\x00\xff\xfe garbage", "bad envelope line"),
])
def test_corrupt_envelopes_are_rejected(data, why):
    with pytest.raises(EnvelopeError, match=why):
        Envelope.parse(data)


def test_line_breaks_in_values_cannot_forge_fields():
    e = Envelope(from_="a@b\r\nX-MailRelay-To-Remote: evil@x", to_remote=["c@d"])
    with pytest.raises(EnvelopeError):
        e.to_bytes()
    with pytest.raises(EnvelopeError):
        Envelope(content="bogus").to_bytes()


def test_read_from_file(tmp_path):
    p = tmp_path / "x.envelope"
    p.write_bytes(V5)
    assert Envelope.read(str(p)).from_ == "old@example.com"
