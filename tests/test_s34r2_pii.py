"""PII detectors, stop 34: the edges of the version, remote, escaped-key, decimal-row and ratio rules."""

from __future__ import annotations

import pytest

from posttrain.data.quality.pii import find_pii


def _found(text: str) -> list[tuple[str, str]]:
    return [(m.kind, m.text) for m in find_pii(text)]


@pytest.mark.parametrize("text", [
    '__version__ = "1.2.3.4"', 'APP_VERSION="1.2.3.4"', "FileVersion: 1.2.3.4", "<FileVersion>1.2.3.4",
    "'release': '1.2.3.4'", "pkg[cuda]>=8.9.2.26", "tensorrt~=8.6.1.6", "torch!=2.1.0.1", "x===1.2.3.4",
])
def test_versions_in_manifests_and_pins_are_not_ip_addresses(text):
    assert _found(text) == []


@pytest.mark.parametrize("text,ip", [
    ("ip.src==10.1.2.3", "10.1.2.3"), ("ip.addr == 10.1.2.3", "10.1.2.3"),  # Wireshark filters
    ("the conversion 10.1.2.3 failed", "10.1.2.3"),  # "version" inside a word is no version
    ('if ip == "10.1.2.3":', "10.1.2.3"), ("host=10.1.2.3", "10.1.2.3"),
    ('version of the server at "10.1.2.3" is unknown to me, please check', "10.1.2.3"),  # too far back
])
def test_addresses_near_version_like_text_are_still_found(text, ip):
    assert _found(text) == [("ip_address", ip)]


@pytest.mark.parametrize("text,found", [
    ("https://bob:pw12345@example.com:8443/x", [("email", "pw12345@example.com")]),
    ("ssh://git:pw12345@github.com/org/repo", [("email", "pw12345@github.com")]),  # a password: still redacted
    ("Mail jane@example.com: thanks", [("email", "jane@example.com")]),
    ("git@host.com:~/repo.git", []), ("git@host.com:/srv/repo.git", []), ("git@host.com:_priv/r.git", []),
    ("ssh://user@host.example.com:2222/x", []), ("git+https://deploy@gitlab.com/g/p.git", []),
])
def test_remotes_urls_and_mailboxes(text, found):
    assert _found(text) == found


def test_private_key_with_doubly_escaped_newlines_is_one_secret():
    body = "\\\\n".join(["MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7"] * 3)
    text = 'cfg = "{\\"key\\": \\"-----BEGIN PRIVATE KEY-----\\\\n' + body + '\\\\n-----END PRIVATE KEY-----\\"}"'
    found = _found(text)
    assert [kind for kind, _ in found] == ["secret"] and found[0][1].startswith("-----BEGIN")


@pytest.mark.parametrize("text", ["+3.2 4.5 6.7 8.9", "deltas +12.5 13.75 14.25", "+40.712776"])
def test_signed_decimals_are_not_phones(text):
    assert _found(text) == []


@pytest.mark.parametrize("text", ["+33 1.23.45.67.89", "+44 20 7946 0958", "+1 415.555.0132"])
def test_international_numbers_with_dots_are_phones(text):
    assert [kind for kind, _ in _found(text)] == ["phone"]


@pytest.mark.parametrize("text", ["ratio 1:2:3:4:5:6:7:8", "10:20:30:40:50:60:70:80", "1::2:3"])
def test_ratios_of_small_numbers_are_not_ipv6(text):
    assert _found(text) == []


@pytest.mark.parametrize("text", ["2001:4860:4860::8888", "64:ff9b::192.0.2.33", "::ffff:192.0.2.1",
                                  "2001:db8:0:0:1:0:0:1"])
def test_real_ipv6_addresses_are_still_found(text):
    assert _found(text) == [("ip_address", text)]
