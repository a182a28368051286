"""The privacy filter against planted secrets, addresses, and code that holds none."""

from __future__ import annotations

import pytest

from ghostpen.server.training.privacy import screen

CLEAN = '''import json


def load(path):
    """Read the configuration; the server listens on 127.0.0.1 by default."""
    with open(path) as handle:
        return json.load(handle)  # format 1.2.3, at 10:30:00
'''

# Planted, each in the way it turns up in real code. The values are made up (AWS's documented
# example key, a random-looking hex string) or publicly documented fakes.
SECRETS = {
    "secret:AWS Access Key": 'AWS_ACCESS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"\n',
    "secret:Private Key": "KEY = '''-----BEGIN RSA PRIVATE KEY-----\nMIIEow...\n'''\n",
    "secret:Secret Keyword": 'db_password = "correct-horse-battery"\n',
    "secret:GitHub Token": 'token = "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"\n',
    "secret:Hex High Entropy String": 'salt = "8f14e45fceea167a5a36dedd4bea2543aa"\n',
    "secret:Basic Auth Credentials": 'DSN = "postgresql://admin:s3cr3t@db.internal/prod"\n',
    "secret:JSON Web Token": (
        'auth = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6Ikpv'
        'aG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"\n'
    ),
}


def test_code_without_secrets_or_addresses_is_kept_as_it_is() -> None:
    screened = screen(CLEAN, ".py")
    assert screened.text == CLEAN and not screened.found and not screened.dropped


@pytest.mark.parametrize("reason", sorted(SECRETS))
def test_a_sample_with_a_planted_secret_is_dropped_and_the_reason_counted(reason: str) -> None:
    screened = screen(CLEAN + SECRETS[reason], ".py")
    assert screened.dropped and screened.text is None
    assert screened.found[reason] >= 1


def test_emails_and_addresses_are_replaced_and_the_rest_kept() -> None:
    text = (
        "# Maintainer: Jane Roe <jane.roe@corp-mail.io>, docs: bob@example.com\n"
        'SERVERS = ["10.20.30.40", "2a00:1450:4001:80b::200e", "192.0.2.7", "::1"]\n'
        "RELEASE = '2.31.0.1'\n"
    )
    screened = screen(text, ".py")
    assert not screened.dropped and screened.text is not None
    assert "jane.roe" not in screened.text and "corp-mail.io" not in screened.text
    assert "bob@example.com" in screened.text  # RFC 2606: names nobody
    assert "10.20.30.40" not in screened.text and "2a00:1450" not in screened.text
    assert "192.0.2.7" in screened.text and '"::1"' in screened.text
    assert screened.found["email"] == 1
    # A four-part version number is a valid address too: it goes, on the safe side.
    assert screened.found["ip-address"] == 3  # 10.20.30.40, the IPv6 one, and 2.31.0.1
