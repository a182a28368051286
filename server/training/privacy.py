"""What must never reach a training sample: secrets, email addresses, IP addresses.

Secrets are found by detect-secrets (Yelp's scanner: offline, maintained, its default plugins:
cloud and service keys and tokens, private keys, JWTs, credentials in URLs, passwords in
assignments, high-entropy strings). A sample holding one is dropped whole: a secret split over
lines or encoded can survive a redaction in part. Email and IP addresses are common and harmless
to the code around them, so they are replaced by a placeholder and the sample is kept. Addresses
reserved for documentation and loopback stay: they name nobody.
"""

from __future__ import annotations

import ipaddress
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from detect_secrets import SecretsCollection
from detect_secrets.settings import default_settings

EMAIL = re.compile(
    r"\b[A-Za-z0-9._%+-]+@(?P<domain>[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,})\b"
)
IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.])")
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){3,7}[0-9A-Fa-f]{0,4}(?![\w:])")
EXAMPLE_DOMAINS = ("example.com", "example.org", "example.net")  # RFC 2606
EMAIL_PLACEHOLDER = "user@example.com"
IP_PLACEHOLDER = "192.0.2.1"  # RFC 5737's documentation range
DOCUMENTATION = tuple(  # RFC 5737 and 3849: addresses that name nobody
    ipaddress.ip_network(block)
    for block in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
)


@dataclass(frozen=True)
class Screened:
    text: str | None  # None: dropped
    found: Counter[str]  # reasons, each counted once per occurrence

    @property
    def dropped(self) -> bool:
        return self.text is None


def screen(text: str, suffix: str = ".txt") -> Screened:
    """The sample as it may be kept, and what was found in it. `suffix` (".py") lets the
    scanner read the text as the language it is."""
    secrets = _secrets(text, suffix)
    if secrets:
        return Screened(None, secrets)
    found: Counter[str] = Counter()

    def email(match: re.Match[str]) -> str:
        if match.group("domain").lower().endswith(EXAMPLE_DOMAINS):
            return match.group(0)
        found["email"] += 1
        return EMAIL_PLACEHOLDER

    def address(match: re.Match[str]) -> str:
        try:
            ip = ipaddress.ip_address(match.group(0))
        except ValueError:
            return match.group(0)  # a version number, a time: not an address
        if ip.is_loopback or ip.is_unspecified or _documentation(ip):
            return match.group(0)
        found["ip-address"] += 1
        return IP_PLACEHOLDER

    kept = IPV6.sub(address, IPV4.sub(address, EMAIL.sub(email, text)))
    return Screened(kept, found)


def _secrets(text: str, suffix: str) -> Counter[str]:
    """detect-secrets' findings by type, e.g. "secret:AWS Access Key". It scans files, so the
    text is written to one that lives only for the scan."""
    with tempfile.TemporaryDirectory() as scratch, default_settings():
        path = Path(scratch) / f"sample{suffix}"
        path.write_text(text)
        collection = SecretsCollection()
        collection.scan_file(str(path))
        return Counter(f"secret:{s.type}" for found in collection.data.values() for s in found)


def _documentation(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return any(ip.version == block.version and ip in block for block in DOCUMENTATION)
