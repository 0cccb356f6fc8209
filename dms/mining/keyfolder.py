"""The data owner's keys in a folder, secret parts encrypted at rest.

Files (the seeds' names): ``ctx`` (public CKKS context: parameters, public,
relinearization and Galois keys), ``pubkey`` (public key only), ``relinkey``,
``secretkey`` (the full secret context, or the Liu key, sealed), and
``meta.json``. Sealing is injected (``seal``/``unseal`` callables), so this
module needs nothing from the rest of dms.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from dms.mining.errors import MiningError
from dms.mining.schemes.ckks import CkksKeys
from dms.mining.schemes.liu import LiuKey

Sealer = Callable[[bytes, str], bytes]  # (plaintext, name) -> sealed bytes
Unsealer = Callable[[bytes, str], bytes]


def save_keys(folder: Path, keys: CkksKeys | LiuKey, seal: Sealer) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    scheme = "ckks" if isinstance(keys, CkksKeys) else "liu"
    files: dict[str, bytes] = {}
    if isinstance(keys, CkksKeys):
        ctx = keys.context
        files["ctx"] = keys.public_context_bytes()
        files["pubkey"] = ctx.serialize(
            save_public_key=True,
            save_secret_key=False,
            save_galois_keys=False,
            save_relin_keys=False,
        )
        files["relinkey"] = ctx.serialize(
            save_public_key=False,
            save_secret_key=False,
            save_galois_keys=False,
            save_relin_keys=True,
        )
        files["secretkey"] = seal(keys.secret_context_bytes(), "secretkey")
    else:
        files["secretkey"] = seal(keys.to_bytes(), "secretkey")
    for name, data in files.items():
        path = folder / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    (folder / "meta.json").write_text(json.dumps({"scheme": scheme, "level": keys.level}))


def load_keys(folder: Path, unseal: Unsealer) -> CkksKeys | LiuKey:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        scheme, level = meta["scheme"], int(meta["level"])
        sealed = (folder / "secretkey").read_bytes()
    except FileNotFoundError as exc:
        raise MiningError(
            f"{folder}: not a key folder (missing {Path(exc.filename).name})"
        ) from None
    except (ValueError, KeyError, TypeError):
        raise MiningError(f"{folder}/meta.json is corrupted") from None
    raw = unseal(sealed, "secretkey")
    if scheme == "ckks":
        return CkksKeys.from_secret_bytes(raw, level)
    if scheme == "liu":
        return LiuKey.from_bytes(raw)
    raise MiningError(f"{folder}: unknown scheme {scheme!r}")
