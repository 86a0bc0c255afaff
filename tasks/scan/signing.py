"""Signing and verifying model files with OpenSSF model-signing (key-based, offline).

A model is `<stem>.safetensors` + `<stem>.json`; its signature is `<stem>.sig` beside them: a
Sigstore bundle (model-signing's format) over exactly those two files, by name, signed with an
elliptic-curve private key. The scan service signs every version it clears and every repaired
model with its key (`platform.signing_key`, env MESA_SIGNING_KEY, else
`<state_folder>/keys/signing-key.pem`, generated on first use with its public half
`signing-key.pub.pem` beside it; the state folder is git-ignored). An arriving model that carries
a `<stem>.sig` is verified against our public key and `platform.trusted_keys` before anything
else: a signature that does not hold rejects the model, naming the file and what differs.

    mesa-scan --verify-signature [--public-key PEM] PATH   # offline check (tasks.scan.cli)
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mesa_lib import modelfiles
from tasks.common.params import Params

KEY_ENV = "MESA_SIGNING_KEY"
SUFFIX = ".sig"
_MAX_SIGNATURE_BYTES = 1 << 20  # a bundle over two files is a few KiB


class SignatureError(ValueError):
    """A signature that does not hold; the message names the file and the cause (raw: the
    caller escapes it for display)."""


@dataclass(frozen=True)
class Keys:
    """The service's key pair: private (signs) and public (verifies) PEM files."""

    private: Path
    public: Path


def key_paths(params: Params) -> Keys:
    """Where the signing key is: MESA_SIGNING_KEY, `platform.signing_key`, or the state folder."""
    chosen = os.environ.get(KEY_ENV) or params.platform.signing_key
    private = Path(chosen) if chosen else (Path(params.scan.state_folder) / "keys"
                                           / "signing-key.pem")
    private = private.resolve()
    return Keys(private, private.with_name(private.name.removesuffix(".pem") + ".pub.pem"))


def ensure_key(params: Params) -> Keys:
    """The key pair, generated (P-256, private file 0600) on first use."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    keys = key_paths(params)
    if not keys.private.is_file():
        keys.private.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        fd = os.open(keys.private, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
    if not keys.public.is_file():
        key = serialization.load_pem_private_key(keys.private.read_bytes(), None)
        keys.public.write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return keys


def fingerprint(public_key: Path) -> str:
    """sha256 of the DER public key, first 16 hex digits (names the signer in tags)."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(Path(public_key).read_bytes())
    der = key.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


def trusted_keys(params: Params) -> list[Path]:
    """Our public key (made if needed) and `platform.trusted_keys`."""
    return [ensure_key(params).public, *(Path(k) for k in params.platform.trusted_keys)]


def _stage(files: list[Path], folder: Path) -> Path:
    """Copy exactly the signed files into `folder` (the signature covers them by name)."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, folder / Path(f).name)
    return folder


def signed_files(stem: Path) -> list[Path]:
    """The files a signature of model `stem` covers."""
    return list(modelfiles.files(stem))


def sign(stem: Path, signature: Path, private_key: Path) -> Path:
    """Sign `<stem>.safetensors` + `<stem>.json` into `signature`; returns it."""
    from model_signing import signing

    with tempfile.TemporaryDirectory(prefix="mesa-sign-") as tmp:
        staged = _stage(signed_files(stem), Path(tmp) / "model")
        signing.Config().use_elliptic_key_signer(private_key=private_key).sign(staged, signature)
    return signature


def _why(err: Exception) -> str:
    """model-signing's error as a sentence naming the files (the digests it quotes are left out).

    Its mismatch message is the repr of a list of strings, so the quotes around a file name
    come escaped or not depending on the digest bytes beside them: both are read."""
    text = str(err)
    if text.startswith("Key mismatch"):
        return "not signed by this key"
    quoted = r"\\?['\"]([^'\"\\]+)\\?['\"]"
    names = re.findall(r"Hash mismatch for " + quoted, text)
    if names:
        return f"{', '.join(names)} differ(s) from what was signed (altered after signing)"
    extra = re.search(r"Extra files found in model " + quoted + r": ([^'\"\\\]]+)", text)
    missing = re.search(r"Missing files in model " + quoted + r": ([^'\"\\\]]+)", text)
    if extra or missing:
        parts = ([f"{extra.group(2).strip()} not covered by the signature"] if extra else []) + (
            [f"{missing.group(2).strip()} signed but missing"] if missing else [])
        return "; ".join(parts)
    return f"the signature does not verify ({type(err).__name__})"


def verify(stem: Path, signature: Path, public_keys: list[Path]) -> str:
    """Check `signature` over the model `stem` against each key; the verifying key's fingerprint.

    Raises:
        SignatureError: no key verifies it; names the signature file and why (a file altered
            after signing, a signature by another key, an unreadable bundle).
    """
    from model_signing import verifying

    signature = Path(signature)
    if not signature.is_file():
        raise SignatureError(f"{signature}: signature file is missing")
    if signature.stat().st_size > _MAX_SIGNATURE_BYTES:
        raise SignatureError(f"{signature}: signature file is larger than "
                             f"{_MAX_SIGNATURE_BYTES} bytes; refused")
    reasons = []
    with tempfile.TemporaryDirectory(prefix="mesa-verify-") as tmp:
        staged = _stage([f for f in signed_files(stem) if f.is_file()], Path(tmp) / "model")
        for key in public_keys:
            try:
                verifying.Config().use_elliptic_key_verifier(public_key=key).verify(staged,
                                                                                   signature)
                return fingerprint(key)
            except RecursionError:
                reasons.append("the bundle nests too deeply to parse")
            except Exception as err:  # noqa: BLE001 - model-signing raises many kinds
                reasons.append(_why(err))
    specific = [r for r in reasons if r != "not signed by this key"]
    why = specific[0] if specific else (f"not signed by any trusted key ({len(public_keys)} "
                                        "tried: ours and platform.trusted_keys)")
    raise SignatureError(f"{signature}: signature check failed: {why}")
