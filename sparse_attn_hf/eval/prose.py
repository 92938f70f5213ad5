"""Public-domain prose of two genres, held out from every fit and choice: Alice's Adventures in Wonderland
(fiction) and the Library of Congress's Workshop on Electronic Texts proceedings (discussion), as the Brotli
1.1.0 source distribution ships them (``data/prose/README.md``: provenance and checksums). Nothing is fetched.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

FOLDER = Path(__file__).parent / "data" / "prose"
TEXTS = {"alice": "alice29.txt", "lcet10": "lcet10.txt"}
SHA256 = {"alice": "7467306ee0feed4971260f3c87421154a05be571d944e9cb021a5713700c38f0",
          "lcet10": "5314ba1dbb03f471df88bec6cd120a938ef60d0fd3511c5c1dce61bf7463245f"}


@lru_cache(maxsize=None)
def prose_text(name: str) -> str:
    """The text ``name`` (``"alice"`` or ``"lcet10"``), checked against its recorded checksum."""
    if name not in TEXTS:
        raise ValueError(f"no prose text {name!r}: use one of {', '.join(TEXTS)}.")
    data = (FOLDER / TEXTS[name]).read_bytes()
    if hashlib.sha256(data).hexdigest() != SHA256[name]:
        raise ValueError(f"{FOLDER / TEXTS[name]} does not match its recorded SHA-256 (data/prose/README.md): the "
                         "file was edited or damaged; reinstall the package.")
    return data.decode("ascii")


def prose_sha256(name: str) -> str:
    prose_text(name)
    return SHA256[name]
