"""Reader and writer against the safetensors library itself, and .bin inputs."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergeforge.checkpoint.reader import open_checkpoint
from mergeforge.checkpoint.writer import save_state_dict
from mergeforge.errors import CheckpointError


def sample_state() -> dict[str, torch.Tensor]:
    """Six dtypes, with values made by exact IEEE operations (no random draws), so the bytes are
    the same with any torch."""
    return {
        "model.layers.0.w": (torch.arange(15, dtype=torch.float32).reshape(5, 3) / 7).bfloat16(),
        "model.layers.1.w": torch.tensor([-1.0, -0.375, 0.125, 2.5]),
        "model.ids": torch.arange(7),
        "model.flag": torch.tensor([True, False]),
        "model.half": (torch.arange(4, dtype=torch.float32).reshape(2, 2) / 3).half(),
        "model.scalar": torch.tensor(3.0, dtype=torch.float64),
    }


# sha256 of ``sample_state`` written by our writer: the layout (tensor order by dtype then name,
# header padding, offsets) must not change silently between releases.
SAMPLE_SHA256 = "136191c586baa3fd2a0f3046d01efd5b5e13f636d10bd3956705d0c03f6f9ca3"


def test_writer_bytes_are_pinned_and_equal_the_safetensors_librarys(tmp_path):
    state = sample_state()
    save_state_dict(state, tmp_path)
    ours = (tmp_path / "model.safetensors").read_bytes()
    assert hashlib.sha256(ours).hexdigest() == SAMPLE_SHA256
    assert ours[:8] == (440).to_bytes(8, "little") and ours[8:40] == b'{"__metadata__":{"format":"pt"},'
    save_file(state, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    assert ours == (tmp_path / "reference.safetensors").read_bytes()


def test_reader_round_trip_rows_and_shards(tmp_path):
    state = sample_state()
    save_state_dict(state, tmp_path, max_shard_bytes=40)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    with open_checkpoint(tmp_path) as checkpoint:
        for name, tensor in state.items():
            assert torch.equal(checkpoint.read(name), tensor)
            assert checkpoint.info(name).shape == tuple(tensor.shape)
        assert torch.equal(checkpoint.read("model.layers.0.w", 1, 4), state["model.layers.0.w"][1:4])
        with pytest.raises(CheckpointError, match="tensor 'nope' not found"):
            checkpoint.read("nope")
    loaded = {}
    for file in sorted(tmp_path.glob("model-*.safetensors")):
        loaded.update(load_file(file))
    assert loaded.keys() == state.keys()


def test_bin_checkpoint(tmp_path):
    state = sample_state()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with open_checkpoint(tmp_path) as checkpoint:
        assert set(checkpoint.names()) == set(state)
        assert torch.equal(checkpoint.read("model.layers.0.w"), state["model.layers.0.w"])


def test_bin_with_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        open_checkpoint(tmp_path)


def test_sharded_index_naming_missing_shard(tmp_path):
    save_state_dict(sample_state(), tmp_path, max_shard_bytes=40)
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="lists shard 'model-00002"):
        open_checkpoint(tmp_path)
