"""Signed SKU bundles on a real SKU folder: pack on one machine, install into another store, every refusal, the
https download and the `inspector sku` command line."""

from __future__ import annotations

import functools
import http.server
import io
import ipaddress
import json
import shutil
import ssl
import tarfile
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from foundation.errors import DataError
from inspector.bundle import (
    PlanTarget,
    install,
    keygen,
    load_private_key,
    pack,
    signature_document,
    signature_path,
)
from inspector.cli import main
from inspector.skustore import SkuStore
from tests.fixtures_engines import copy_sku

T4 = PlanTarget("Tesla T4", "7.5", "10.8.0.43")
H100 = PlanTarget("NVIDIA H100 80GB HBM3", "9.0", "10.8.0.43")
PLAN = "tdad.tesla-t4.trt10.8.0.43.fp16.plan"

Members = list[tuple[tarfile.TarInfo, bytes]]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trusted and an untrusted key pair."""
    folder = tmp_path_factory.mktemp("keys")
    trusted, trusted_pub = keygen(folder, "producer")
    other, other_pub = keygen(folder, "stranger")
    return {"key": trusted, "pub": trusted_pub, "other": other, "other_pub": other_pub}


@pytest.fixture(scope="module")
def sku_folder(random_calibrated_sku: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The calibrated SKU with an eval report and a (stand-in) TensorRT plan for a T4, as `inspector build`
    names and describes it."""
    folder = copy_sku(random_calibrated_sku, tmp_path_factory.mktemp("producer") / "part")
    (folder / "report.json").write_text(json.dumps({"rows": [{"image_auroc": 0.97}]}))
    (folder / PLAN).write_bytes(b"plan bytes")
    (folder / PLAN).with_suffix(".json").write_text(json.dumps(
        {"gpu": T4.gpu, "compute_capability": T4.compute_capability, "tensorrt": T4.tensorrt, "precision": "fp16",
         "onnx": "tdad.fp16.onnx"}))
    (folder / "train_state").mkdir()
    (folder / "train_state" / "state.json").write_text("{}")
    return folder


@pytest.fixture(scope="module")
def bundle(sku_folder: Path, keys: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SKU packed and signed by the trusted key (read-only: copy it to change it)."""
    out = tmp_path_factory.mktemp("bundles") / "part.tar.gz"
    pack(sku_folder, keys["key"], out)
    return out


def station_store(tmp_path: Path) -> SkuStore:
    """The store of "another machine": a root of its own."""
    return SkuStore(tmp_path / "station" / "skus")


def read_members(path: Path) -> Members:
    """Every member of a bundle with its bytes (all are regular files)."""
    with tarfile.open(path, "r:*") as tar:
        return [(m, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]


def write_members(path: Path, members: Members) -> None:
    """A bundle (plain tar) of these members, in this order."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)


def flip(data: bytes, at: int) -> bytes:
    """`data` with the byte at `at` changed."""
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def assert_nothing_installed(store: SkuStore) -> None:
    """No version of "part" and no staging folder left in the store."""
    assert store.versions("part") == []
    assert not list((store.root / "part").glob(".staging-*"))


def test_pack_then_install_on_another_machine(bundle: Path, sku_folder: Path, keys: dict[str, Path],
                                              tmp_path: Path) -> None:
    store = station_store(tmp_path)
    done = install(store, bundle, [keys["other_pub"], keys["pub"]], target=T4, actor="tester")
    assert not done.already and done.sku == "part"
    files = sorted(p.relative_to(done.path).as_posix() for p in done.path.rglob("*") if p.is_file())
    expected = sorted(p.relative_to(sku_folder).as_posix() for p in sku_folder.rglob("*")
                      if p.is_file() and "train_state" not in p.parts)
    assert files == expected, "every file but the training checkpoints"
    assert all((done.path / f).read_bytes() == (sku_folder / f).read_bytes() for f in files)
    manifest = done.manifest
    assert manifest.plans[PLAN].gpu == T4.gpu and manifest.plans[PLAN].compute_capability == "7.5"
    assert manifest.eval_report == {"rows": [{"image_auroc": 0.97}]}
    assert manifest.producer.tool.startswith("tdad-inspector")
    (version,) = store.versions("part")
    assert (version.id, version.origin, version.source) == (done.version_id, "bundle", str(bundle))
    assert version.created == manifest.created and version.details["signed_by"]
    again = install(store, bundle, [keys["pub"]])
    assert again.already and again.version_id == done.version_id
    assert len(store.versions("part")) == 1


def test_install_under_another_name_and_without_a_gpu_check(bundle: Path, keys: dict[str, Path],
                                                           tmp_path: Path) -> None:
    store = station_store(tmp_path)
    done = install(store, bundle, [keys["pub"]], sku="part-b", target=None)  # an onnxruntime station
    assert done.sku == "part-b" and store.skus() == ["part-b"]


def resign(members: Members, key: Path) -> str:
    return signature_document(members[0][1], load_private_key(key))


def _tamper_member(members: Members, keys: dict[str, Path]) -> str | None:
    index = next(i for i, (m, _) in enumerate(members) if m.name == "model.safetensors")
    members[index] = (members[index][0], flip(members[index][1], len(members[index][1]) - 1))
    return None


def _tamper_manifest(members: Members, keys: dict[str, Path]) -> str | None:
    members[0] = (members[0][0], members[0][1].replace(b'"sku": "part"', b'"sku": "pary"'))
    return None


def _untrusted(members: Members, keys: dict[str, Path]) -> str | None:
    return resign(members, keys["other"])


def _drop(members: Members, keys: dict[str, Path]) -> str | None:
    members[:] = [(m, d) for m, d in members if m.name != "calibration.json"]
    return None


def _extra(members: Members, keys: dict[str, Path]) -> str | None:
    members.append((tarfile.TarInfo("extra.txt"), b"not signed"))
    return None


def _traversal(members: Members, keys: dict[str, Path]) -> str | None:
    members.insert(1, (tarfile.TarInfo("../x"), b"escape"))
    return None


def _link(members: Members, keys: dict[str, Path]) -> str | None:
    link = tarfile.TarInfo("meta.json")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    members.insert(1, (link, b""))
    return None


def _schema(members: Members, keys: dict[str, Path]) -> str | None:
    doc = json.loads(members[0][1])
    doc["schema_version"] = 99
    members[0] = (members[0][0], json.dumps(doc).encode())
    return resign(members, keys["key"])  # signed by the trusted producer: the schema alone is wrong


@pytest.mark.parametrize(("edit", "message"), [
    pytest.param(_tamper_member, "member 'model.safetensors' differs from its size or sha256 in bundle.json: "
                 "tampered", id="tampered-member"),
    pytest.param(_tamper_manifest, "bad signature: bundle.json was changed after signing", id="tampered-manifest"),
    pytest.param(_untrusted, "signed by key [0-9a-f]{16}, which is not in store.trusted_keys", id="untrusted-key"),
    pytest.param(_drop, r"1 file\(s\) listed in bundle.json are missing \(calibration.json\)", id="missing-member"),
    pytest.param(_extra, "member 'extra.txt' is not listed in bundle.json", id="extra-member"),
    pytest.param(_traversal, r"member '\.\./x' leaves its folder .* \(path traversal\)", id="path-traversal"),
    pytest.param(_link, "member 'meta.json' is a link", id="link"),
    pytest.param(_schema, "bundle schema version 99, this inspector reads 1", id="wrong-schema"),
])
def test_refusals_leave_nothing_installed(bundle: Path, keys: dict[str, Path], tmp_path: Path,
                                          edit: Callable[[Members, dict[str, Path]], str | None],
                                          message: str) -> None:
    members = read_members(bundle)
    bad = tmp_path / "bad.tar"
    signature = edit(members, keys)
    write_members(bad, members)
    signature_path(bad).write_text(signature or signature_path(bundle).read_text())
    store = station_store(tmp_path)
    with pytest.raises(DataError, match=f"^{bad}: .*{message}") as info:
        install(store, bad, [keys["pub"]])
    assert "\n" not in str(info.value)
    assert_nothing_installed(store)


def test_unsigned_corrupt_and_unknown_bundles_are_refused(bundle: Path, keys: dict[str, Path],
                                                          tmp_path: Path) -> None:
    store = station_store(tmp_path)
    unsigned = Path(shutil.copy(bundle, tmp_path / "unsigned.tar.gz"))
    with pytest.raises(DataError, match=r"unsigned.tar.gz: unsigned \(no unsigned.tar.gz.sig beside it\)"):
        install(store, unsigned, [keys["pub"]])
    corrupt = Path(shutil.copy(bundle, tmp_path / "corrupt.tar.gz"))
    shutil.copy(signature_path(bundle), signature_path(corrupt))
    corrupt.write_bytes(corrupt.read_bytes()[: corrupt.stat().st_size // 2])
    with pytest.raises(DataError, match=r"corrupt\.tar\.gz: not a readable bundle"):
        install(store, corrupt, [keys["pub"]])
    with pytest.raises(DataError, match=r"store\.trusted_keys is empty"):
        install(store, bundle, [])
    with pytest.raises(DataError, match="only https:// URLs"):
        install(store, "http://example.invalid/part.tar.gz", [keys["pub"]])
    assert_nothing_installed(store)


def test_plans_for_another_gpu_are_refused_on_a_tensorrt_station(bundle: Path, keys: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    store = station_store(tmp_path)
    with pytest.raises(DataError, match=r"no TensorRT plan for this box's GPU NVIDIA H100 80GB HBM3 \(compute 9.0, "
                                        r"TensorRT 10.8.0.43\) \(its plans are for: Tesla T4 \(compute 7.5"):
        install(store, bundle, [keys["pub"]], target=H100)
    assert_nothing_installed(store)
    newer_trt = PlanTarget(T4.gpu, T4.compute_capability, "10.9.0.1")
    with pytest.raises(DataError, match="no TensorRT plan for this box's GPU"):
        install(store, bundle, [keys["pub"]], target=newer_trt)


# ---- https ---------------------------------------------------------------------------------------------------


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, issuer_key: ec.EllipticCurvePrivateKey,
                 ca: bool) -> x509.Certificate:
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                              critical=False))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    else:
        builder = (builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(
            "127.0.0.1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    return builder.sign(issuer_key, hashes.SHA256())


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def https_server(bundle: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local https server of the bundle's folder, its certificate signed by a CA made here; (base URL, CA)."""
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("test CA", ca_key, "test CA", ca_key, ca=True)
    server = _certificate("127.0.0.1", server_key, "test CA", ca_key, ca=False)
    ca_file, chain = tmp_path / "ca.pem", tmp_path / "server.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    chain.write_bytes(server.public_bytes(serialization.Encoding.PEM) + server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            functools.partial(_QuietHandler, directory=str(bundle.parent)))
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{httpd.server_address[1]}", ca_file
    httpd.shutdown()
    httpd.server_close()
    thread.join(10)


def test_install_from_an_https_url(https_server: tuple[str, Path], bundle: Path, keys: dict[str, Path],
                                   tmp_path: Path) -> None:
    base, ca_file = https_server
    store = station_store(tmp_path)
    url = f"{base}/{bundle.name}"
    with pytest.raises(DataError, match=f"^{url}: download failed .*CERTIFICATE_VERIFY_FAILED"):
        install(store, url, [keys["pub"]])  # the system's CAs do not know this server
    with pytest.raises(DataError, match=f"^{base}/nothing.tar.gz: download failed \\(HTTP 404"):
        install(store, f"{base}/nothing.tar.gz", [keys["pub"]], ca_file=ca_file)
    done = install(store, url, [keys["pub"]], ca_file=ca_file)
    assert not done.already and store.versions("part")[0].source == url
    assert not list(store.root.glob(".download-*")), "the downloaded files are removed"


# ---- the command line ----------------------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_from_keygen_to_rollback(sku_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "sku", "keygen", "--out", str(tmp_path / "keys"))
    assert code == 0 and "key id" in out
    assert (tmp_path / "keys" / "sku-signing.key").stat().st_mode & 0o777 == 0o600
    second = copy_sku(sku_folder, tmp_path / "second")
    (second / "notes.txt").write_text("recalibrated")
    bundles = []
    for folder in (sku_folder, second):
        out_file = tmp_path / "out" / f"{folder.name}.tar.gz"
        code, out, _ = run_cli(capsys, "sku", "pack", "--sku-dir", str(folder), "--key",
                               str(tmp_path / "keys" / "sku-signing.key"), "--out", str(out_file), "--name", "part")
        assert code == 0 and "1 TensorRT plans, eval report included" in out
        bundles.append(out_file)
    config = tmp_path / "station.toml"
    config.write_text('active_sku = "part"\n[store]\ndir = "skus"\ntrusted_keys = ["keys/sku-signing.pub"]\n'
                      '[skus.part]\nmodel_dir = "skus/part/active"\n')
    ids = []
    for file in bundles:
        code, out, _ = run_cli(capsys, "sku", "install", str(file), "--config", str(config))
        assert code == 0 and out.startswith("installed: SKU part version ")
        ids.append(out.split()[4])
    for version in ids:
        code, out, err = run_cli(capsys, "sku", "activate", "--sku", "part", version, "--reason", "ECO-7",
                                 "--config", str(config))
        assert code == 0, err
        assert f"version {version} is active" in out and "note:" not in out
    code, out, _ = run_cli(capsys, "sku", "list", "--config", str(config))
    assert code == 0
    rows = {line.split()[1]: line for line in out.splitlines()[1:]}
    assert set(rows) == set(ids) and "  *  " in rows[ids[1]] and "  *  " not in rows[ids[0]]
    code, out, _ = run_cli(capsys, "sku", "rollback", "--sku", "part", "--config", str(config))
    assert code == 0 and f"version {ids[0]} is active (was {ids[1]})" in out
    history = [json.loads(line) for line in (tmp_path / "skus" / "part" / "history.jsonl").read_text().splitlines()]
    assert [(h["action"], h["reason"]) for h in history[-3:]] == [("activate", "ECO-7"), ("activate", "ECO-7"),
                                                                  ("rollback", "")]


def test_cli_errors_are_one_line_and_exit_2(bundle: Path, keys: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "station.toml"
    config.write_text(f'active_sku = "part"\n[store]\ndir = "skus"\ntrusted_keys = ["{keys["pub"]}"]\n'
                      f'[skus.part]\nmodel_dir = "skus/part/active"\n')
    unsigned = Path(shutil.copy(bundle, tmp_path / "unsigned.tar.gz"))
    code, _, err = run_cli(capsys, "sku", "install", str(unsigned), "--config", str(config))
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {unsigned}: unsigned")

    done = install(SkuStore(tmp_path / "skus"), bundle, [keys["pub"]])
    (done.path / "calibration.json").unlink()  # a version the daemon would refuse
    code, _, err = run_cli(capsys, "sku", "activate", "--sku", "part", done.version_id, "--config", str(config))
    assert code == 2 and err.count("\n") == 1
    assert f"version {done.version_id} fails the pre-flight, no version is active" in err
    assert not (tmp_path / "skus" / "part" / "active").exists()

    code, _, err = run_cli(capsys, "sku", "pack", "--sku-dir", str(tmp_path), "--key", str(keys["key"]), "--out",
                           str(tmp_path / "x.tar.gz"))
    assert code == 2 and err.count("\n") == 1 and "meta.json: missing" in err
    (tmp_path / "keys").mkdir()
    world_readable = Path(shutil.copy(keys["key"], tmp_path / "keys" / "open.key"))
    world_readable.chmod(0o644)
    code, _, err = run_cli(capsys, "sku", "pack", "--sku-dir", str(done.path), "--key", str(world_readable),
                           "--out", str(tmp_path / "x.tar.gz"))
    assert code == 2 and err.count("\n") == 1 and "world-readable" in err
    code, _, err = run_cli(capsys, "sku", "rollback", "--sku", "part", "--config", str(config))
    assert code == 2 and "has no active version" in err
