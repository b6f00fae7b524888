"""`python -m vae_mlops download` against broken and unusual mirrors, as a user runs it.

Each fault ends with exit code 2, no traceback, a message naming the file (and mirror), and nothing under
`data/`; each working mirror (raw file://, https with a private CA, a fallback) yields the verified files.
"""

from __future__ import annotations

import datetime
import gzip
import http.server
import ipaddress
import json
import shutil
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from tests.support.e2e import tool_env
from tests.support.project import tiny_raw_params
from tests.support.synthetic import NAMES
from vae_mlops.atomic import sha256_file
from vae_mlops.datasets import get_dataset

pytestmark = pytest.mark.slow  # each case starts the CLI (a few seconds of imports)


def download(root: Path, *sets: str, **env: str) -> subprocess.CompletedProcess:
    """`python -m vae_mlops download` in project `root` (its params.yaml: the tiny dataset, 1 retry)."""
    root.mkdir(parents=True, exist_ok=True)
    params = root / "params.yaml"
    if not params.exists():
        params.write_text(yaml.safe_dump(tiny_raw_params(**{"data.retries": 1, "data.timeout_s": 5})))
    cmd = [sys.executable, "-m", "vae_mlops", "download", "--root", str(root), "--params", str(params), *sets]
    return subprocess.run(cmd, cwd=root, env=tool_env(**env), capture_output=True, text=True, timeout=120)


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def assert_refused(proc: subprocess.CompletedProcess, root: Path, *names: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for name in names:
        assert name in proc.stderr, (name, proc.stderr)
    assert files_under(root / "data") == []  # nothing half-downloaded, no folder swapped in


def assert_verified(root: Path) -> None:
    raw = root / "data" / "raw" / "tiny"
    spec = get_dataset("tiny")
    for f in spec.files:
        assert sha256_file(raw / f.name) == f.sha256, f.name
    assert json.loads((raw / "manifest.json").read_text())["files"] == {f.name: f.sha256 for f in spec.files}


@pytest.fixture
def mirror(tiny_mirror, tmp_path) -> Path:
    """A private copy of the tiny dataset's gzipped mirror, for a test to break."""
    return Path(shutil.copytree(tiny_mirror, tmp_path / "mirror"))


# ---------------------------------------------------------------- broken files


def test_an_empty_file_is_named_and_nothing_is_written(mirror, tmp_path):
    name = NAMES["train", "images"]
    (mirror / f"{name}.gz").write_bytes(b"")
    proc = download(tmp_path / "proj", VAE_DATA_MIRROR=str(mirror))
    assert_refused(proc, tmp_path / "proj", name, "empty")


def test_an_html_page_under_the_plain_name_is_named_and_nothing_is_written(mirror, tmp_path):
    name = NAMES["test", "labels"]
    (mirror / f"{name}.gz").unlink()  # so the plain name is what the mirror serves
    (mirror / name).write_text("<!DOCTYPE html>\n<html><body>Moved</body></html>\n")
    proc = download(tmp_path / "proj", VAE_DATA_MIRROR=f"file://{mirror}")
    assert_refused(proc, tmp_path / "proj", name, "served an HTML page", f"{mirror}/{name}")


def test_one_of_the_four_files_missing_is_named_and_nothing_is_written(mirror, tmp_path):
    name = NAMES["test", "labels"]
    (mirror / f"{name}.gz").unlink()
    proc = download(tmp_path / "proj", VAE_DATA_MIRROR=str(mirror))
    assert_refused(proc, tmp_path / "proj", f"{name}: not found at {mirror}", "VAE_DATA_MIRROR")


# ---------------------------------------------------------------- mirrors that work


def test_a_raw_file_url_mirror_gives_the_verified_files(tiny_mirror, tmp_path):
    raw_mirror = tmp_path / "raw mirror"  # a space: the URL is quoted, the path unquoted
    raw_mirror.mkdir()
    for f in tiny_mirror.iterdir():
        (raw_mirror / f.name.removesuffix(".gz")).write_bytes(gzip.decompress(f.read_bytes()))
    url = raw_mirror.as_uri()
    proc = download(tmp_path / "proj", VAE_DATA_MIRROR=url)
    assert proc.returncode == 0, proc.stderr
    for name in NAMES.values():
        assert f"{name}: " in proc.stderr and f"from {url}/{name}, sha256 ok" in proc.stderr
    assert_verified(tmp_path / "proj")


def _ca_and_server_cert(folder: Path) -> tuple[Path, Path, Path]:
    """A private CA, and a certificate for 127.0.0.1 that it signed: (ca.pem, server.pem, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vae-mlops test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def https_mirror(tiny_mirror, tmp_path) -> Iterator[tuple[str, Path]]:
    """The tiny mirror over https on 127.0.0.1, with a certificate from a private CA; (url, ca.pem)."""
    ca, cert, key = _ca_and_server_cert(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    handler = lambda *a, **k: _Quiet(*a, directory=str(tiny_mirror), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_port}/", ca
    finally:
        server.shutdown()
        server.server_close()


def test_an_https_mirror_with_a_private_ca_works_through_ssl_cert_file(https_mirror, tmp_path):
    url, ca = https_mirror
    untrusted = download(tmp_path / "untrusted", VAE_DATA_MIRROR=url)
    assert_refused(untrusted, tmp_path / "untrusted", f"{url}{NAMES['train', 'images']}.gz", "CERTIFICATE_VERIFY_FAILED")
    trusted = download(tmp_path / "proj", VAE_DATA_MIRROR=url, SSL_CERT_FILE=str(ca))
    assert trusted.returncode == 0, trusted.stderr
    assert f"from {url}{NAMES['train', 'images']}.gz, sha256 ok" in trusted.stderr
    assert_verified(tmp_path / "proj")


class _Broken(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        type(self).requests.append(self.path)
        self.send_error(503, "down for maintenance")

    def log_message(self, *args) -> None:
        pass


def test_a_failing_mirror_falls_back_to_the_next_one(tiny_mirror, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Broken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    broken = f"http://127.0.0.1:{server.server_port}/mnist/"
    specs = yaml.safe_load(Path(tool_env()["VAE_EXTRA_DATASETS"]).read_text())
    specs["tiny"]["mirrors"] = [broken, tiny_mirror.as_uri()]  # the dataset's own mirror list, in order
    (tmp_path / "datasets.yaml").write_text(yaml.safe_dump(specs))
    try:
        proc = download(tmp_path / "proj", VAE_EXTRA_DATASETS=str(tmp_path / "datasets.yaml"), VAE_OFFLINE="0",
                        VAE_DATA_MIRROR="")  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, proc.stderr
    assert sorted(_Broken.requests) == sorted(f"/mnist/{n}.gz" for n in NAMES.values())  # each file tried there first
    for name in NAMES.values():
        assert f"from {tiny_mirror.as_uri()}/{name}.gz, sha256 ok" in proc.stderr
    assert_verified(tmp_path / "proj")
