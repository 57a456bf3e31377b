"""``blockrt.from_pretrained``: transformers and diffusers checkpoints in their real layouts (single and sharded
safetensors, diffusers subfolders, a repo id in an offline fake hub cache), streamed with outputs ``torch.equal`` to
the library's own ``from_pretrained``, under the budget, without writing to the checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import blockrt
from blockrt import NotCachedError, RunConfig
from tiny_checkpoints import (V, fake_hub_cache, flux_inputs, make_read_only, make_writable, save_flux_pipeline_dir,
                              save_gpt2, save_llama, tree_state)

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

BUDGET = 1_000_000  # bytes: the tiny models are 0.3-0.7 MB, so several blocks stream


def _ids() -> torch.Tensor:
    return torch.randint(0, V, (1, 8), generator=torch.Generator().manual_seed(3))


def aligned(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every tensor in fresh (allocator-aligned) memory. diffusers maps sharded safetensors and
    keeps tensors at their file offsets; CPU kernels on unaligned data round differently (4.8e-7 on the tiny Flux),
    so the reference is the plain model as it computes from ordinary memory."""
    for t in [*model.parameters(), *model.buffers()]:
        t.data = t.data.clone()
    return model


@pytest.fixture
def read_only():
    """``read_only(root)``: make ``root`` read-only now, writable again at teardown (so tmp_path can be removed)."""
    roots: list[Path] = []

    def apply(root: Path) -> dict:
        make_read_only(root)
        roots.append(root)
        return tree_state(root)

    yield apply
    for r in roots:
        make_writable(r)


@pytest.mark.parametrize("shard", [None, "60KB"], ids=["single", "sharded"])
def test_llama_directory_equals_transformers(tmp_path: Path, shard: str | None, read_only, monkeypatch) -> None:
    from transformers import LlamaForCausalLM

    monkeypatch.setenv("BLOCKRT_CACHE", str(tmp_path / "cache"))
    ckpt = save_llama(tmp_path / "llama", max_shard_size=shard)
    assert (ckpt / "model.safetensors.index.json").exists() == (shard is not None)
    before = read_only(ckpt)
    plain = aligned(LlamaForCausalLM.from_pretrained(ckpt).eval())
    ids = _ids()
    with torch.no_grad():
        want = plain(ids).logits
        want_tokens = plain.generate(ids, max_new_tokens=5, do_sample=False)
    with blockrt.from_pretrained(ckpt, budget=BUDGET) as rt:
        assert isinstance(rt.model, LlamaForCausalLM) and len(rt.plan.blocks) > 2
        got = rt(ids).logits
        tokens = rt.model.generate(ids, max_new_tokens=5, do_sample=False)
        peak = rt.ledger.peak
    assert torch.equal(got, want)
    assert torch.equal(tokens, want_tokens)
    assert peak <= BUDGET
    assert tree_state(ckpt) == before


def test_repo_id_from_offline_hub_cache(tmp_path: Path, monkeypatch, read_only) -> None:
    """A repo id is read from the hub cache's snapshot (links into blobs), which stays untouched."""
    from transformers import GPT2LMHeadModel

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("BLOCKRT_CACHE", str(tmp_path / "blockrt-cache"))
    snap = fake_hub_cache(cache, "org/tiny-gpt2", save_gpt2(tmp_path / "saved"))
    before = read_only(cache)
    plain = aligned(GPT2LMHeadModel.from_pretrained(snap).eval())
    ids = _ids()
    with torch.no_grad():
        want = plain.generate(ids, max_new_tokens=4, do_sample=False)
    with blockrt.from_pretrained("org/tiny-gpt2", budget=BUDGET) as rt:
        assert Path(rt.weight_files[0]).resolve().parent == (cache / "models--org--tiny-gpt2" / "blobs").resolve()
        got = rt.model.generate(ids, max_new_tokens=4, do_sample=False)
        assert rt.ledger.peak <= BUDGET
    assert torch.equal(got, want)
    assert tree_state(cache) == before


def test_model_class_auto_and_base_model(tmp_path: Path) -> None:
    """An Auto class builds the checkpoint's architecture; a base model reads the head checkpoint's prefix."""
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel, GPT2Model

    ckpt = save_gpt2(tmp_path / "gpt2")
    plain = aligned(GPT2LMHeadModel.from_pretrained(ckpt).eval())
    ids = _ids()
    with torch.no_grad():
        want = plain.transformer(ids).last_hidden_state
    with blockrt.from_pretrained(ckpt, budget=BUDGET, model_class=AutoModelForCausalLM) as rt:
        assert isinstance(rt.model, GPT2LMHeadModel)
    with blockrt.from_pretrained(ckpt, budget=BUDGET, model_class=GPT2Model) as rt:
        assert isinstance(rt.model, GPT2Model)
        assert torch.equal(rt(ids).last_hidden_state, want)


def test_run_weights_repo_id(tmp_path: Path, monkeypatch) -> None:
    """``blockrt.run(skeleton, weights="org/name")`` reads the cached checkpoint too."""
    from transformers import GPT2Config, GPT2LMHeadModel

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    saved = save_gpt2(tmp_path / "saved")
    fake_hub_cache(tmp_path / "hub", "org/tiny-gpt2", saved)
    plain = aligned(GPT2LMHeadModel.from_pretrained(saved).eval())
    with blockrt.meta_weights():
        skeleton = GPT2LMHeadModel(GPT2Config.from_pretrained(saved)).eval()
    with torch.no_grad():
        want = plain(_ids()).logits
    with blockrt.run(skeleton, budget=BUDGET, weights="org/tiny-gpt2") as rt:
        assert torch.equal(rt(_ids()).logits, want)


@pytest.mark.parametrize("call", ["from_pretrained", "run"])
def test_repo_id_not_cached_says_how_to_fetch(tmp_path: Path, monkeypatch, call: str) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(NotCachedError) as e:
        if call == "run":
            blockrt.run(torch.nn.Sequential(torch.nn.Linear(2, 2)), budget="1GB", weights="gpt2")
        else:
            blockrt.from_pretrained("gpt2", budget="1GB")
    msg = str(e.value)
    assert "'gpt2' is not in the local Hugging Face cache" in msg and str(tmp_path / "empty-hub") in msg
    assert "huggingface-cli download gpt2" in msg and "does not exist" not in msg


def test_missing_local_path_and_subfolder(tmp_path: Path) -> None:
    with pytest.raises(blockrt.StoreError, match="does not exist"):
        blockrt.from_pretrained(str(tmp_path / "nowhere"), budget="1GB")
    (tmp_path / "pipe" / "vae").mkdir(parents=True)
    with pytest.raises(blockrt.StoreError, match=r"no subfolder 'transformer'; found \['vae'\]"):
        blockrt.from_pretrained(tmp_path / "pipe", budget="1GB", subfolder="transformer")


@pytest.mark.parametrize("shard", [None, "40KB"], ids=["single", "sharded"])
def test_diffusers_subfolder_equals_diffusers(tmp_path: Path, shard: str | None, read_only) -> None:
    from diffusers import FluxTransformer2DModel

    root = save_flux_pipeline_dir(tmp_path / "flux", max_shard_size=shard)
    index = root / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    assert index.exists() == (shard is not None)
    before = read_only(root)
    plain = aligned(FluxTransformer2DModel.from_pretrained(root, subfolder="transformer").eval())
    with torch.no_grad():
        want = plain(**flux_inputs()).sample
    with blockrt.from_pretrained(root, budget=BUDGET, subfolder="transformer") as rt:
        assert isinstance(rt.model, FluxTransformer2DModel) and len(rt.plan.blocks) > 2
        got = rt(**flux_inputs()).sample
        assert rt.ledger.peak <= BUDGET
    assert torch.equal(got, want)
    assert tree_state(root) == before


def test_converted_store_goes_to_the_user_cache(tmp_path: Path, monkeypatch, read_only) -> None:
    """A storage dtype the checkpoint does not hold converts once into $BLOCKRT_CACHE, reused the second time; the
    (read-only) checkpoint gets nothing."""
    cache = tmp_path / "blockrt-cache"
    monkeypatch.setenv("BLOCKRT_CACHE", str(cache))
    ckpt = save_llama(tmp_path / "llama")
    before = read_only(ckpt)
    ids = _ids()
    outs = []
    for _ in range(2):
        with blockrt.from_pretrained(ckpt, budget=BUDGET, config=RunConfig(storage_dtype="bfloat16")) as rt:
            outs.append(rt(ids).logits)
            files = rt.weight_files
    stores = list((cache / "stores").iterdir())
    assert len(stores) == 1 and all(Path(f).is_relative_to(stores[0]) for f in files)
    assert torch.equal(outs[0], outs[1])
    assert tree_state(ckpt) == before


def test_dtype_narrower_than_the_checkpoint_equals_transformers(tmp_path: Path, monkeypatch, read_only) -> None:
    """``dtype=torch.bfloat16`` on a float32 checkpoint: built in bfloat16 as transformers builds it, the blocks
    converted once into a bfloat16 store in the user cache (the checkpoint untouched); logits and tokens equal
    transformers' ``from_pretrained(dtype=torch.bfloat16)``. A diffusers model narrows the same way."""
    from diffusers import FluxTransformer2DModel
    from transformers import LlamaForCausalLM

    cache = tmp_path / "blockrt-cache"
    monkeypatch.setenv("BLOCKRT_CACHE", str(cache))
    ckpt = save_llama(tmp_path / "llama")
    before = read_only(ckpt)
    plain = aligned(LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval())
    ids = _ids()
    with torch.no_grad():
        want, want_tokens = plain(ids).logits, plain.generate(ids, max_new_tokens=5, do_sample=False)
    with blockrt.from_pretrained(ckpt, budget=BUDGET, dtype=torch.bfloat16) as rt:
        assert {p.dtype for p in rt.model.parameters()} == {torch.bfloat16}
        assert rt.config.storage_dtype == "bfloat16"
        got, tokens = rt(ids).logits, rt.model.generate(ids, max_new_tokens=5, do_sample=False)
        assert all(Path(f).is_relative_to(cache) for f in rt.weight_files)
        assert rt.ledger.peak <= BUDGET
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert torch.equal(tokens, want_tokens)
    assert tree_state(ckpt) == before

    root = save_flux_pipeline_dir(tmp_path / "flux")
    plain = aligned(FluxTransformer2DModel.from_pretrained(root, subfolder="transformer", torch_dtype=torch.bfloat16))
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in flux_inputs().items()}
    with torch.no_grad():
        want = plain.eval()(**inputs).sample
    with blockrt.from_pretrained(root, budget=BUDGET, subfolder="transformer", dtype="bfloat16") as rt:
        got = rt(**inputs).sample
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_dtype_wider_than_the_checkpoint_reads_it_in_place_and_bad_dtype_is_refused(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    """A bfloat16 checkpoint with ``dtype=torch.float32`` widens as it loads (no store is written); a dtype that
    is not a float is refused with what was expected."""
    from transformers import LlamaForCausalLM

    cache = tmp_path / "blockrt-cache"
    monkeypatch.setenv("BLOCKRT_CACHE", str(cache))
    src = LlamaForCausalLM.from_pretrained(save_llama(tmp_path / "llama"))
    ckpt = tmp_path / "llama-bf16"
    src.to(torch.bfloat16).save_pretrained(ckpt)
    plain = aligned(LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval())
    ids = _ids()
    with torch.no_grad():
        want = plain(ids).logits
    with blockrt.from_pretrained(ckpt, budget=BUDGET, dtype=torch.float32) as rt:
        assert rt.config.storage_dtype is None
        got = rt(ids).logits
    assert torch.equal(got, want) and not cache.exists()
    with pytest.raises(ValueError, match="expected a floating torch dtype"):
        blockrt.from_pretrained(ckpt, budget=BUDGET, dtype="int8")
