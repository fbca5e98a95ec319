"""Fixture PDFs generated on the fly (nothing binary is committed)."""

from __future__ import annotations

import io
from pathlib import Path

from fpdf import FPDF
from PIL import Image
from pypdf import PdfWriter

WORDS = ("agreement party term payment notice clause liability licence warranty breach schedule "
         "termination confidential supplier customer invoice").split()


def page_text(number: int) -> str:
    words = " ".join(WORDS[(number * 7 + i) % len(WORDS)] for i in range(60))
    return f"{number}.1 Clause {number} applies to amount {number * 1000 + 37}.\n{words}"


def make_text_pdf(path: Path, n_pages: int = 3, header: str = "ACME Ltd - Master Services Agreement") -> Path:
    pdf = FPDF()
    pdf.set_font("Helvetica", size=10)
    pdf.set_auto_page_break(False)
    for number in range(1, n_pages + 1):
        pdf.add_page()
        pdf.cell(0, 8, header, new_x="LMARGIN", new_y="NEXT")
        pdf.multi_cell(0, 6, page_text(number))
        pdf.set_y(-20)
        pdf.cell(0, 8, f"Page {number} of {n_pages}")
    pdf.output(str(path))
    return path


def make_image_pdf(path: Path, n_pages: int = 2) -> Path:
    """Pages that are only a raster picture, like a scan without OCR."""
    image = Image.new("RGB", (200, 100), "white")
    for x in range(20, 180):
        image.putpixel((x, 50), (0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    pdf = FPDF()
    for _ in range(n_pages):
        pdf.add_page()
        buffer.seek(0)
        pdf.image(buffer, x=10, y=10, w=180)
    pdf.output(str(path))
    return path


def make_encrypted_pdf(source: Path, path: Path, user_password: str, algorithm: str = "AES-256") -> Path:
    writer = PdfWriter(clone_from=str(source))
    writer.encrypt(user_password=user_password, owner_password="owner-secret", algorithm=algorithm)
    writer.write(str(path))
    return path


def make_corrupt_pdf(source: Path, path: Path) -> Path:
    """The first 300 bytes of a real PDF: a valid header, then nothing usable."""
    path.write_bytes(source.read_bytes()[:300])
    return path


def make_deflate_bomb_pdf(path: Path, decompressed_bytes: int = 1 << 30) -> Path:
    """One page whose content stream inflates to `decompressed_bytes` of blanks (a few hundred KB on
    disk for 1 GB): the classic decompression bomb."""
    import zlib

    packer = zlib.compressobj(9)
    block = b" " * (1 << 20)
    stream = b"".join(packer.compress(block) for _ in range(decompressed_bytes // len(block))) + packer.flush()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(bytes(out))
    return path
