"""Signed SKU bundles: one file per SKU version, verified before anything of it lands in the version store.

A bundle is a gzip'd tar: `bundle.json` first (BundleManifest: schema version, SKU name, version id, created
time, producer, every file with its sha256 and size, the GPU, compute capability and TensorRT version each
*.plan was built for, and the SKU folder's eval report `report.json` when it has one), then the SKU folder's
files (training checkpoints under train_state/ left out). `<bundle>.sig` beside it is the detached Ed25519
signature over the exact bytes of bundle.json, so that one signature covers every byte of the bundle.

Trust: a station installs only bundles signed by a key in `[store] trusted_keys` (PEM public keys). The producer
keeps the private key (`inspector sku keygen`, mode 0600) off the stations. `install` checks, before a byte of
the SKU is written: the signature (present, by a trusted key, valid), the schema version, that the version id
matches the file list, and the plans rule below; then it streams each member into a staging folder inside the
store, refusing absolute paths, `..`, links, devices, extra, duplicate or missing members, and any size or
sha256 that differs from bundle.json; the store's rename of the staging folder is the commit point.

Plans rule: on a station whose engine.backend is "tensorrt" (install's `plan_target`), a bundle must hold a plan
built for this box's GPU model, compute capability and TensorRT version, since plans are per GPU and an
installed version is read-only (they cannot be built on the box afterwards); plans for other GPUs ride along
unused, so one bundle may serve several kinds of box. On onnxruntime and torch stations plans are never loaded
and not checked. Every refusal is one DataError line naming the bundle and the fix.
"""

from __future__ import annotations

import base64
import getpass
import gzip
import hashlib
import io
import json
import os
import socket
import ssl
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, ValidationError

from engines.runtime.config import EngineSettings
from engines.runtime.tensorrt_backend import plan_sidecar
from foundation.errors import DataError, first_line
from inspector.config import check_secret_file
from inspector.skustore import FileEntry, Provenance, SkuStore, VersionExists, sku_files, unsafe_path, version_id
from tdad.manifest import code_version, read_manifest

SCHEMA_VERSION = 1
BUNDLE_JSON = "bundle.json"
SIGNATURE_SUFFIX = ".sig"
EVAL_REPORT = "report.json"  # what `inspector eval --out <sku dir>` writes
MAX_BUNDLE_JSON = 16 << 20  # bytes; a bigger bundle.json is refused before it is read
DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK = 1 << 20


class PlanInfo(BaseModel):
    """What a *.plan was built for, from its sidecar .json (engines/runtime/build.py)."""

    model_config = ConfigDict(frozen=True)

    gpu: str
    compute_capability: str
    tensorrt: str
    precision: str


class Producer(BaseModel):
    """Who packed a bundle: the tool and its version, the host and the user."""

    model_config = ConfigDict(frozen=True)

    tool: str
    host: str
    user: str


class BundleManifest(BaseModel):
    """bundle.json: what a bundle holds and where it comes from; signed as the exact bytes in the bundle."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int
    sku: str
    version_id: str
    created: str
    producer: Producer
    files: list[FileEntry]
    plans: dict[str, PlanInfo] = {}
    eval_report: dict[str, Any] | None = None


@dataclass(frozen=True)
class PlanTarget:
    """The GPU a tensorrt station runs plans on: what a bundle's plans must be built for (tensorrt None: any)."""

    gpu: str
    compute_capability: str
    tensorrt: str | None = None

    def __str__(self) -> str:
        trt = f", TensorRT {self.tensorrt}" if self.tensorrt else ""
        return f"{self.gpu} (compute {self.compute_capability}{trt})"

    def runs(self, plan: PlanInfo) -> bool:
        """Whether a plan runs here: built for this GPU model and compute capability (and TensorRT version, when
        known)."""
        return (plan.gpu, plan.compute_capability) == (self.gpu, self.compute_capability) and \
            self.tensorrt in (None, plan.tensorrt)


@dataclass(frozen=True)
class Installed:
    """The outcome of install: which version of which SKU, where, and whether it was there already."""

    sku: str
    version_id: str
    path: Path
    already: bool
    manifest: BundleManifest


def signature_path(bundle: Path) -> Path:
    """`<bundle>.sig`: where a bundle's detached signature lives."""
    return bundle.with_name(bundle.name + SIGNATURE_SUFFIX)


# ---- keys --------------------------------------------------------------------------------------------------------


def keygen(out_dir: Path, name: str = "sku-signing") -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: `<out_dir>/<name>.key` (PKCS#8 PEM, mode 0600) and `<name>.pub` (PEM);
    returns (private, public). DataError when either exists (a key is never overwritten)."""
    out_dir = Path(out_dir)
    private, public = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for path in (private, public):
        if path.exists():
            raise DataError(f"{path} exists; keys are never overwritten: choose another --out folder or --name")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM (PKCS#8, unencrypted) or raw 32-byte file that others cannot read;
    ConfigError/DataError naming the file otherwise."""
    check_secret_file(path, "--key")
    data = path.read_bytes()
    try:
        key = (Ed25519PrivateKey.from_private_bytes(data) if len(data) == 32
               else serialization.load_pem_private_key(data, password=None))
    except (ValueError, TypeError) as exc:
        raise DataError(f"{path}: not an unencrypted Ed25519 private key ({first_line(exc)}); make one with "
                        "`inspector sku keygen`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise DataError(f"{path}: a {type(key).__name__}, not an Ed25519 key; make one with `inspector sku keygen`")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM or raw 32-byte file; DataError naming the file otherwise."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"store.trusted_keys: {path} cannot be read ({exc.strerror}); fix the path") from None
    try:
        key = Ed25519PublicKey.from_public_bytes(data) if len(data) == 32 else serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise DataError(f"store.trusted_keys: {path} is not an Ed25519 public key ({first_line(exc)}); use the "
                        ".pub file `inspector sku keygen` wrote") from None
    if not isinstance(key, Ed25519PublicKey):
        raise DataError(f"store.trusted_keys: {path} is a {type(key).__name__}, not an Ed25519 key")
    return key


def signature_document(data: bytes, private_key: Ed25519PrivateKey) -> str:
    """The text of a .sig file: one JSON line with the algorithm, the signer's key id and the base64 Ed25519
    signature of `data` (the exact bytes of bundle.json)."""
    doc = {"algorithm": "ed25519", "key_id": key_id(private_key.public_key()),
           "signature": base64.b64encode(private_key.sign(data)).decode()}
    return json.dumps(doc) + "\n"


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short name of a public key: the first 16 hex digits of the sha256 of its 32 raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# ---- pack --------------------------------------------------------------------------------------------------------


def pack(sku_dir: Path, key: Path, out: Path, *, sku: str | None = None) -> BundleManifest:
    """Write SKU folder `sku_dir` as bundle `out` (tar.gz, bundle.json first) and its signature `out`.sig, signed
    with private key file `key`; `sku` names the SKU in the bundle (default: the folder's name). Both files are
    written to temp names and renamed, so a reader never sees half a bundle."""
    sku_dir = Path(sku_dir)
    read_manifest(sku_dir)  # a SKU folder, with a readable meta.json
    private_key = load_private_key(Path(key))
    files = sku_files(sku_dir)
    names = {f.path for f in files}
    if BUNDLE_JSON in names:
        raise DataError(f"{sku_dir / BUNDLE_JSON}: a SKU folder cannot hold a file of that name (the bundle's "
                        "manifest); move it away and pack again")
    created = datetime.now(UTC).replace(microsecond=0)
    manifest = BundleManifest(
        schema_version=SCHEMA_VERSION, sku=sku or sku_dir.resolve().name, version_id=version_id(files),
        created=created.isoformat(), producer=Producer(tool=f"tdad-inspector {code_version()}",
                                                       host=socket.gethostname(), user=getpass.getuser()),
        files=files, plans=_plan_infos(sku_dir, names), eval_report=_eval_report(sku_dir, names))
    data = (manifest.model_dump_json(indent=2) + "\n").encode()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with tarfile.open(tmp, "w:gz", compresslevel=6, format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_tar_info(BUNDLE_JSON, len(data), created), io.BytesIO(data))
            for entry in files:
                with (sku_dir / entry.path).open("rb") as f:
                    tar.addfile(_tar_info(entry.path, entry.size, created), f)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    sig = signature_path(out)
    sig_tmp = sig.with_name(f".{sig.name}.tmp")
    sig_tmp.write_text(signature_document(data, private_key))
    os.replace(sig_tmp, sig)
    return manifest


def _tar_info(name: str, size: int, created: datetime) -> tarfile.TarInfo:
    """A regular-file member owned by nobody in particular, dated when the bundle was made."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, int(created.timestamp())
    return info


def _plan_infos(sku_dir: Path, names: set[str]) -> dict[str, PlanInfo]:
    """What each *.plan of the folder was built for, from its sidecar; DataError for a plan without one."""
    plans = {}
    for name in sorted(n for n in names if n.endswith(".plan")):
        sidecar = plan_sidecar(Path(name)).as_posix()
        fix = f"rebuild it with `inspector build --sku-dir {sku_dir}` or remove it"
        if sidecar not in names:
            raise DataError(f"{sku_dir / name}: TensorRT plan without its sidecar {Path(sidecar).name}; {fix}")
        try:
            plans[name] = PlanInfo.model_validate_json((sku_dir / sidecar).read_bytes())
        except ValidationError as exc:
            raise DataError(f"{sku_dir / sidecar}: not a plan sidecar ({first_line(exc)}); {fix}") from None
    return plans


def _eval_report(sku_dir: Path, names: set[str]) -> dict[str, Any] | None:
    """The SKU folder's eval report (report.json of `inspector eval --out <sku dir>`), None when it has none."""
    if EVAL_REPORT not in names:
        return None
    try:
        report = json.loads((sku_dir / EVAL_REPORT).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DataError(f"{sku_dir / EVAL_REPORT}: not JSON ({first_line(exc)}); run inspector eval again or "
                        "remove it") from None
    if not isinstance(report, dict):
        raise DataError(f"{sku_dir / EVAL_REPORT}: not an eval report (a JSON object); remove it")
    return report


# ---- install -----------------------------------------------------------------------------------------------------


def plan_target(engine: EngineSettings) -> PlanTarget | None:
    """This box's GPU and TensorRT version when the station's backend is tensorrt (EngineError when the GPU stack
    is broken), else None: plans are then never loaded, so install does not check them."""
    if engine.backend != "tensorrt":
        return None
    from foundation.gpu import cuda_device, import_tensorrt

    trt = import_tensorrt()
    gpu = cuda_device(engine.device_id)
    return PlanTarget(gpu.name, gpu.compute_capability, str(trt.__version__))


def install(store: SkuStore, source: Path | str, trusted_keys: Sequence[Path], *, sku: str | None = None,
            target: PlanTarget | None = None, ca_file: Path | None = None, actor: str = "") -> Installed:
    """Verify bundle `source` (a path, or an https URL whose `.sig` sits at the URL + ".sig") against
    `trusted_keys` and add it to `store` as a version of `sku` (default: the SKU named in the bundle); not
    activated. `target`: this box's GPU on a tensorrt station (plan_target), None elsewhere. `ca_file`: CA
    certificates for https (None: the system's). Installing a bundle that is there already does nothing and
    returns already=True. Every refusal is one DataError line (see the module docstring); nothing is left behind.
    """
    if isinstance(source, str) and "://" in source:
        with _downloaded(source, store, ca_file) as (path, sig):
            return _install(store, path, sig, source, trusted_keys, sku, target, actor)
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{path}: no such bundle file; pass the file `inspector sku pack` wrote, or an https URL")
    return _install(store, path, signature_path(path), str(path.resolve()), trusted_keys, sku, target, actor)


def _install(store: SkuStore, path: Path, sig: Path, label: str, trusted_keys: Sequence[Path], sku: str | None,
             target: PlanTarget | None, actor: str) -> Installed:
    """install() of a bundle file with its signature file; `label` names the bundle in every message."""
    signer, signature = _read_signature(sig, label)
    keys = {key_id(k): k for k in (load_public_key(p) for p in trusted_keys)}
    if not keys:
        raise DataError(f"{label}: store.trusted_keys is empty, so no bundle can be verified; add the producer's "
                        "public key (the .pub of `inspector sku keygen`) to [store] trusted_keys")
    try:
        with tarfile.open(path, "r:*") as tar:
            members = iter(tar)
            first = next(members, None)
            if first is None or first.name != BUNDLE_JSON or not first.isreg() or first.size > MAX_BUNDLE_JSON:
                raise DataError(f"{label}: {BUNDLE_JSON} is not its first member, so it is not a bundle of "
                                "`inspector sku pack`; pack it again")
            with _open_member(tar, first) as stream:
                data = stream.read()
            _verify(data, signer, signature, keys, label, sig)
            manifest = _parse_manifest(data, label)
            name = sku or manifest.sku
            if target is not None and not any(target.runs(p) for p in manifest.plans.values()):
                built = sorted({f"{p.gpu} (compute {p.compute_capability}, TensorRT {p.tensorrt})"
                                for p in manifest.plans.values()})
                raise DataError(f"{label}: no TensorRT plan for this box's GPU {target} (its plans are for: "
                                f"{', '.join(built) or 'none'}); build the plans on a box with this GPU (inspector "
                                "build), pack again, or run this station with engine.backend = \"onnxruntime\"")
            if store.has_version(name, manifest.version_id):
                return Installed(name, manifest.version_id, store.path(name, manifest.version_id), True, manifest)
            provenance = Provenance(origin="bundle", source=label, created=manifest.created, actor=actor,
                                    details={"signed_by": signer, "bundle_sku": manifest.sku,
                                             "producer": manifest.producer.model_dump()})
            with store.staging(name) as staged:
                _extract(tar, members, staged, manifest.files, label)
                try:
                    store.commit(name, staged, manifest.files, provenance)
                except VersionExists:
                    already = True  # the same bundle, installed by someone else meanwhile
                else:
                    already = False
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{label}: not a readable bundle ({first_line(exc)}); download or copy it again") from None
    return Installed(name, manifest.version_id, store.path(name, manifest.version_id), already, manifest)


def _read_signature(sig: Path, label: str) -> tuple[str, bytes]:
    """(key id, signature bytes) of a .sig file; DataError "unsigned" when there is none."""
    if not sig.is_file():
        raise DataError(f"{label}: unsigned (no {sig.name} beside it); get the .sig that `inspector sku pack` wrote "
                        "with the bundle, or have the producer sign it")
    try:
        doc = json.loads(sig.read_text(encoding="utf-8"))
        return str(doc["key_id"]), base64.b64decode(doc["signature"], validate=True)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise DataError(f"{label}: {sig.name} is not a signature of `inspector sku pack`; get the bundle's .sig "
                        "again") from None


def _verify(data: bytes, signer: str, signature: bytes, keys: dict[str, Ed25519PublicKey], label: str,
            sig: Path) -> None:
    """The signature of bundle.json made by a trusted key; DataError (untrusted key, bad signature) otherwise."""
    key = keys.get(signer)
    if key is None:
        raise DataError(f"{label}: signed by key {signer}, which is not in store.trusted_keys (trusted: "
                        f"{', '.join(sorted(keys))}); add the producer's public key there if you trust it")
    try:
        key.verify(signature, data)
    except InvalidSignature:
        raise DataError(f"{label}: bad signature: {BUNDLE_JSON} was changed after signing or {sig.name} belongs to "
                        "another bundle; do not install it, get both files again from the producer") from None


def _parse_manifest(data: bytes, label: str) -> BundleManifest:
    """bundle.json of the schema this code reads, whose version id matches its files; DataError otherwise."""
    try:
        doc = json.loads(data)
        schema = doc.get("schema_version") if isinstance(doc, dict) else None
    except ValueError:
        schema = doc = None
    if schema != SCHEMA_VERSION:
        raise DataError(f"{label}: bundle schema version {schema!r}, this inspector reads {SCHEMA_VERSION}; install "
                        "it with the tdad-inspector release that packed it, or pack it again with this one")
    try:
        manifest = BundleManifest.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise DataError(f"{label}: {BUNDLE_JSON} is malformed ({where}: {first['msg']}); pack it again") from None
    if version_id(manifest.files) != manifest.version_id:
        raise DataError(f"{label}: {BUNDLE_JSON} names version {manifest.version_id}, but its files make version "
                        f"{version_id(manifest.files)}; pack it again")
    return manifest


def _open_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    """A reader of a regular-file member's bytes."""
    stream = tar.extractfile(member)
    if stream is None:
        raise DataError(f"{tar.name}: member {member.name!r} is not a regular file")
    return stream


def _member_problem(member: tarfile.TarInfo) -> str | None:
    """Why a tar member cannot be a file of a version (its path or its kind), None when it can."""
    problem = unsafe_path(member.name)
    if problem:
        return f"{problem} (path traversal)"
    if member.issym() or member.islnk():
        return "is a link"
    if not member.isreg():
        return "is not a regular file (a folder, device or FIFO)"
    return None


def _extract(tar: tarfile.TarFile, members: Iterator[tarfile.TarInfo], staged: Path, files: Sequence[FileEntry],
             label: str) -> None:
    """Write the remaining members into `staged`, each checked against its FileEntry (size, sha256) as it streams;
    DataError for an unsafe, extra, duplicate, tampered or missing member."""
    expected = {f.path: f for f in files}
    seen: set[str] = set()
    refuse = "do not install it; get the bundle again from the producer"
    for member in members:
        problem = _member_problem(member)
        if problem:
            raise DataError(f"{label}: member {member.name!r} {problem}; the bundle is malformed or malicious: "
                            f"{refuse}")
        entry = expected.get(member.name)
        if entry is None or member.name in seen:
            what = "appears twice" if member.name in seen else f"is not listed in {BUNDLE_JSON} (an extra member)"
            raise DataError(f"{label}: member {member.name!r} {what}; {refuse}")
        seen.add(member.name)
        dest = staged / member.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if member.size != entry.size or _copy_hashed(tar, member, dest) != entry.sha256:
            raise DataError(f"{label}: member {member.name!r} differs from its size or sha256 in {BUNDLE_JSON}: "
                            f"tampered or corrupt; {refuse}")
    missing = sorted(set(expected) - seen)
    if missing:
        raise DataError(f"{label}: {len(missing)} file(s) listed in {BUNDLE_JSON} are missing ({', '.join(missing)}); "
                        f"{refuse}")


def _copy_hashed(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> str:
    """Stream a member to a new file `dest`; returns the sha256 of the bytes written."""
    digest = hashlib.sha256()
    with _open_member(tar, member) as stream, dest.open("xb") as out:
        for block in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


@contextmanager
def _downloaded(url: str, store: SkuStore, ca_file: Path | None) -> Iterator[tuple[Path, Path]]:
    """Download an https bundle and its .sig into a temp folder in the store root; both removed on exit."""
    if not url.startswith("https://"):
        raise DataError(f"{url}: only https:// URLs are installed; use https, or download the bundle and its .sig "
                        "and install the file")
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise DataError(f"store.ca_file = {ca_file}: cannot be read as CA certificates ({first_line(exc)}); fix the "
                        "path") from None
    store.root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".download-", dir=store.root))
    try:
        bundle = folder / "bundle"
        _fetch(url, bundle, context)
        sig = signature_path(bundle)
        _fetch(url + SIGNATURE_SUFFIX, sig, context, missing_ok=True)  # none: refused as unsigned
        yield bundle, sig
    finally:
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()


def _fetch(url: str, dest: Path, context: ssl.SSLContext, *, missing_ok: bool = False) -> None:
    """Download `url` to `dest` (missing_ok: a 404 leaves no file); any failure is one DataError line."""
    try:
        with urllib.request.urlopen(url, context=context, timeout=DOWNLOAD_TIMEOUT_S) as response, \
                dest.open("wb") as out:
            for block in iter(lambda: response.read(_CHUNK), b""):
                out.write(block)
    except urllib.error.HTTPError as exc:
        dest.unlink(missing_ok=True)
        if exc.code == 404 and missing_ok:
            return
        raise DataError(f"{url}: download failed (HTTP {exc.code} {exc.reason}); check the URL") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise DataError(f"{url}: download failed ({str(reason)[:200]}); check the URL, the network and "
                        "[store] ca_file") from None
