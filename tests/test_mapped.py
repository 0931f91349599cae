"""Memory-mapped shards (activations/mapped.py) and the store's window that gathers batches from them."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmscope.activations import store as store_module
from lmscope.activations.format import CorruptShardError
from lmscope.activations.mapped import MappedShard
from lmscope.activations.store import ActivationStore
from lmscope.core.checksums import buffer_sha256, file_sha256


def _shard(path: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "acts": torch.randn(37, 5, generator=g),
        "half": torch.randn(37, 3, generator=g).half(),
        "bf": torch.randn(37, 2, generator=g).bfloat16(),
        "document": torch.arange(37, dtype=torch.int64),
        "tokens": torch.arange(37, dtype=torch.int32) * 3,
        "special": (torch.arange(37) % 5 == 0).to(torch.uint8),
        "empty": torch.zeros(0, 4),
    }
    save_file(tensors, str(path))
    return tensors


def test_views_equal_what_safetensors_reads_and_the_checksum_is_taken_from_the_map(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    written = _shard(path)
    names = list(written)
    mapped = MappedShard(path, names, sha256=file_sha256(path))
    loaded = load_file(str(path))
    for name in names:
        assert mapped.tensors[name].dtype == loaded[name].dtype and torch.equal(mapped.tensors[name], loaded[name])
    assert buffer_sha256(path.read_bytes()) == file_sha256(path)
    # views, not copies: two tensors lie as far apart in memory as in the file
    data = path.read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    apart = header["tokens"]["data_offsets"][0] - header["acts"]["data_offsets"][0]
    assert mapped.tensors["tokens"].data_ptr() - mapped.tensors["acts"].data_ptr() == apart


def test_a_misaligned_tensor_is_copied_and_still_read_right(tmp_path: Path) -> None:
    """safetensors aligns its data; a file that does not gets its misaligned tensors copied, not viewed."""
    values = torch.arange(6, dtype=torch.float32)
    header = {
        "flags": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "acts": {"dtype": "F32", "shape": [2, 3], "data_offsets": [3, 27]},
    }
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)  # the data starts 8-aligned, so `acts` sits at an odd address
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + bytes([1, 2, 3]) + values.numpy().tobytes())
    mapped = MappedShard(path, ["flags", "acts"])
    assert mapped.tensors["flags"].tolist() == [1, 2, 3]
    assert torch.equal(mapped.tensors["acts"], values.view(2, 3))
    assert mapped.tensors["acts"].data_ptr() % 4 == 0


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("checksum", "checksum does not match"),
        ("garbage", "not a readable safetensors"),
        ("header_too_long", "not a readable safetensors"),
        ("missing", "holds no tensor 'absent'"),
        ("offsets", "which the file does not hold"),
        ("empty", "the file is empty"),
    ],
)
def test_a_damaged_shard_is_refused_with_the_reason_and_the_fix(tmp_path: Path, damage: str, message: str) -> None:
    path = tmp_path / "s.safetensors"
    _shard(path)
    names, sha = ["acts", "special"], file_sha256(path)
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    if damage == "checksum":
        data[-3] ^= 0xFF
    elif damage == "garbage":
        data[8:16] = b"\x00\xff" * 4
        sha = None
    elif damage == "header_too_long":
        data[:8] = (len(data) * 2).to_bytes(8, "little")
        sha = None
    elif damage == "missing":
        names, sha = ["absent"], None
    elif damage == "offsets":
        header = json.loads(data[8 : 8 + n])
        header["acts"]["data_offsets"][1] += 4
        text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
        assert len(text) == n
        data[8 : 8 + n] = text
        sha = None
    elif damage == "empty":
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=message) as err:
        MappedShard(path, names, sha256=sha, fix="Run the fix.")
    assert "Run the fix." in str(err.value) and str(path) in str(err.value)


def _store(tmp_path: Path, shards: int = 5, rows: int = 40, width: int = 6) -> Path:
    """A minimal store in lmscope's on-disk format: `shards` shards of `rows` rows, row r of the whole store holding
    the value r in every column (so a batch tells which rows it got)."""
    from lmscope.activations.format import FORMAT, FORMAT_VERSION

    d = tmp_path / "acts"
    d.mkdir()
    entries = []
    for i in range(shards):
        first = i * rows
        rows_t = torch.arange(first, first + rows, dtype=torch.float32)
        special = (torch.arange(rows) % 7 == 0).to(torch.uint8)
        tensors = {
            "h": rows_t[:, None].expand(rows, width).contiguous(),
            "tokens": torch.arange(first, first + rows, dtype=torch.int32),
            "document": torch.zeros(rows, dtype=torch.int64),
            "position": torch.arange(rows, dtype=torch.int32),
            "special": special,
        }
        name = f"shard_{i:05d}.safetensors"
        save_file(tensors, str(d / name))
        kept = int((special == 0).sum())
        norms = float(tensors["h"][special == 0].double().norm(dim=-1).sum())
        entries.append({
            "file": name, "rows": rows, "rows_kept": kept, "bytes": (d / name).stat().st_size,
            "sha256": file_sha256(d / name), "norm_sum": {"h": norms}, "norm_sum_all": {"h": norms},
        })  # fmt: skip
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "hooks": ["h"], "dtype": "float32",
                "shards": entries, "complete": True}  # fmt: skip
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def test_the_window_hands_out_every_kept_row_once_with_few_maps_kept(tmp_path: Path, monkeypatch) -> None:
    d = _store(tmp_path)
    monkeypatch.setattr(store_module, "_MAPS_KEPT", 1)  # unmap as soon as the window no longer refers to a shard
    maps: list[int] = []
    real = ActivationStore._map

    def counting(self: ActivationStore, index: int, names: list[str]) -> MappedShard:
        maps.append(index)
        return real(self, index, names)

    monkeypatch.setattr(ActivationStore, "_map", counting)
    store = ActivationStore.open(d)
    expected = Counter(r for r in range(200) if r % 40 % 7)
    for seed in (0, 1):
        batches = list(store.batches(batch_size=16, buffer_mb=0.004, seed=seed, with_tokens=True))
        got = torch.cat([b["h"] for b in batches])
        assert Counter(got[:, 0].long().tolist()) == expected  # every kept row once, no special row
        assert torch.equal(got, got[:, :1].expand_as(got))  # whole rows, never mixed
        assert all(torch.equal(b["tokens"], b["h"][:, 0].long()) for b in batches)  # hooks and tokens: same rows
        assert got[:, 0].tolist() != sorted(got[:, 0].tolist())  # shuffled
    assert len(maps) > 5  # shards were unmapped and mapped again
    unshuffled = torch.cat([b["h"][:, 0] for b in store.batches(batch_size=16, shuffle=False, buffer_mb=0.004)])
    assert unshuffled.long().tolist() == sorted(expected.elements())


@pytest.mark.parametrize("native_on", ["1", "0"], ids=["c gather", "torch gather"])
def test_both_gathers_hand_out_the_same_batches(tmp_path: Path, monkeypatch, native_on: str) -> None:
    """The C row gather (core/native.py) and the torch one give identical batches in identical order."""
    d = _store(tmp_path)
    monkeypatch.setenv("LMSCOPE_NATIVE", "0")
    ref = list(ActivationStore.open(d).batches(batch_size=16, buffer_mb=0.004, seed=3, with_tokens=True))
    monkeypatch.setenv("LMSCOPE_NATIVE", native_on)
    got = list(ActivationStore.open(d).batches(batch_size=16, buffer_mb=0.004, seed=3, with_tokens=True))
    assert len(got) == len(ref)
    for a, b in zip(got, ref, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_a_corrupt_shard_mapped_beside_a_good_one_is_refused(tmp_path: Path) -> None:
    d = _store(tmp_path)
    bad = d / "shard_00003.safetensors"
    data = bytearray(bad.read_bytes())
    n = int.from_bytes(data[:8], "little")
    begin = json.loads(data[8 : 8 + n])["h"]["data_offsets"][0]
    data[8 + n + begin + 1] ^= 0x01  # one bit of an activation: only the checksum can tell
    bad.write_bytes(bytes(data))
    store = ActivationStore.open(d)
    with pytest.raises(CorruptShardError, match=r"shard_00003.safetensors.*corrupt.*lmscope verify"):
        for _ in store.batches(batch_size=16, buffer_mb=0.004):
            pass
    unchecked = ActivationStore.open(d, verify=False)  # verify=False reads it (the caller's choice)
    assert sum(len(b["h"]) for b in unchecked.batches(batch_size=16, buffer_mb=0.004)) == unchecked.n_rows
