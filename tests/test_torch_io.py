"""torch_io: torch.save / safetensors files read without torch, and weight files that lie.

The reader is checked against files torch itself writes (nested dicts of state
dicts, strided views, every common dtype), against a pickle that would run a
command (it must not), and every teacher-weight loader against files that are
not what their suffix says: each gives one line naming the file and what was
expected.
"""

from __future__ import annotations

import collections
import os
import pickle
import re
import sys
import zipfile

import numpy as np
import pytest
import torch_oracle

from skrd4ad_jax import teachers, torch_io
from skrd4ad_jax.teachers import porting

torch, _, TORCH_REASON = torch_oracle.import_torch()
needs_torch = pytest.mark.skipif(torch is None, reason=TORCH_REASON)


def _numpy(t):
  """A torch tensor as the reader should return it (bfloat16 widened to float32)."""
  t = t.detach()
  return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _assert_same(read, saved):
  if isinstance(saved, torch.Tensor):
    expected = _numpy(saved)
    assert isinstance(read, np.ndarray)
    assert read.dtype == expected.dtype and read.shape == expected.shape
    np.testing.assert_array_equal(read, expected)
  elif isinstance(saved, dict):
    assert type(read) is type(saved) and list(read) == list(saved)
    for k in saved:
      _assert_same(read[k], saved[k])
  elif isinstance(saved, (list, tuple)):
    assert len(read) == len(saved)
    for a, b in zip(read, saved):
      _assert_same(a, b)
  else:
    assert read == saved


def _saved_object():
  """Nested state dicts, strided views and every common dtype, as torch saves them."""
  torch.manual_seed(0)
  base = torch.randn(6, 8)
  model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
  return {
    "bn": model.state_dict(),  # an OrderedDict with int64 num_batches_tracked
    "decoder": collections.OrderedDict(
      transposed=base.t(),  # non-contiguous
      every_other=base[:, ::2],  # strided
      rows=base[2:5],  # storage offset, shared storage
      nchw=torch.randn(2, 3, 4, 5).permute(0, 2, 3, 1),
    ),
    "half": torch.randn(3, 4).half(),
    "bfloat16": torch.randn(5, 2).bfloat16(),
    "int64": torch.arange(7),
    "uint8": torch.arange(5, dtype=torch.uint8),
    "bool": torch.tensor([True, False, True]),
    "float64": torch.randn(2, dtype=torch.float64),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 3),
    "parameter": torch.nn.Parameter(torch.ones(2, 2)),
    "epoch": 7,
    "names": ["a", "b"],
    "pair": (torch.ones(1), 0.5),
  }


@needs_torch
def test_reads_what_torch_save_writes(tmp_path):
  saved = _saved_object()
  saved["uint16"] = torch.tensor([1, 600, 65535], dtype=torch.int32).to(torch.uint16)  # v3
  torch.save(saved, tmp_path / "ckpt.pth")
  _assert_same(torch_io.read_pth(tmp_path / "ckpt.pth"), saved)

  flat = torch_io.flatten_tensors(torch_io.load(tmp_path / "ckpt.pth"))
  assert "bn.0.weight" in flat and "decoder.every_other" in flat and "epoch" not in flat
  np.testing.assert_array_equal(flat["bn.1.running_var"], saved["bn"]["1.running_var"].numpy())


@needs_torch
def test_reads_the_legacy_format(tmp_path):
  """torch < 1.6's stream of pickles (torchvision's wide_resnet50_2-95faca4d.pth)."""
  saved = _saved_object()
  torch.save(saved, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
  assert not zipfile.is_zipfile(tmp_path / "old.pth")
  _assert_same(torch_io.read_pth(tmp_path / "old.pth"), saved)

  blob = (tmp_path / "old.pth").read_bytes()
  (tmp_path / "cut.pth").write_bytes(blob[:-20])
  with pytest.raises(torch_io.CheckpointFormatError, match=r"cut\.pth: storage .* cut short"):
    torch_io.read_pth(tmp_path / "cut.pth")
  (tmp_path / "cut.pth").write_bytes(blob[:200])
  with pytest.raises(torch_io.CheckpointFormatError, match=r"cut\.pth: damaged or truncated"):
    torch_io.read_pth(tmp_path / "cut.pth")


def test_a_plain_pickle_is_not_a_checkpoint(tmp_path):
  (tmp_path / "p.pth").write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=2))
  with pytest.raises(torch_io.CheckpointFormatError, match=r"p\.pth: a pickle file, not a PyTorch"):
    torch_io.read_pth(tmp_path / "p.pth")


@needs_torch
def test_reads_safetensors_with_bfloat16(tmp_path):
  import safetensors.torch

  saved = {
    "w": torch.randn(3, 4),
    "b": torch.randn(5).bfloat16(),
    "h": torch.randn(2).half(),
    "i": torch.arange(4),
  }
  safetensors.torch.save_file(saved, str(tmp_path / "w.safetensors"))
  read = torch_io.load(tmp_path / "w.safetensors")
  assert sorted(read) == sorted(saved)
  for k in saved:
    _assert_same(read[k], saved[k])


class _RunsACommand:
  """Pickles to ``os.system('touch <marker>')``."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


@needs_torch
def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
  marker = tmp_path / "pwned"
  torch.save({"weight": torch.ones(2), "payload": _RunsACommand(marker)}, tmp_path / "evil.pth")
  with pytest.raises(torch_io.CheckpointFormatError, match=r"evil\.pth: refuses .*'posix\.system'"):
    torch_io.read_pth(tmp_path / "evil.pth")
  assert not marker.exists()
  # The same file as teacher weights: the same refusal, through the teacher loader.
  with pytest.raises(ValueError, match=r"evil\.pth: refuses"):
    teachers.load_teacher_variables("resnet18", str(tmp_path / "evil.pth"))
  assert not marker.exists()


@needs_torch
def test_whole_model_and_torchscript_are_refused(tmp_path):
  conv = torch.nn.Conv2d(1, 1, 1)
  torch.save(conv, tmp_path / "model.pth")
  with pytest.raises(torch_io.CheckpointFormatError, match=r"model\.pth: .*Conv2d"):
    torch_io.read_pth(tmp_path / "model.pth")
  torch.jit.save(torch.jit.script(conv), str(tmp_path / "script.pth"))
  with pytest.raises(torch_io.CheckpointFormatError, match=r"script\.pth: .*state_dict\(\)"):
    torch_io.read_pth(tmp_path / "script.pth")


@needs_torch
def test_damaged_pth(tmp_path):
  torch.save({"w": torch.randn(64, 64)}, tmp_path / "w.pth")
  blob = (tmp_path / "w.pth").read_bytes()
  (tmp_path / "truncated.pth").write_bytes(blob[: len(blob) // 2])
  with pytest.raises(torch_io.CheckpointFormatError, match=r"truncated\.pth: damaged or truncated"):
    torch_io.read_pth(tmp_path / "truncated.pth")
  # A storage member removed: the tensor cannot be built.
  with (
    zipfile.ZipFile(tmp_path / "w.pth") as src,
    zipfile.ZipFile(tmp_path / "gap.pth", "w") as dst,
  ):
    for item in src.infolist():
      if not item.filename.endswith("/data/0"):
        dst.writestr(item, src.read(item))
  with pytest.raises(
    torch_io.CheckpointFormatError, match=r"gap\.pth: storage .*data/0' is missing"
  ):
    torch_io.read_pth(tmp_path / "gap.pth")


def test_damaged_safetensors(tmp_path):
  from safetensors.numpy import save_file

  save_file({"w": np.ones((4, 4), np.float32)}, str(tmp_path / "w.safetensors"))
  blob = (tmp_path / "w.safetensors").read_bytes()
  (tmp_path / "cut.safetensors").write_bytes(blob[:-8])
  with pytest.raises(
    torch_io.CheckpointFormatError, match=r"cut\.safetensors: .*'w'.*does not fit"
  ):
    torch_io.read_safetensors(tmp_path / "cut.safetensors")


# ----------------------------------------------------------------------------- teacher weights


@pytest.mark.parametrize(
  "name, expected",
  [
    ("text.pth", r"text\.pth: not a PyTorch checkpoint \(expected the archive torch\.save"),
    ("text.pt", r"text\.pt: not a PyTorch checkpoint"),
    ("text.safetensors", r"text\.safetensors: not a readable \.safetensors file"),
    ("text.npz", r"text\.npz: not a readable \.npz archive \(expected the project's \.npz"),
    ("text.h5", r"text\.h5: not readable .*expected HED's keras weights"),
  ],
)
def test_text_file_with_a_weights_suffix(tmp_path, name, expected):
  path = tmp_path / name
  path.write_text("these are not weights\n")
  arch = "vgg16_hed" if name.endswith(".h5") else "resnet18"
  with pytest.raises(ValueError, match=expected) as info:
    teachers.load_teacher_variables(arch, str(path))
  assert "\n" not in str(info.value)


def _resnet18_npz(tmp_path):
  variables = teachers.load_teacher_variables("resnet18", "random", image_size=32, seed=0)
  return porting.save_teacher_variables(tmp_path / "r18.npz", variables, "resnet18")


def test_truncated_npz(tmp_path):
  path = _resnet18_npz(tmp_path)
  blob = path.read_bytes()
  for cut, name in ((len(blob) // 2, "half.npz"), (len(blob) - 10, "tail.npz")):
    (tmp_path / name).write_bytes(blob[:cut])
    with pytest.raises(ValueError, match=re.escape(name) + ": (not a readable|damaged)"):
      teachers.load_teacher_variables("resnet18", str(tmp_path / name))


def test_npz_with_object_arrays_is_not_unpickled(tmp_path):
  flat = dict(np.load(_resnet18_npz(tmp_path)))
  flat["params/bn1/bias"] = np.array([{"code": "would run on unpickling"}], object)
  np.savez(tmp_path / "obj.npz", **flat)
  with pytest.raises(ValueError, match=r"obj\.npz: damaged or unreadable \.npz") as info:
    teachers.load_teacher_variables("resnet18", str(tmp_path / "obj.npz"))
  assert "allow_pickle=True" not in str(info.value)


@needs_torch
def test_pth_without_a_state_dict(tmp_path):
  torch.save([torch.ones(2)], tmp_path / "list.pth")
  with pytest.raises(ValueError, match=r"list\.pth: holds a list, expected a state dict"):
    teachers.load_teacher_variables("resnet18", str(tmp_path / "list.pth"))


@needs_torch
def test_teacher_pth_read_without_torch_matches_torch(tmp_path, monkeypatch):
  model = torch_oracle.import_torch()[1].models.resnet18(weights=None)
  torch.save({"state_dict": model.state_dict()}, tmp_path / "wrapped.pth")
  # torchvision's wide_resnet50_2-95faca4d.pth is in the legacy format.
  torch.save(model.state_dict(), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
  # The library must not import torch to read them.
  monkeypatch.setitem(sys.modules, "torch", None)
  states = [porting.read_state_dict(tmp_path / n) for n in ("wrapped.pth", "legacy.pth")]
  monkeypatch.undo()
  for state in states:
    assert state.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
      np.testing.assert_array_equal(state[k], v.numpy())
