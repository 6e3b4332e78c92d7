"""Atomic writes: a failed write leaves the previous file whole and no stray temporary file behind the target."""

import pytest
import torch

from cfo.atomic import torch_save_atomically, write_text_atomically


def test_a_failed_torch_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch_save_atomically({"step": 1, "w": torch.ones(3)}, path)
    with pytest.raises(Exception):
        torch_save_atomically({"step": 2, "bad": lambda: None}, path)  # a lambda cannot be pickled
    saved = torch.load(path, weights_only=False)
    assert saved["step"] == 1 and torch.equal(saved["w"], torch.ones(3))
    torch_save_atomically({"step": 3}, path)
    assert torch.load(path, weights_only=False)["step"] == 3 and not (tmp_path / "checkpoint.pt.tmp").exists()


def test_text_is_replaced_whole(tmp_path):
    path = write_text_atomically(tmp_path / "history.json", '{"a": 1}')
    write_text_atomically(path, '{"a": 2}')
    assert path.read_text() == '{"a": 2}' and sorted(p.name for p in tmp_path.iterdir()) == ["history.json"]
