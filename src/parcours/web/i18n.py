"""A small translation layer: JSON catalogs per language, chosen per request.

Catalogs are ``web/locales/<lang>/*.json`` (flat ``{"key": "text"}``), merged per
language, so each feature ships its own file. Texts use ``{name}`` placeholders.
The language is the signed-in user's choice, else the language cookie, else the
browser's Accept-Language, else French.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

SUPPORTED = ("fr", "en")
DEFAULT = "fr"
LANG_COOKIE = "parcours_lang"
LOCALES = Path(__file__).parent / "locales"
NAMES = {"fr": "Français", "en": "English"}

log = logging.getLogger(__name__)


def load_catalogs(root: Path = LOCALES) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for lang in SUPPORTED:
        merged: dict[str, str] = {}
        for f in sorted((root / lang).glob("*.json")):
            for key, value in json.loads(f.read_text(encoding="utf-8")).items():
                if key in merged:
                    raise ValueError(f"Message {key!r} is defined twice for {lang} ({f.name})")
                merged[key] = value
        out[lang] = merged
    return out


def parse_accept_language(header: str | None) -> list[str]:
    """Language tags by preference (q-values honoured), primary subtags only."""
    if not header:
        return []
    weighted: list[tuple[float, int, str]] = []
    for i, part in enumerate(header.split(",")):
        tag, _, params = part.strip().partition(";")
        q = 1.0
        if params.strip().startswith("q="):
            try:
                q = float(params.strip()[2:])
            except ValueError:
                q = 0.0
        if tag and q > 0:
            weighted.append((-q, i, tag.split("-")[0].lower()))
    return [tag for _, _, tag in sorted(weighted)]


def negotiate(*, account_locale: str | None, cookie: str | None, accept_language: str | None) -> str:
    for choice in (account_locale, cookie):
        if choice in SUPPORTED:
            return choice  # type: ignore[return-value]
    for tag in parse_accept_language(accept_language):
        if tag in SUPPORTED:
            return tag
    return DEFAULT


class Translator:
    """``t("key", name=...)``: the text of ``key`` in one language (French, then the key, as fallbacks)."""

    def __init__(self, lang: str, catalogs: dict[str, dict[str, str]]) -> None:
        self.lang = lang
        self._messages = catalogs.get(lang, {})
        self._fallback = catalogs.get(DEFAULT, {})

    def __call__(self, key: str, **values: object) -> str:
        text = self._messages.get(key)
        if text is None:
            text = self._fallback.get(key)
            if text is None:
                log.warning("No text for message %r", key)
                return key
        return text.format(**values) if values else text
