"""A PII walk: `posttrain quality`'s detectors and redaction on the rows a post-training set really holds.

Walked: pii.find_pii / redact on technical answers (code, pip pins, manifests, timestamps, big integers,
docker and ffmpeg command lines, DOIs, notebook output), on credentials as they are pasted (connection
strings, git remotes, a Google service-account key file, a PEM key in a string literal, JWT bearer
tokens), on emails and phones of several countries, and on card-like numbers (powers, factorials and
Fibonacci numbers of 13-19 digits: 3 of 193 pass prefix + Luhn, the one-in-ten-times-prefix rate the
module docstring states); then a whole `run_quality` pass over a chat row with a system turn and a tool
call, a preference pair written as turn lists and a KTO row.

Right: the counts in report.json equal the placeholders written, roles, keys and tool-call JSON keep
their shape, nothing is lost unannounced; loopback, 0.0.0.0 and netmasks are left alone as the README
says; large integers, floats, times and DOIs are not taken; URLs with a password and no port, and
secrets in realistic context, are redacted.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix, stop 34:
each asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import json
import random
import re
import string

import pytest

from posttrain.config.quality import QualityConfig
from posttrain.data.quality.pii import find_pii, redact
from posttrain.data.quality.run import run_quality


def _found(text: str) -> list[tuple[str, str]]:
    return [(m.kind, m.text) for m in find_pii(text)]


def _redacted(text: str) -> str:
    return redact(text, find_pii(text))


# --------------------------------------------------------------------------- right: technical text left alone

TECHNICAL = [
    "INT64_MAX = 9223372036854775807", "print(2**64)  # 18446744073709551616", "MOD = 998244353  # or 1000000007",
    "docker run -p 127.0.0.1:8080:80 -p 0.0.0.0:443:443 app", "ffmpeg -ss 00:01:30.000 -t 00:00:10 -i in.mp4",
    "cf. doi:10.1038/nature12373", "In [3]: 0.1 + 0.2\nOut[3]: 0.30000000000000004", "__version__ = \"0.4.1.2\"",
    "git commit 4f2a1c9 on 2023-11-02", "Pi: 3.14159265358979323846", "fib(50) = 12586269025",
    "Time: 2024-01-15 10:30:00.123456", "np.random.seed(1234567890)",
]


@pytest.mark.parametrize("text", TECHNICAL)
def test_ordinary_technical_text_is_not_redacted(text):
    assert _found(text) == []


def test_pasted_credentials_in_context_are_redacted():
    jwt = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
           "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U")
    text = (f"curl -H 'Authorization: Bearer {jwt}' https://api.example.com\n"
            "export OPENAI_API_KEY=sk-proj-abc123def456ghi789jkl012\n"
            "DNS 8.8.8.8, mirror https://alice:hunter22@example.com/x")
    assert _redacted(text) == ("curl -H 'Authorization: Bearer <SECRET>' https://api.example.com\n"
                               "export OPENAI_API_KEY=<SECRET>\n"
                               "DNS <IP_ADDRESS>, mirror https://alice:<EMAIL>/x")


# --------------------------------------------------------------------------- right: a whole pass over mixed rows

ROWS = {
    "chat": {"messages": [
        {"role": "system", "content": "Support bot. Escalate to ops@example.com."},
        {"role": "user", "content": "My card 4111 1111 1111 1111 was charged twice, mail ann@example.com"},
        {"role": "assistant", "content": "Sorry! I will refund it and write to ann@example.com within 2 days.",
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "send", "arguments": "{\"to\": \"cfo@example.com\", \"n\": 2}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sent"},
        {"role": "assistant", "content": "Done, the CFO has it."}]},
    "pair": {"prompt": [{"role": "user", "content": "What is 8.8.8.8 used for? I am bob@example.org"}],
             "chosen": [{"role": "assistant", "content": "8.8.8.8 is Google's public DNS resolver."}],
             "rejected": [{"role": "assistant", "content": "No idea what that is, sorry."}]},
    "kto": {"prompt": "Call me at 415-555-0132 about the order",
            "completion": "Sure, I will call 415-555-0132 tomorrow morning.", "label": True},
}


def test_redaction_keeps_every_row_shape_and_the_report_counts_what_it_wrote(tmp_path):
    files = []
    for name, row in ROWS.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(row) + "\n", encoding="utf-8")
        files.append(str(path))
    cfg = QualityConfig.load(None, [f"output_dir={tmp_path / 'out'}", f"data.files={json.dumps(files)}",
                                    "dedup.near=false"])
    out = run_quality(cfg, log=lambda _: None)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["summary"]["kept"] == 3 and report["summary"]["dropped"] == 0, report["summary"]
    kept = {name: json.loads((out / f).read_text(encoding="utf-8")) for name, f in
            (("chat", "kept-messages.jsonl"), ("pair", "kept-pairs.jsonl"), ("kto", "kept-unpaired.jsonl"))}
    written = "".join((out / f).read_text(encoding="utf-8") for f in report["kept_files"])
    placeholders = re.findall(r"<(EMAIL|PHONE|IP_ADDRESS|CREDIT_CARD|IBAN|SSN|SECRET)>", written)
    assert {k.lower(): placeholders.count(k) for k in set(placeholders)} == report["pii"]["matches"] \
        == {"email": 5, "credit_card": 1, "ip_address": 2, "phone": 2}
    assert report["pii"]["rows_with_pii"] == 3 and report["pii"]["unusable_after_redaction"] == 0
    chat = kept["chat"]["messages"]
    assert [m["role"] for m in chat] == [m["role"] for m in ROWS["chat"]["messages"]]
    assert chat[2]["tool_calls"][0]["function"]["arguments"] == "{\"to\": \"<EMAIL>\", \"n\": 2}"
    assert chat[3] == ROWS["chat"]["messages"][3]
    assert kept["pair"]["chosen"] == [{"role": "assistant", "content": "<IP_ADDRESS> is Google's public DNS resolver."}]
    assert kept["pair"]["rejected"] == ROWS["pair"]["rejected"]
    assert kept["kto"] == {"prompt": "Call me at <PHONE> about the order",
                           "completion": "Sure, I will call <PHONE> tomorrow morning.", "label": True}


# --------------------------------------------------------------------------- defects: versions read as IP addresses


@pytest.mark.parametrize("text", ['version="1.2.3.4"', '{"name": "app", "version": "2.0.0.1"}',
                                  "<Version>1.0.0.0</Version>", '[assembly: AssemblyVersion("1.0.0.0")]'])
def test_failure_a_quoted_version_number_is_not_an_ip_address(text):
    assert _found(text) == [], f"redacted to {_redacted(text)!r}"


@pytest.mark.parametrize("text", ["nvidia-cudnn-cu12==8.9.2.26", "pip install tensorrt==8.6.1.6"])
def test_failure_a_pinned_package_version_is_not_an_ip_address(text):
    assert _found(text) == [], f"redacted to {_redacted(text)!r}"


# --------------------------------------------------------------------------- defects: credentials kept


def _pem() -> tuple[str, list[str]]:
    rng = random.Random(0)
    body = "".join(rng.choice(string.ascii_letters + string.digits + "+/") for _ in range(64 * 5))
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return "-----BEGIN PRIVATE KEY-----\n" + "\n".join(lines) + "\n-----END PRIVATE KEY-----\n", lines


def _service_account() -> str:
    key = {"type": "service_account", "project_id": "demo", "private_key_id": "3f1c", "private_key": _pem()[0],
           "client_email": "svc@demo.iam.gserviceaccount.com"}
    return "Here is my key file, why does auth fail?\n" + json.dumps(key, indent=2)


@pytest.mark.parametrize("text", [_service_account(), 'KEY = "' + _pem()[0].replace("\n", "\\n") + '"'],
                         ids=["service_account_json", "string_literal"])
def test_failure_a_private_key_with_escaped_newlines_is_redacted(text):
    body = _pem()[1]
    redacted = _redacted(text)
    assert not any(line in redacted for line in body), f"found {[k for k, _ in _found(text)]}; key body kept"


@pytest.mark.parametrize("text,value", [
    ("https://alice:hunter22@example.com:8443/x", "hunter22"),
    ("DATABASE_URL=postgres://admin:s3cr3tP4ss@db.example.com:5432/app", "s3cr3tP4ss"),
    ("Sure, write to jane.doe@example.com:)", "jane.doe@example.com"),
])
def test_failure_an_address_before_a_port_or_emoticon_is_redacted(text, value):
    assert value not in _redacted(text), f"found {_found(text)}"


# --------------------------------------------------------------------------- defects: git remotes read as emails


@pytest.mark.parametrize("text", ["git clone ssh://git@github.com/org/repo.git",
                                  "pip install git+ssh://git@github.com/org/pkg.git"])
def test_failure_an_ssh_url_remote_is_not_an_email(text):
    assert _found(text) == [], f"redacted to {_redacted(text)!r}"

