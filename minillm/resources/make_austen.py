#!/usr/bin/env python3
"""Regenerate minillm/resources/austen/<novel>.txt.gz: Jane Austen's six novels from Debian's r-cran-janeaustenr.

Source: Debian bookworm package r-cran-janeaustenr 1.0.0-1 (the CRAN package janeaustenr by Julia Silge; the
novels are in the public domain, the packaging is MIT). The package stores the novels as R character vectors (one
element per printed line) in the R lazy-load database data/Rdata.{rdx,rdb}. No R is needed: the .rdx is a gzipped
RDS index, each .rdb entry is a 4-byte big-endian uncompressed length followed by a zlib stream holding one
serialised R object, and the pure-Python `rdata` package parses both.

Output: for each R variable (emma, mansfieldpark, northangerabbey, persuasion, prideprejudice, sensesensibility),
the vector's elements joined with "\\n" (no trailing newline), UTF-8, gzip level 9 with mtime=0 and no file name in
the header, so the files are byte-reproducible (given the same zlib; the script also prints the SHA-256 of each
uncompressed text, which does not depend on zlib).

How to run (from the repository root; never in the project's own .venv):

    python3 -m venv /tmp/v && /tmp/v/bin/pip install rdata==1.1.0
    apt-get update && (cd /tmp && apt-get download r-cran-janeaustenr=1.0.0-1)
    /tmp/v/bin/python minillm/resources/make_austen.py --deb /tmp/r-cran-janeaustenr_1.0.0-1_all.deb \\
        --out minillm/resources/austen

Without --deb the script runs `apt-get download r-cran-janeaustenr=<--version>` in a temporary directory itself.
It needs `dpkg-deb` (Debian/Ubuntu). The .deb is checked against the SHA-256 of the 1.0.0-1 build used for the
committed files; pass --any-deb to accept another build.

Tested with Python 3.11.7, rdata 1.1.0 (numpy 2.4.6), Debian bookworm.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import struct
import subprocess
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

PACKAGE = "r-cran-janeaustenr"
DEB_VERSION = "1.0.0-1"
DEB_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"  # r-cran-janeaustenr_1.0.0-1_all.deb
RDATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"
NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def download_deb(workdir: Path, version: str) -> Path:
    subprocess.run(["apt-get", "download", f"{PACKAGE}={version}"], cwd=workdir, check=True)
    debs = sorted(workdir.glob(f"{PACKAGE}_*.deb"))
    if len(debs) != 1:
        sys.exit(f"expected one {PACKAGE} .deb in {workdir}, found {debs}")
    return debs[0]


def parse_r(raw: bytes):
    try:
        import rdata
    except ImportError:
        sys.exit("the `rdata` package is required: python3 -m venv /tmp/v && /tmp/v/bin/pip install rdata==1.1.0, "
                 "then run this script with /tmp/v/bin/python")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS" for the headerless lazy-load entries
        return rdata.conversion.convert(rdata.parser.parse_data(raw))


def read_novels(root: Path) -> dict[str, str]:
    base = root / RDATA
    index = parse_r(gzip.decompress(base.with_suffix(".rdx").read_bytes()))
    rdb = base.with_suffix(".rdb").read_bytes()
    variables = {str(k): v for k, v in index["variables"].items()}
    if sorted(variables) != sorted(NOVELS):
        sys.exit(f"unexpected variables in {base}.rdx: {sorted(variables)}")
    novels = {}
    for name in NOVELS:
        off, length = (int(x) for x in variables[name])
        blob = rdb[off:off + length]
        (n_raw,) = struct.unpack(">I", blob[:4])
        raw = zlib.decompress(blob[4:])
        if len(raw) != n_raw:
            sys.exit(f"{name}: length header {n_raw} != decompressed size {len(raw)}")
        lines = parse_r(raw)
        if not all(isinstance(x, str) for x in lines):  # numpy str_ is a str; NA would come back as None/float
            sys.exit(f"{name}: non-string element in the R vector")
        novels[name] = "\n".join(str(x) for x in lines)
    return novels


def gzip_bytes(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=buf, mtime=0) as f:
        f.write(data)
    return buf.getvalue()


def main() -> None:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deb", type=Path, help=f"path to {PACKAGE}_{DEB_VERSION}_all.deb (default: apt-get download it)")
    ap.add_argument("--out", type=Path, default=here / "austen", help="output folder (default: minillm/resources/austen)")
    ap.add_argument("--version", default=DEB_VERSION, help="Debian version to apt-get download (default: %(default)s)")
    ap.add_argument("--any-deb", action="store_true", help="do not insist on the SHA-256 of the 1.0.0-1 .deb")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="janeaustenr-") as tmp:
        tmp = Path(tmp)
        deb = args.deb.resolve() if args.deb else download_deb(tmp, args.version)
        digest = sha256_bytes(deb.read_bytes())
        print(f"deb: {deb.name}  sha256 {digest}")
        if digest != DEB_SHA256 and not args.any_deb:
            sys.exit(f"{deb} is not the {DEB_VERSION} build the committed files came from (sha256 {DEB_SHA256}); "
                     f"use --any-deb to convert it anyway")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "x")], check=True)
        novels = read_novels(tmp / "x")

    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{'novel':18s} {'lines':>6s} {'chars':>8s} {'words':>7s} {'gz bytes':>9s}  sha256(text)")
    for name, text in novels.items():
        raw = text.encode("utf-8")
        gz = gzip_bytes(raw)
        path = args.out / f"{name}.txt.gz"
        tmp_path = path.with_suffix(".gz.tmp")
        tmp_path.write_bytes(gz)
        os.replace(tmp_path, path)
        print(f"{name:18s} {text.count(chr(10)) + 1:6d} {len(text):8d} {len(text.split()):7d} {len(gz):9d}  "
              f"{sha256_bytes(raw)}")


if __name__ == "__main__":
    main()
