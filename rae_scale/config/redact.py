"""The one redaction function: secrets out of config trees, argv and log text before anything shows them."""
from __future__ import annotations

import re
from typing import Any

REDACTED = "***"

# A key is secret when one of these words is part of its name (split at _ - . and camelCase): key,
# account_key, aws_secret_access_key, secret, token, sas_token, password, passphrase, Authorization
# (any header, any case), credentials, signature / sig (signed URLs), cookie; or it is a connection string.
_SECRET_WORDS = frozenset({"key", "apikey", "secret", "token", "password", "passwd", "passphrase",
                           "authorization", "credential", "credentials", "signature", "sig", "cookie"})
_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
# user:pass@ (or a bare token@) inside any URL
_URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)[^/\s@'\"<>]+@")
# key=value: a whole argv item, a quoted one inside a shell line, and a bare one inside text / a query string
_ARG = re.compile(r"(-*)([A-Za-z_][\w.\-]*)=(.*)", re.S)
_QUOTED_ASSIGN = re.compile(r"(['\"])([A-Za-z_][\w.\-]*)=([^'\"]*)\1")
_ASSIGN = re.compile(r"([A-Za-z_][\w.\-]*)=(\"[^\"]*\"|'[^']*'|[^\s&;,'\"]+)")
# 'key': 'value' / "key": "value" in a printed dict or JSON
_MAPPING = re.compile(r"(['\"])([^'\"\n]+)\1(\s*:\s*)('[^']*'|\"[^\"]*\"|[^\s,{}\[\]]+)")


def is_secret_key(name: str) -> bool:
    """Whether a (possibly dotted) key names a secret; the last dotted component decides."""
    last = str(name).rsplit(".", 1)[-1]
    words = {w.lower() for w in _WORDS.findall(last)}
    flat = re.sub(r"[^a-z]", "", last.lower())
    return bool(words & _SECRET_WORDS) or flat in _SECRET_WORDS or "connectionstring" in flat


def _redact_text(text: str) -> str:
    text = _URL_USERINFO.sub(lambda m: m.group(1) + REDACTED + "@", text)
    m = _ARG.fullmatch(text)
    if m and is_secret_key(m.group(2)):
        return f"{m.group(1)}{m.group(2)}={REDACTED}"
    text = _QUOTED_ASSIGN.sub(lambda m: f"{m.group(1)}{m.group(2)}={REDACTED}{m.group(1)}"
                              if is_secret_key(m.group(2)) else m.group(0), text)
    text = _ASSIGN.sub(lambda m: f"{m.group(1)}={REDACTED}" if is_secret_key(m.group(1)) else m.group(0), text)
    return _MAPPING.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(1)}{m.group(3)}'{REDACTED}'"
                        if is_secret_key(m.group(2)) else m.group(0), text)


def redact(value: Any) -> Any:
    """A copy of `value` that is safe to print, log, save or hand to wandb: the one redaction function.

    Config trees: entries under secret-looking keys (see is_secret_key) become '***'. Strings (config
    values, argv items, log lines): `user:pass@` in URLs, `secret.key=value` assignments and
    `'secret': value` pairs. Lists of strings are command lines: the value after a `--secret-flag` too.
    """
    if isinstance(value, dict):
        return {k: (REDACTED if is_secret_key(str(k)) and v not in (None, "") else redact(v))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        out = [redact(v) for v in value]
        for i in range(1, len(out)):
            prev = value[i - 1]
            if (isinstance(prev, str) and prev.startswith("-") and "=" not in prev and isinstance(value[i], str)
                    and is_secret_key(prev.lstrip("-"))):
                out[i] = REDACTED
        return type(value)(out) if isinstance(value, tuple) else out
    if isinstance(value, str):
        return _redact_text(value)
    return value
