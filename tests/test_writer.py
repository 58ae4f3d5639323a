"""The sharded writer: layout fixed before the first byte, tensors written in any order, in pieces
or whole, from torch tensors or raw bytes, and a record of what is still missing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mergeforge.checkpoint.writer import OutputTensor, ShardedWriter, split_into_shards


def tensors() -> list[OutputTensor]:
    return [OutputTensor("a", (4, 3), "F32"), OutputTensor("b", (5,), "BF16"), OutputTensor("c", (2, 2), "I64"),
            OutputTensor("d", (10, 10), "F32")]


def test_shards_are_greedy_in_plan_order_and_a_large_tensor_gets_its_own():
    shards = split_into_shards(tensors(), 60)
    assert [[t.name for t in shard] for shard in shards] == [["a", "b"], ["c"], ["d"]]
    assert split_into_shards([], 10) == []


def test_pieces_written_in_any_order_from_any_source_make_the_files_the_library_reads(tmp_path):
    writer = ShardedWriter(tmp_path, tensors(), max_shard_bytes=60)
    d = torch.arange(100, dtype=torch.float32).reshape(10, 10)
    writer.write("d", d[6:], row_start=6)  # rows, out of order
    writer.write("d", d[:6], row_start=0)
    writer.mark_written("d")
    b = np.arange(5, dtype=np.uint16) + 0x3F80  # bf16 bit patterns of 1.0, 1.0078125, ...
    writer.write_bytes("b", b[:2].tobytes())
    writer.write_bytes("b", b[2:].tobytes(), byte_start=4, complete=True)
    assert sorted(writer.missing()) == ["a", "c"]
    writer.write("c", torch.tensor([[1, 2], [3, 4]]))
    writer.write("a", torch.ones(4, 3))
    assert writer.missing() == []
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"a": "model-00001-of-00003.safetensors", "b": "model-00001-of-00003.safetensors",
                                   "c": "model-00002-of-00003.safetensors", "d": "model-00003-of-00003.safetensors"}
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors())
    state = {}
    for file in sorted(tmp_path.glob("model-*.safetensors")):
        state.update(load_file(file))
    assert torch.equal(state["d"], d) and torch.equal(state["a"], torch.ones(4, 3))
    np.testing.assert_array_equal(state["b"].view(torch.int16).numpy().view(np.uint16), b)
    assert torch.equal(state["c"], torch.tensor([[1, 2], [3, 4]]))


def test_a_wrong_dtype_shape_or_overrun_is_refused(tmp_path):
    writer = ShardedWriter(tmp_path, tensors())
    try:
        with pytest.raises(ValueError, match="a: expected dtype F32, got torch.float64"):
            writer.write("a", torch.ones(4, 3, dtype=torch.float64))
        with pytest.raises(ValueError, match=r"a: expected shape \(4, 3\), got \(4, 2\)"):
            writer.write("a", torch.ones(4, 2))
        with pytest.raises(ValueError, match="b: 12 bytes at 0 run past its 10 bytes"):
            writer.write_bytes("b", bytes(12))
    finally:
        writer.close()
