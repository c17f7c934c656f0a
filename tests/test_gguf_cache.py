"""The cache of unpacked GGUF files (spoctl/gguf_cache.py): keyed by content, made once, rebuilt when damaged, off
on request, never in the way when it cannot be written; and (real) what it returns is what the GGUF file gives."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest

from spoctl import gguf_cache
from spoctl.errors import UsageError
from spoctl.rundir import cache_home


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SPOCTL_CACHE", str(root))
    return root


class Counting:
    """build/save/load/direct of a fake part: `save` writes one file holding what `build` returned."""

    def __init__(self, payload: str = "weights") -> None:
        self.payload, self.made, self.loaded, self.direct_calls = payload, 0, 0, 0

    def build(self) -> str:
        self.made += 1
        return self.payload

    def save(self, obj: str, folder: Path) -> None:
        (folder / "model.safetensors").write_text(obj)

    def load(self, folder: Path) -> str:
        self.loaded += 1
        text = (folder / "model.safetensors").read_text()
        if text != self.payload:
            raise ValueError("unexpected contents")
        return text

    def direct(self) -> str:
        self.direct_calls += 1
        return "direct"

    def __call__(self, gguf: Path, part: str = "model") -> str:
        return gguf_cache.load_through_cache(gguf, part, build=self.build, save=self.save, load=self.load,
                                             direct=self.direct)


def fake_gguf(tmp_path: Path, content: bytes = b"GGUF fake") -> Path:
    path = tmp_path / "m.gguf"
    path.write_bytes(content)
    return path


def test_made_once_then_read(cache, tmp_path):
    gguf, calls = fake_gguf(tmp_path), Counting()
    assert calls(gguf) == "weights" and calls(gguf) == "weights"
    assert (calls.made, calls.loaded, calls.direct_calls) == (1, 2, 0)
    import transformers

    (entry,) = (cache / "gguf").iterdir()
    assert entry.name.endswith(f"-transformers-{transformers.__version__}-v{gguf_cache.FORMAT}")
    info = json.loads((entry / "model" / "part.json").read_text())
    assert info["files"] == {"model.safetensors": len("weights")} and info["source"] == str(gguf.resolve())
    assert not [p for p in entry.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_keyed_by_content_not_by_name(cache, tmp_path):
    a = fake_gguf(tmp_path, b"one")
    first = gguf_cache.entry_dir(a)
    a.write_bytes(b"two")  # same path, new contents: another entry
    os.utime(a, ns=(1, 1))
    assert gguf_cache.entry_dir(a) != first
    b = tmp_path / "copy.gguf"
    b.write_bytes(b"two")  # another path, same contents: the same entry
    assert gguf_cache.entry_dir(b) == gguf_cache.entry_dir(a)


def test_off(monkeypatch, tmp_path):
    monkeypatch.setenv("SPOCTL_CACHE", "off")
    calls = Counting()
    assert calls(fake_gguf(tmp_path)) == "direct" and calls.made == 0
    assert gguf_cache.entry_dir(tmp_path / "m.gguf") is None


def test_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("SPOCTL_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_home() == tmp_path / "a"
    monkeypatch.delenv("SPOCTL_CACHE")
    assert cache_home() == tmp_path / "xdg" / "spoctl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_home() == tmp_path / "home" / ".cache" / "spoctl"


@pytest.mark.parametrize("damage", ["truncate", "delete", "no-part-info", "unloadable"])
def test_damaged_part_is_made_again(cache, tmp_path, damage):
    gguf, calls = fake_gguf(tmp_path), Counting()
    calls(gguf)
    part = gguf_cache.entry_dir(gguf) / "model"
    if damage == "truncate":
        (part / "model.safetensors").write_text("weig")
    elif damage == "delete":
        (part / "model.safetensors").unlink()
    elif damage == "no-part-info":  # e.g. a folder left by something else
        (part / "part.json").unlink()
    else:  # the right size, wrong bytes: only loading finds it
        (part / "model.safetensors").write_text("WEIGHTS")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert calls(gguf) == "weights"
    assert calls.made == 2 and calls.direct_calls == 0
    assert (part / "model.safetensors").read_text() == "weights"
    if damage == "unloadable":
        assert any("does not load" in str(w.message) and "unpacking the GGUF file again" in str(w.message)
                   for w in caught)


def test_a_part_that_never_loads_raises(cache, tmp_path):
    gguf, calls = fake_gguf(tmp_path), Counting()
    calls.load = lambda folder: (_ for _ in ()).throw(ValueError("bad config"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="bad config"):
            calls(gguf)
    assert calls.made == 2  # made again once, then the error is the caller's


@pytest.mark.parametrize("error", [RuntimeError, UsageError])  # UsageError: e.g. a model spoctl refuses
def test_a_file_that_does_not_unpack_is_the_callers_error(cache, tmp_path, error):
    import gguf as gguf_package

    before = (gguf_package.GGUFReader, gguf_package.get_tensor_name_map)
    gguf, calls = fake_gguf(tmp_path), Counting()
    calls.build = lambda: (_ for _ in ()).throw(error("not a GGUF file"))
    with pytest.raises(error, match="not a GGUF file"):
        calls(gguf)
    assert calls.direct_calls == 0 and list(gguf_cache.entry_dir(gguf).iterdir()) == []
    # the unpacking's shared parse (gguf_cache._parsed_once) is undone when the unpacking fails
    assert (gguf_package.GGUFReader, gguf_package.get_tensor_name_map) == before


def test_a_failed_write_leaves_nothing_and_falls_back(cache, tmp_path):
    gguf, calls = fake_gguf(tmp_path), Counting()

    def save(obj: str, folder: Path) -> None:
        (folder / "model.safetensors").write_text("half")
        raise OSError(28, "No space left on device")

    calls.save = save
    with pytest.warns(RuntimeWarning, match="could not cache the unpacked m.gguf .*No space left"):
        assert calls(gguf) == "direct"
    assert list(gguf_cache.entry_dir(gguf).iterdir()) == []  # no temporary folder, no half part


def test_another_process_made_it_meanwhile(cache, tmp_path):
    """Two processes unpacking the same file at once: the second rename finds the first's part, which serves."""
    gguf, calls, theirs = fake_gguf(tmp_path), Counting(), Counting()
    build = calls.build

    def racing_build() -> str:
        theirs(gguf)  # the other process finishes first
        return build()

    calls.build = racing_build
    assert calls(gguf) == "weights"
    assert theirs.made == 1 and calls.made == 1 and calls.loaded == 1
    entry = gguf_cache.entry_dir(gguf)
    assert [p.name for p in entry.iterdir()] == ["model"]  # our copy was discarded, nothing half-written left


def test_unwritable_cache_falls_back_to_the_file(monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("SPOCTL_CACHE", str(blocker / "cache"))  # a file where a folder must go: mkdir fails
    calls = Counting()
    with pytest.warns(RuntimeWarning, match="could not cache the unpacked m.gguf .* SPOCTL_CACHE"):
        assert calls(fake_gguf(tmp_path)) == "direct"
    assert calls.direct_calls == 1 and calls.loaded == 0 and calls.made == 0  # nothing unpacked in vain


@pytest.mark.real
def test_smollm2_through_the_cache_is_the_gguf_file(smollm2_gguf, tmp_path, monkeypatch):
    """Config, tokenizer and weights read back from the cache equal those transformers made of the GGUF file (the
    objects it saved into the cache: a direct load, without loading the file twice), and a warm load does not read
    the GGUF file at all. Each part is unpacked from one parse of the file and one tensor-name table
    (gguf_cache._parsed_once), and the weights made so are the file's."""
    import gguf
    import torch
    import transformers
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from spoctl.models import load_causal_lm, load_tokenizer, model_config, tokenizer_identity

    unpacked = {}
    for cls in (transformers.PretrainedConfig, transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase):
        def spy(self, folder, *args, _original=cls.save_pretrained, **kwargs):
            # The part's temporary folder is .<part>.<random>.tmp; the first object saved into it is the part's
            # (a model's save_pretrained then saves its config there too).
            unpacked.setdefault(Path(folder).name.split(".")[1], self)
            return _original(self, folder, *args, **kwargs)

        monkeypatch.setattr(cls, "save_pretrained", spy)
    parses, tables, before = [], [], (gguf.GGUFReader, gguf.get_tensor_name_map)
    for cls, seen in ((gguf.GGUFReader, parses), (gguf.TensorNameMap, tables)):
        def counted(self, *args, _original=cls.__init__, _seen=seen, **kwargs):
            _seen.append(args)
            _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", counted)
    spec = str(smollm2_gguf)
    monkeypatch.setenv("SPOCTL_CACHE", str(tmp_path / "cache"))
    cold = (model_config(spec), load_tokenizer(spec), load_causal_lm(spec))
    assert unpacked.keys() == {"config", "tokenizer", "model"}
    # One parse a part (transformers alone: 4, the model's config and weights each) and one tensor-name table
    # (transformers alone: one per submodule, 397), then gguf's own functions again.
    assert len(parses) == 3 and len(tables) == 1, (parses, len(tables))
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == before
    direct = (unpacked["config"], unpacked["tokenizer"], unpacked["model"])
    # The weights made through the shared parse and table are the file's: dequantised here from a parse of its own,
    # under the names the table gives them (none of these three is permuted on the way).
    own_parse = {t.name: t for t in gguf.GGUFReader(str(smollm2_gguf)).tensors}
    made = direct[2].state_dict()
    for ours, theirs in (("token_embd.weight", "model.embed_tokens.weight"),
                         ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
                         ("blk.29.attn_v.weight", "model.layers.29.self_attn.v_proj.weight")):
        values = gguf.dequantize(own_parse[ours].data, own_parse[ours].tensor_type)
        assert torch.equal(torch.from_numpy(values.copy()).reshape(made[theirs].shape), made[theirs]), theirs

    def no_gguf(*args, **kwargs):
        raise AssertionError("a warm load read the GGUF file")

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", no_gguf)
    warm = (model_config(spec), load_tokenizer(spec), load_causal_lm(spec))
    chat = [{"role": "user", "content": "Is it safe? ünï"}, {"role": "assistant", "content": "Yes.<|im_end|>"}]
    for config, tok, model in (cold, warm):
        assert config.to_dict() == direct[0].to_dict()
        assert tokenizer_identity(tok, spec) == tokenizer_identity(direct[1], spec)
        assert tok.apply_chat_template(chat, tokenize=True) == direct[1].apply_chat_template(chat, tokenize=True)
        assert tok.pad_token_id == direct[1].pad_token_id and tok.name_or_path == direct[1].name_or_path
        ours, theirs = model.state_dict(), direct[2].state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
        assert model.name_or_path == direct[2].name_or_path and model.generation_config == direct[2].generation_config
        assert getattr(model, "hf_quantizer", None) is None  # a plain float model, as load_causal_lm promises
