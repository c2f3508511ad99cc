"""Personal information and credentials in training text: find them, and replace them by "<KIND>".

Precision comes first. A false positive redacts part of a training answer (a version number, a
date, a sum, a line of code), so each detector wants a shape ordinary text seldom has and, where
the format carries one, a checksum; where the only way to more recall is guessing, it is given up.
Patterns are ASCII-only (`[0-9]`, not `\\d`) and bounded by lookarounds on ASCII characters, not
`\\b`: Chinese or Japanese text puts no space between a character and an address or a number.
A text with full-width letters, digits or "＠" ("０９０－１２３４", "ｉｎｆｏ＠") is searched on a copy
with the full-width forms U+FF01-FF5E and the ideographic space read as ASCII, one character for
one, so offsets hold in the text itself (full-width punctuation alone, as in most Chinese text,
changes no match worth the copy).
"Not inside a longer number" means: no digit or letter directly before or after, and no digit one
separator away ("4111 1111 1111 1111 2" is not a card), so digit runs are never cut into pieces.
A hyphen joins a number or an address to what precedes it only after an ASCII letter or digit
("AB-050-1234567" is a code): Hebrew writes its prefixes so ("ל-050-1234567", to 050-...).

- email: local@domain.tld. The local part may hold Latin, Greek and Cyrillic letters with their
  accents ("jürgen.müller@"), not Chinese or Japanese ones (such text runs into an address with no
  space); domain labels may be any letters (IDN: "münchen.de", "例え.jp"). The TLD is two letters (a
  country) or a common generic one (`_GTLDS`): code writes `x@self.weight` (matrix product) and
  `icon@2x.png`, which any-TLD would take. No single-label hosts ("user@localhost"), no "@property"
  or "/@handle" (nothing before the @), no scp remotes ("git@github.com:org/repo.git"; a port or an
  emoticon after the address, ":5432" or ":)", is no remote), no URL user names right after "://"
  ("ssh://git@github.com/org/repo.git"). "https://user:pass@host.com:8443" yields "pass@host.com".
- phone: "+CC" numbers, 7-15 digits (E.164), "(0)" trunk allowed; the separator-free form needs 10+
  digits, a thousands shape ("+1 500 000") 11+: shorter ones are signed amounts, as are signed
  decimals ("+40.712776", "+3.2 4.5 6.7 8.9"). North American (NXX) NXX-XXXX: "(415) 555-0132",
  "415-555-0132", "415.555.0132", "1-415-555-0132", "1 (800) 555-0199"; spaces only after "+1" or
  "(415)", since "200 300 4000" is three numbers. National numbers led by 0 with one kind of
  separator and 10-11 digits ("020 7946 0958", "06 12 34 56 78", "(030) 1234567", German
  "030/1234567"); Russian trunk-8 numbers with the area code in brackets, 11 digits ("8 (495)
  123-45-67"); Chinese mobiles "138 0013 8000". Never a bare digit run nor a 7-digit "555-0132" (as
  often a code or a range as a number): so bare Chinese mobiles "13812345678"
  (2^34 = 17179869184 has their shape) and Indian "98765 43210" (two five-digit numbers, a pair of
  ZIP codes) are missed. This keeps dates (8 digits, or 4-2-2), times, versions, decimals, ISBNs and
  "23 + 48 = 71" out. Missed: "00" international prefixes, 12-digit national numbers, Spanish
  9-digit numbers without "+34", and "01 02 03 04 05" is taken (a list of zero-padded numbers).
- ip_address: IPv4 dotted quads that `ipaddress` accepts (octets 0-255, no leading zeros), not
  inside a longer dotted number ("1.2.3.4.5") and not right after a word that numbers versions or
  parts of a text ("v1.2.3.4", "Section 1.2.10.4", "§ 1.2.3.4", "chapter", "clause", "article",
  "table", "figure", "step", ...), a version word or identifier with a manifest's quotes, "=" or
  brackets ('"version": "2.0.0.1"', "<Version>", 'AssemblyVersion("1.0.0.0")', "__version__ = ") or
  a package pin ("tensorrt==8.6.1.6", ">=", "~=", ...): `_NUMBERING_BEFORE`; a bare "1.2.3.4" is taken.
  Loopback and addresses starting 0 or 255 (0.0.0.0, netmasks, wildcard masks) are skipped: they
  fill code answers and identify no one. IPv6 full or compressed forms `ipaddress` accepts, with 3+
  non-empty groups (a dotted-quad tail counts 2): "A::B" (C++), "1::2" (a slice), "::1" and
  "fe80::1" are not worth the risk; nor groups of one or two decimal digits only ("1:2:3:4:5:6:7:8",
  a ratio, all in the reserved ::/8); "12:30:45" and MAC addresses are not valid IPv6 anyway.
- credit_card: 13-19 digits, contiguous or grouped 4-4-4-4(-3), 4-4-4-1 or 4-6-4/5 with one kind of
  separator (space or dash), a known issuer prefix with its lengths, and the Luhn checksum (which
  alone passes one random number in ten, hence the prefix table too).
- iban: two letters, two check digits, the country's length from a table of common countries
  (others are not matched), compact or in groups of 4 separated by spaces, ISO 13616 mod-97 == 1.
- ssn: US ddd-dd-dddd, dashes only; area 000, 666 and 900-999, group 00 and serial 0000 never issue.
- secret: fixed credential formats only: AWS key ids (AKIA/ASIA + 16), GitHub (ghp_/gho_/ghu_/ghs_/
  ghr_ + 36, github_pat_), Slack (xoxb-/xoxa-/xoxp-/xoxr-/xoxs-), OpenAI-style "sk-" keys (20+ url-safe
  characters with a digit, so "sk-learn-..." slugs stay), Stripe [sr]k_live_/_test_, Google AIza + 35,
  whole PEM private-key blocks (base64 body, its line breaks real or escaped as in JSON and string
  literals, "\\n"; matching BEGIN/END labels, so a parser that mentions both lines is not swallowed),
  and signed JWTs whose first segment decodes to a JSON object. Nothing entropy-based, no
  "password=..." guesses: SHAs, UUIDs, hashes and base64 in code would all go.
"""

from __future__ import annotations

import base64
import bisect
import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

PII_KINDS = ("email", "phone", "ip_address", "credit_card", "iban", "ssn", "secret")


@dataclass(frozen=True)
class PIIMatch:
    kind: str
    start: int  # character offsets into the text
    end: int
    text: str


# Not inside a longer number, nor after the letter group of a grouped code ("NL01 ABNA 0417 1643 00",
# whose digits would pass for a phone number when the IBAN checksum fails), nor after a letter and a
# hyphen ("AB-050-1234567"), which `_joined` checks on each match: as a fourth lookbehind here, tried at
# every position, it cost the number detectors 10% of their time.
_NUM_L = r"(?<![0-9A-Za-z_+./])(?<![0-9][ .\-/:])(?<![0-9] [A-Z]{4} )"
_NUM_R = r"(?![0-9A-Za-z_]|[ .\-/:][0-9])"
_GTLDS = frozenset(
    "com org net edu gov mil int info biz name pro mobi aero coop museum jobs travel xyz online site "
    "tech dev app cloud email store shop blog page live news media agency company digital network "
    "group global world life today space website club design studio systems solutions services".split())


def _joined(m: re.Match[str]) -> bool:
    """Whether a hyphen joins the match to an ASCII letter or digit right before it: "AB-050-1234567"
    is a code. After any other character the hyphen is a prefix's (Hebrew "ל-050-1234567", to 050-...)."""
    before = m.string[max(0, m.start() - 2):m.start()]
    return len(before) == 2 and before[1] == "-" and before[0].isascii() and before[0].isalnum()


# Letters of a local part: ASCII, Latin-1 and Latin Extended-A/B (not × ÷), Greek, Cyrillic; after the
# first, combining accents too ("mu\u0308ller", NFD). Not CJK: that text runs into an address unspaced.
_LOCAL = "A-Za-z0-9\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u0386-\u03ce\u0400-\u04ff"
_ACCENTS = "\u0300-\u036f"
# a domain label, IDN ones too ("münchen", "例え")
_LABEL = f"[^\\W_](?:(?:[^\\W_]|[\\-{_ACCENTS}]){{0,61}}[^\\W_])?"
_EMAIL = re.compile(
    f"(?<![{_LOCAL}{_ACCENTS}._%+@])(?P<local>[{_LOCAL}][{_LOCAL}{_ACCENTS}._%+\\-]{{0,63}})@"
    f"(?:{_LABEL}\\.)+(?P<tld>[A-Za-z]{{2,24}})"
    r"(?![A-Za-z0-9_\-@(]|\.[A-Za-z0-9])")  # the domain ends here, and is no call "x@w.to(...)"


def _email_ok(m: re.Match[str]) -> bool:
    local, tld, after = m["local"], m["tld"].lower(), m.string[m.end():m.end() + 2]
    if ".." in local or local.endswith(".") or _joined(m):
        return False
    if re.match(r":[A-Za-z_~./]", after):  # "git@host.com:org/repo": a remote; not ":5432" nor ":)"
        return False
    if m.string.endswith("://", 0, m.start()):  # "ssh://git@host.com/org/repo": a URL's user name
        return False
    return len(tld) == 2 or tld in _GTLDS


_PHONE_INTL = re.compile(_NUM_L + r"\+[1-9](?:[ .\-]?(?:\([0-9]{1,4}\)|[0-9])){5,16}" + _NUM_R)
_PHONE_NANP = re.compile(
    _NUM_L + r"(?:(?:1[.\-])?[2-9][0-9]{2}(?P<s>[.\-])[2-9][0-9]{2}(?P=s)[0-9]{4}"
    r"|(?:1[ \-]?)?\([2-9][0-9]{2}\) ?[2-9][0-9]{2}[.\- ][0-9]{4})" + _NUM_R)
_PHONE_NATIONAL = re.compile(
    _NUM_L + r"(?:\(0[1-9][0-9]{0,4}\) ?[0-9]{2,8}(?:[ .\-][0-9]{2,4}){0,4}"
    r"|0[1-9][0-9]{0,4}(?P<s>[ .\-])[0-9]{2,8}(?:(?P=s)[0-9]{2,4}){0,4}"
    r"|0[1-9][0-9]{1,4}/[0-9]{3,8}"  # German: area code / number
    r"|8 ?\([0-9]{3,5}\) ?[0-9]{1,3}-[0-9]{2}-[0-9]{2})" + _NUM_R)  # Russian: trunk 8, (area), 3-2-2
_PHONE_CN = re.compile(_NUM_L + r"1[3-9][0-9](?P<s>[ \-])[0-9]{4}(?P=s)[0-9]{4}" + _NUM_R)
_THOUSANDS = re.compile(r"\+[0-9]{1,3}(?:[ .][0-9]{3})+")


def _number(check: _Check) -> _Check:
    """`check`, on a match no hyphen joins to what is before it (`_joined`)."""
    return lambda m: not _joined(m) and check(m)


def _intl_ok(m: re.Match[str]) -> bool:
    number = m.group()
    digits = re.sub(r"[^0-9]", "", number.replace("(0)", ""))
    if number[1:].isdigit():  # no separator at all: only a full-length number is clearly a phone
        return 10 <= len(digits) <= 15
    if all(re.fullmatch(r"[0-9]+\.[0-9]+", piece) for piece in number[1:].split(" ")):
        return False  # "+40.712776", "+3.2 4.5 6.7": signed decimals (a latitude, a delta, a row of values)
    # "+1 500 000" is a signed amount; "+34 612 345 678" has the same shape but 11+ digits
    return 7 <= len(digits) <= 15 and (len(digits) >= 11 or not _THOUSANDS.fullmatch(number))


def _national_ok(m: re.Match[str]) -> bool:
    return 10 <= sum(c.isdigit() for c in m.group()) <= 11


_IPV4 = re.compile(r"(?<![0-9A-Za-z_.])[0-9]{1,3}(?:\.[0-9]{1,3}){3}(?![0-9A-Za-z_]|\.[0-9])")
# What numbers versions or parts of a text, right before a dotted quad (searched up to `_NUMBERING_SPAN`
# characters back, ASCII-bounded as _NUM_L): a numbering word and a colon ("Section 1.2.10.4", "§ 1.2.3.4");
# a version word or an identifier ending in one ("AssemblyVersion", "__version__") and the quotes, "=" or
# brackets of a manifest ('"version": "2.0.0.1"', "<Version>1.0.0.0"); a version operator right after a
# package name ("tensorrt==8.6.1.6", "pkg[extra]>=1.2.3.4"), but not a Wireshark filter ("ip.src==...").
_NUMBERING_BEFORE = re.compile(
    r"(?:(?:(?<![A-Za-z])(?:v|section|sec|chapter|ch|clause|article|art|paragraph|para|part|appendix|table"
    r"|figure|fig|step|item|rule)\.?|§)[\s:]*"
    r"|(?:(?<![A-Za-z])(?:version|release|build)|(?<=[a-z0-9_])(?-i:Version))_*[\s:=\"'<>(\[]*"
    r"|(?<=[0-9A-Za-z_\]])(?<!ip\.src)(?<!ip\.dst)(?<!ip\.addr)(?<!ip\.host)(?:===?|~=|[<>!]=))$",
    re.IGNORECASE)
_NUMBERING_SPAN = 32
_IPV6 = re.compile(
    r"(?<![0-9A-Za-z_:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9]{1,3}(?:\.[0-9]{1,3}){3}|[0-9A-Fa-f]{1,4})?"
    r"(?![0-9A-Za-z_:]|\.[0-9])")


def _ipv4_ok(m: re.Match[str]) -> bool:
    if _NUMBERING_BEFORE.search(m.string, max(0, m.start() - _NUMBERING_SPAN), m.start()):
        return False
    try:
        address = ipaddress.IPv4Address(m.group())
    except ValueError:
        return False
    return not address.is_loopback and m.group().split(".")[0] not in ("0", "255")


def _ipv6_ok(m: re.Match[str]) -> bool:
    groups = [group for group in m.group().split(":") if group]
    if len(groups) + ("." in m.group()) < 3:  # an embedded dotted quad is two groups' worth
        return False
    if all(re.fullmatch(r"[0-9]{1,2}", group) for group in groups):  # "1:2:3:4:5:6:7:8", a ratio: in ::/8
        return False
    try:
        ipaddress.IPv6Address(m.group())
    except ValueError:
        return False
    return True


_CARD = re.compile(
    _NUM_L + r"(?:[0-9]{13,19}"
    r"|[0-9]{4}(?P<s>[ \-])[0-9]{4}(?P=s)[0-9]{4}(?P=s)(?:[0-9]{4}(?P=s)[0-9]{3}|[0-9]{1,4})"
    r"|[0-9]{4}(?P<t>[ \-])[0-9]{6}(?P=t)[0-9]{4,5})" + _NUM_R)
# (first prefix, last prefix, lengths): Visa, Mastercard, Amex, Discover, Diners, JCB, UnionPay, Maestro
_ISSUERS = ((4, 4, (13, 16, 19)), (51, 55, (16,)), (2221, 2720, (16,)), (34, 34, (15,)), (37, 37, (15,)),
            (6011, 6011, (16, 19)), (644, 649, (16, 19)), (65, 65, (16, 19)), (300, 305, (14, 16, 19)),
            (36, 36, (14, 16, 19)), (38, 39, (14, 16, 19)), (3528, 3589, (16, 19)), (62, 62, (16, 19)),
            (50, 50, (16, 19)), (56, 58, (16, 19)))


def _luhn_ok(digits: str) -> bool:
    """The Luhn checksum: double every second digit from the right, sum the digits, 0 mod 10."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _card_ok(m: re.Match[str]) -> bool:
    digits = re.sub(r"[^0-9]", "", m.group())
    issuer = any(lo <= int(digits[:len(str(lo))]) <= hi and len(digits) in lengths
                 for lo, hi, lengths in _ISSUERS)
    return issuer and _luhn_ok(digits)


_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AT": 20, "BE": 16, "BG": 22, "BR": 29, "CH": 21, "CY": 28, "CZ": 24, "DE": 22,
    "DK": 18, "EE": 20, "ES": 24, "FI": 18, "FR": 27, "GB": 22, "GR": 27, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IS": 26, "IT": 27, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MT": 31, "NL": 18,
    "NO": 15, "PL": 28, "PT": 25, "RO": 24, "SA": 24, "SE": 24, "SI": 19, "SK": 24, "TR": 26}
# Groups may run on into an upper-case word ("BE68 5390 0754 7034 SEPA"): the country length cuts it.
_IBAN = re.compile(r"(?<![0-9A-Za-z_])[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,8}(?: ?[A-Z0-9]{1,3})?")


def _iban_ok(iban: str) -> bool:
    """ISO 13616: the first four characters moved to the end, letters as 10..35, mod 97 == 1."""
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def _ibans(text: str) -> Iterator[tuple[int, int]]:
    for m in _IBAN.finditer(text):
        length, end, seen = _IBAN_LENGTHS.get(m.group()[:2]), m.start(), 0
        if length is None:
            continue
        while seen < length and end < m.end():
            seen += text[end] != " "
            end += 1
        if seen < length or re.match(r"[0-9A-Za-z_]", text[end:end + 1]):
            continue  # too short, or the compact form runs on: part of a longer code
        if _iban_ok(text[m.start():end].replace(" ", "")):
            yield m.start(), end


_SSN = re.compile(_NUM_L + r"(?P<area>[0-9]{3})-(?P<group>[0-9]{2})-(?P<serial>[0-9]{4})" + _NUM_R)


def _ssn_ok(m: re.Match[str]) -> bool:
    area = int(m["area"])
    return area not in (0, 666) and area < 900 and m["group"] != "00" and m["serial"] != "0000"


_KEY_L, _KEY_R = r"(?<![0-9A-Za-z_\-])", r"(?![0-9A-Za-z_\-])"
_SECRETS = re.compile(_KEY_L + "(?:" + "|".join((
    r"(?:AKIA|ASIA)[0-9A-Z]{16}",
    r"gh[pousr]_[0-9A-Za-z]{36}",
    r"github_pat_[0-9A-Za-z_]{22,255}",
    r"xox[baprs]-[0-9]{6,}-[0-9A-Za-z\-]{10,}",
    r"sk-(?=[0-9A-Za-z_\-]*[0-9])[0-9A-Za-z_\-]{20,}",
    r"[sr]k_(?:live|test)_[0-9A-Za-z]{20,}",
    r"AIza[0-9A-Za-z_\-]{35}",
    r"(?P<jwt>eyJ[0-9A-Za-z_\-]{5,})\.[0-9A-Za-z_\-]{4,}\.[0-9A-Za-z_\-]{16,}",
)) + ")" + _KEY_R)
# The body's line breaks may be written as escapes: a key pasted from JSON or held in a string literal.
_PEM = re.compile(r"-----BEGIN (?P<label>(?:[A-Z0-9]+ )*)PRIVATE KEY-----"
                  r"(?:[A-Za-z0-9+/=:,\s\-]|\\+[nr]){32,}?-----END (?P=label)PRIVATE KEY-----")


def _secret_ok(m: re.Match[str]) -> bool:
    if m.re is _PEM or not m["jwt"]:
        return True
    header = m["jwt"]
    try:  # a JWT header is base64url JSON: this is what tells one from a dotted identifier
        return isinstance(json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4))), dict)
    except ValueError:  # bad base64, bad UTF-8 and bad JSON are all ValueErrors
        return False


_Check = Callable[[re.Match[str]], bool]


def _regex_detector(*pairs: tuple[re.Pattern[str], _Check]) -> Callable[[str], Iterator[tuple[int, int]]]:
    def detect(text: str) -> Iterator[tuple[int, int]]:
        for pattern, check in pairs:
            yield from (m.span() for m in pattern.finditer(text) if check(m))
    return detect


def _always(m: re.Match[str]) -> bool:
    return True


_DETECTORS: dict[str, Callable[[str], Iterable[tuple[int, int]]]] = {
    "email": _regex_detector((_EMAIL, _email_ok)),
    "phone": _regex_detector((_PHONE_INTL, _number(_intl_ok)), (_PHONE_NANP, _number(_always)),
                             (_PHONE_NATIONAL, _number(_national_ok)), (_PHONE_CN, _number(_always))),
    "ip_address": _regex_detector((_IPV4, _ipv4_ok), (_IPV6, _ipv6_ok)),
    "credit_card": _regex_detector((_CARD, _number(_card_ok))),
    "iban": _ibans,
    "ssn": _regex_detector((_SSN, _number(_ssn_ok))),
    "secret": _regex_detector((_SECRETS, _secret_ok), (_PEM, _secret_ok)),
}
_HAS_DIGIT = re.compile(r"[0-9]")
# Full-width ASCII (U+FF01-FF5E) and the ideographic space, each to its ASCII character: one for one.
_AS_ASCII = {0x3000: " ", **{code: chr(code - 0xFEE0) for code in range(0xFF01, 0xFF5F)}}
_FULL_WIDTH_ALNUM = re.compile("[\uff10-\uff19\uff20-\uff3a\uff41-\uff5a]")  # ０-９ ＠ Ａ-Ｚ ａ-ｚ
_NEEDS_DIGIT = frozenset({"phone", "ip_address", "credit_card", "iban", "ssn"})


def check_kinds(kinds: Iterable[str]) -> list[str]:
    """The kinds as a list (a single string is one kind; repeats dropped); raises ValueError
    naming an unknown kind and listing the known ones."""
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    for kind in kinds:
        if kind not in PII_KINDS:
            raise ValueError(f"unknown PII kind {kind!r}; known kinds: {', '.join(PII_KINDS)}")
    return list(dict.fromkeys(kinds))


def find_pii(text: str, kinds: Iterable[str] = PII_KINDS) -> list[PIIMatch]:
    """Matches sorted by start, never overlapping (where two overlap, keep the longer; on ties the
    kind earlier in PII_KINDS)."""
    kinds = check_kinds(kinds)
    view = text if text.isascii() or not _FULL_WIDTH_ALNUM.search(text) else text.translate(_AS_ASCII)
    has_digit = _HAS_DIGIT.search(view) is not None  # most rows of prose skip five detectors here
    found = [PIIMatch(kind, start, end, text[start:end]) for kind in kinds
             if has_digit or kind not in _NEEDS_DIGIT for start, end in _DETECTORS[kind](view)]
    rank = {kind: i for i, kind in enumerate(PII_KINDS)}
    found.sort(key=lambda m: (m.start - m.end, rank[m.kind], m.start))
    starts: list[int] = []
    kept: list[PIIMatch] = []  # sorted by start, so a neighbour check against two entries suffices
    for match in found:
        i = bisect.bisect_left(starts, match.start)
        if (i < len(kept) and kept[i].start < match.end) or (i > 0 and kept[i - 1].end > match.start):
            continue
        starts.insert(i, match.start)
        kept.insert(i, match)
    return kept


def redact(text: str, matches: Sequence[PIIMatch]) -> str:
    """Each match replaced by "<KIND>" in upper case, e.g. "<EMAIL>", "<CREDIT_CARD>"; text
    outside matches unchanged. Raises ValueError for overlapping matches or ones whose offsets
    do not hold their text (matches from another text)."""
    pieces, at = [], 0
    for m in sorted(matches, key=lambda m: m.start):
        if m.start < at or text[m.start:m.end] != m.text:
            raise ValueError(f"match {m} overlaps another or is not at its offsets in this text")
        pieces += [text[at:m.start], f"<{m.kind.upper()}>"]
        at = m.end
    pieces.append(text[at:])
    return "".join(pieces)
