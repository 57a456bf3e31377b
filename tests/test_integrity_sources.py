"""Nothing silently wrong with checkpoints and exports (issue 14): a checkpoint converted once is reused only
while its content is the same (a same-size same-mtime replacement is caught), tensors whose bytes overlap are
refused, a FIFO never hangs, an index names only files inside the checkpoint, and ``export coreml --overwrite``
replaces only what blockrt wrote. Each test fails on the code before these checks."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from blockrt import RunConfig, StoreError
from blockrt.partitioners import partition
from models import build_toy
from store_faults import checkpoint, output, refused_in_time, rewrite_header, stream

pytestmark = pytest.mark.timeout(60)


# -- a converted checkpoint reused by content, overlapping tensors (cases 6 and 7) ------------------------------


@pytest.mark.parametrize("how", ["cp -p", "rsync -t"])
def test_a_checkpoint_replaced_with_the_same_size_and_mtime_is_converted_again(tmp_path, how):
    ckpt = checkpoint(tmp_path / "ckpt", seed=0)
    config = RunConfig(storage_dtype="float16")
    first = stream(ckpt.parent, config)
    other = checkpoint(tmp_path / "other", seed=1)
    st = ckpt.stat()
    assert other.stat().st_size == st.st_size
    if how == "cp -p":  # the same inode rewritten, then the old times put back
        ckpt.write_bytes(other.read_bytes())
        os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:  # a new file with the old times, renamed over the old one
        os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(other, ckpt)
    assert (ckpt.stat().st_size, ckpt.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    expected = stream(checkpoint(tmp_path / "fresh", seed=1).parent, config)
    assert not torch.equal(expected, first)
    assert torch.equal(stream(ckpt.parent, config), expected)


def test_an_unchanged_checkpoint_is_not_hashed_and_a_touched_one_once(tmp_path, monkeypatch, blockrt_cache):
    ckpt = checkpoint(tmp_path / "ckpt")
    config = RunConfig(storage_dtype="float16")
    ref = stream(ckpt.parent, config)
    import blockrt.conversion

    hashed = []
    real = blockrt.conversion.fingerprint
    monkeypatch.setattr(blockrt.conversion, "fingerprint", lambda *a, **k: hashed.append(1) or real(*a, **k))
    assert torch.equal(stream(ckpt.parent, config), ref) and hashed == []  # the files' identity is unchanged
    os.utime(ckpt)  # touched: same bytes, new times
    for _ in range(2):
        assert torch.equal(stream(ckpt.parent, config), ref)
    assert hashed == [1] and len(list((blockrt_cache / "stores").iterdir())) == 1  # reused, identity refreshed


def test_a_bin_checkpoint_replaced_with_the_same_size_and_mtime_is_converted_again(tmp_path):
    from safetensors.torch import load_file

    from blockrt.pipelines.opensora.bin_checkpoint import convert_bin_checkpoint

    d = tmp_path / "bin"
    d.mkdir()
    torch.save({"w": torch.zeros(64, 64)}, d / "pytorch_model.bin")
    assert torch.equal(load_file(convert_bin_checkpoint(d) / "model.safetensors")["w"], torch.zeros(64, 64))
    st = (d / "pytorch_model.bin").stat()
    other = tmp_path / "other" / "pytorch_model.bin"  # the name goes into the zip: the same one
    other.parent.mkdir()
    torch.save({"w": torch.ones(64, 64)}, other)
    assert other.stat().st_size == st.st_size
    (d / "pytorch_model.bin").write_bytes(other.read_bytes())  # cp -p: other weights, the same size and mtime
    os.utime(d / "pytorch_model.bin", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert torch.equal(load_file(convert_bin_checkpoint(d) / "model.safetensors")["w"], torch.ones(64, 64))


def test_a_checkpoint_whose_tensors_overlap_is_refused(tmp_path):
    ckpt = checkpoint(tmp_path / "ckpt")

    def overlap(h):
        h["layers.2.ln1.bias"]["data_offsets"] = h["layers.2.ln1.weight"]["data_offsets"]

    rewrite_header(ckpt, overlap)
    with pytest.raises(Exception):
        with safe_open(str(ckpt), "pt"):  # the reference library refuses it too
            pass
    with pytest.raises(StoreError, match=r"'layers\.2\.ln1\.(weight|bias)'.*overlap") as e:
        stream(ckpt.parent)
    assert "fix:" in str(e.value)


# -- only regular files, inside their root (cases 11 and 12) -------------------------------------------------


def test_a_fifo_named_model_safetensors_is_refused_without_hanging(tmp_path):
    os.mkfifo(tmp_path / "model.safetensors")
    e = refused_in_time(tmp_path / "model.safetensors", lambda: stream(tmp_path))
    assert isinstance(e, StoreError) and "FIFO" in str(e) and "regular file" in str(e)


def shard(directory: Path) -> dict[str, str]:
    """The toy checkpoint as two shards in ``directory``; returns the weight map."""
    model, _ = build_toy(0)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k in partition(model).all_specs()}
    keys = sorted(tensors)
    directory.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for s, part in enumerate((keys[0::2], keys[1::2])):
        save_file({k: tensors[k] for k in part}, directory / f"model-{s + 1}.safetensors")
        weight_map.update(dict.fromkeys(part, f"model-{s + 1}.safetensors"))
    return weight_map


def write_index(path: Path, weight_map: dict[str, str]) -> None:
    path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("how", ["..", "absolute", "symlink"])
def test_index_paths_stay_inside_the_checkpoint(tmp_path, how):
    wm = shard(tmp_path / "elsewhere")
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(tmp_path / "elsewhere" / "model-1.safetensors", d / "model-1.safetensors")
    if how == "..":
        wm = {k: v.replace("model-2", "../elsewhere/model-2") for k, v in wm.items()}
    elif how == "absolute":
        far = str(tmp_path / "elsewhere" / "model-2.safetensors")
        wm = {k: v.replace("model-2.safetensors", far) for k, v in wm.items()}
    else:
        (d / "model-2.safetensors").symlink_to(tmp_path / "elsewhere" / "model-2.safetensors")
    write_index(d / "model.safetensors.index.json", wm)
    with pytest.raises(StoreError, match="model.safetensors.index.json.*(climbs out|absolute path|symbolic link)"):
        stream(d)


def test_a_hugging_face_cache_layout_of_symlinks_streams(tmp_path):
    """snapshots/<rev>/* are symlinks into ../../blobs, the index included: allowed (the index points there)."""
    blobs = tmp_path / "blobs"
    wm = shard(blobs)
    write_index(blobs / "index-blob", wm)
    snap = tmp_path / "snapshots" / "rev"
    snap.mkdir(parents=True)
    for name in ("model-1.safetensors", "model-2.safetensors"):
        (snap / name).symlink_to(Path("../../blobs") / name)
    (snap / "model.safetensors.index.json").symlink_to(Path("../../blobs/index-blob"))
    model, inputs = build_toy(0)
    assert torch.equal(stream(snap), output(model, inputs))


# -- export coreml --overwrite (case 8) ---------------------------------------------------------------------------


def previous_export(out: Path, packages: list[str]) -> None:
    """What an earlier ``export coreml`` left: its packages and its export.json listing them."""
    from blockrt.coreml.manifest import FORMAT, FORMAT_VERSION

    out.mkdir(parents=True)
    for name in (n for n in packages if "/" not in n):
        (out / name / "Data").mkdir(parents=True)
        (out / name / "Data" / "weight.bin").write_bytes(b"old")
    (out / "export.json").write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION,
                                                 "packages": [{"file": n} for n in packages]}))


def stage_export(out: Path, packages: list[str]):
    from blockrt.coreml.outdir import StagedDir

    stage = StagedDir(out, overwrite=True)
    for name in packages:
        (stage.path / name).mkdir()
        (stage.path / name / "new").write_text("new")
    (stage.path / "export.json").write_text(json.dumps({"packages": [{"file": n} for n in packages]}))
    return stage


def test_overwrite_replaces_only_what_the_previous_export_wrote(tmp_path):
    out = tmp_path / "out"
    previous_export(out, ["a.mlpackage", "b.mlpackage"])
    (out / "notes.txt").write_text("mine")
    (out / "runs").mkdir()
    (out / "runs" / "log.txt").write_text("mine too")
    stage = stage_export(out, ["b.mlpackage", "c.mlpackage"])
    stage.commit()
    assert sorted(p.name for p in out.iterdir()) == ["b.mlpackage", "c.mlpackage", "export.json", "notes.txt", "runs"]
    assert (out / "notes.txt").read_text() == "mine" and (out / "runs" / "log.txt").read_text() == "mine too"
    assert (out / "b.mlpackage" / "new").exists() and not (out / "b.mlpackage" / "Data").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no stage, no old copy left


def test_overwrite_never_takes_a_name_the_user_holds_or_a_path_outside(tmp_path):
    from blockrt.coreml import ExportError

    out = tmp_path / "out"
    previous_export(out, ["a.mlpackage"])
    (out / "b.mlpackage").mkdir()  # the user's own, not listed by the previous export
    stage = stage_export(out, ["b.mlpackage"])
    with pytest.raises(ExportError, match=r"holds \['b\.mlpackage'\], which the previous export did not write.*fix:"):
        stage.commit()
    stage.discard()
    assert sorted(p.name for p in out.iterdir()) == ["a.mlpackage", "b.mlpackage", "export.json"]
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("keep")
    bad = tmp_path / "bad"
    previous_export(bad, ["../victim"])
    with pytest.raises(ExportError, match=r"lists a package file '\.\./victim'; expected a plain name"):
        stage_export(bad, ["x.mlpackage"])
    assert (victim / "keep").read_text() == "keep"
