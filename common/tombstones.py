"""Who asked to be forgotten, as hashes: ``doppel forget`` / ``/forget`` leave one per identity
(and per private conversation deleted whole) in the ``forgotten`` table, and the ingest skips what
they match, so importing the same export again does not bring the person back.

Only a SHA-256 of each key is kept, never the id or name itself. (A numeric id is guessable from its
hash by trying them all; what is kept is only that someone with that id asked to be forgotten.)
The keys are those ``feedback.privacy`` matches a person by: ``telegram:123`` for the export's
``user123`` as well, a WhatsApp or Messenger name in lower case, and ``name:`` any display name.
"""

from __future__ import annotations

import hashlib

NAMED = ("whatsapp", "messenger", "name")  # platforms that know people by name: matched in lower case


def key_hash(platform: str, ident: str) -> str:
    ident = ident.strip()
    if platform in NAMED:
        ident = ident.casefold()
    return hashlib.sha256(f"{platform}:{ident}".encode("utf-8", "surrogatepass")).hexdigest()


def chat_hash(platform: str, external_id: str) -> str:
    return hashlib.sha256(f"chat:{platform}:{external_id}".encode("utf-8", "surrogatepass")).hexdigest()


def sender_hashes(platform: str, sender_id: str | None, name: str | None) -> list[str]:
    """Every key a message's sender could have been forgotten under."""
    out = []
    if sender_id:
        out.append(key_hash(platform, sender_id))
        if platform == "telegram" and sender_id.startswith("user") and sender_id[4:].isdigit():
            out.append(key_hash(platform, sender_id[4:]))
    if name:
        out.append(key_hash("name", name))
        if platform in NAMED:
            out.append(key_hash(platform, name))
    return out
