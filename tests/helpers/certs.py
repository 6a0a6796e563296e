"""Test certificates made with the openssl CLI: a CA, and leaf certificates it signs."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.helpers.peers import require_program


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed test CA (certificate, key) made with the openssl CLI in ``directory``."""
    openssl = require_program("openssl")
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}-ca.crt", directory / f"{name}-ca.key"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={name} test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    return cert, key


def issue_cert(
    ca: tuple[Path, Path], directory: Path, name: str, san: str = "IP:127.0.0.1,DNS:localhost"
) -> tuple[Path, Path]:
    """A leaf certificate (for server and client use) for CN ``name`` signed by ``ca``, naming ``san``
    (subjectAltName: loopback by default)."""
    openssl = require_program("openssl")
    key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.crt"
    ext = directory / f"{name}.ext"
    ext.write_text(
        f"basicConstraints=CA:FALSE\nsubjectAltName={san}\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
    )
    subprocess.run(
        [
            openssl,
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            str(key),
            "-out",
            str(csr),
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    subprocess.run(
        [
            openssl,
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(ca[0]),
            "-CAkey",
            str(ca[1]),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            str(ext),
            "-out",
            str(cert),
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    return cert, key
