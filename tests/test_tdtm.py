"""TDTM (temporal dimension token merging) in STDiT3: merge/unmerge for even and odd T, bit-identity with
merging off, what holds exactly with merging on, FLOP ratios, x_mask rules, streaming parity."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import blockrt
from blockrt import RunConfig
from blockrt.pipelines.opensora.stdit3 import STDiT3, STDiT3Config
from blockrt.pipelines.opensora.pipeline import GenerateConfig
from blockrt.pipelines.opensora.tdtm import (
    check_x_mask,
    merge,
    merge_tokens,
    merged_frames,
    merged_positions,
    unmerge,
    unmerge_tokens,
)

L, C, NUM_HEADS = 12, 64, 4  # tiny config: caption tokens, hidden size
FPS, HEIGHT, WIDTH = 24.0, 240, 426
CLOSE_ATOL = 1e-5  # fp32: the same function computed over a different number of (identical) keys
FRAME_COUNTS = (1, 2, 5, 6)


def tiny_model(seed: int = 0) -> STDiT3:
    torch.manual_seed(seed)
    return STDiT3(STDiT3Config.tiny()).eval()


def caption_mask() -> torch.Tensor:
    return torch.tensor([[1] * 5 + [0] * (L - 5), [1] * 9 + [0] * (L - 9)])  # (2, L)


def run(model, x: torch.Tensor, y: torch.Tensor, **kw) -> torch.Tensor:
    kw = {"fps": FPS, "height": HEIGHT, "width": WIDTH, "mask": caption_mask(), **kw}
    with torch.no_grad():
        return model(x, torch.full((x.shape[0],), 600.0), y, **kw)


def group_constant_latent(T: int, H: int = 6, W: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A latent ``(2, 4, T, H, W)`` whose frames are equal within each merge group, and a caption."""
    g = torch.Generator().manual_seed(seed)
    x = unmerge(torch.randn(2, 4, merged_frames(T), H, W, generator=g), T, dim=2).contiguous()
    return x, torch.randn(2, 1, L, 32, generator=g)


# ------------------------------------------------------------------------------------------------------
# merge / unmerge
# ------------------------------------------------------------------------------------------------------


def test_merged_frame_count() -> None:
    assert [merged_frames(T) for T in range(1, 9)] == [1, 1, 2, 2, 3, 3, 4, 4]
    with pytest.raises(ValueError, match="at least one frame"):
        merged_frames(0)


def test_merge_and_unmerge_values_odd_T() -> None:
    """T=5: pairs (0,1), (2,3) are averaged, frame 4 is its own group; unmerge repeats to group size."""
    f = torch.arange(5.0)[None, :, None] * torch.tensor([1.0, 10.0])  # (1, 5, 2)
    m = merge(f, 5)
    assert torch.equal(m, torch.stack([(f[:, 0] + f[:, 1]) / 2, (f[:, 2] + f[:, 3]) / 2, f[:, 4]], dim=1))
    assert torch.equal(unmerge(m, 5), m[:, [0, 0, 1, 1, 2]])


@pytest.mark.parametrize("T", FRAME_COUNTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmerge_merge_exact_on_group_constant_frames(T: int, dtype: torch.dtype) -> None:
    base = torch.randn(2, merged_frames(T), 3, 4).to(dtype)  # (B, T', S, C)
    x = unmerge(base, T)  # frames constant within each group
    assert x.shape == (2, T, 3, 4)
    assert torch.equal(merge(x, T), base)  # (a + a) / 2 == a
    assert torch.equal(unmerge(merge(x, T), T), x)
    # the same along another axis (latent layout (B, C, T, H, W)) and on frame-major tokens (B, T*S, C)
    lat = unmerge(torch.randn(1, 4, merged_frames(T), 2, 3).to(dtype), T, dim=2)
    assert torch.equal(unmerge(merge(lat, T, dim=-3), T, dim=-3), lat)
    tok = x.reshape(2, T * 3, 4)
    assert merge_tokens(tok, T, 3).shape == (2, merged_frames(T) * 3, 4)
    assert torch.equal(unmerge_tokens(merge_tokens(tok, T, 3), T, 3), tok)


@pytest.mark.parametrize("T", FRAME_COUNTS)
def test_merge_shapes(T: int) -> None:
    x = torch.randn(2, T, 5, 8)
    assert merge(x, T).shape == (2, (T + 1) // 2, 5, 8)
    assert unmerge(merge(x, T), T).shape == x.shape
    assert merge_tokens(x.view(2, T * 5, 8), T, 5).shape == (2, (T + 1) // 2 * 5, 8)


def test_merge_checks_lengths() -> None:
    with pytest.raises(ValueError, match="expected T=4"):
        merge(torch.randn(1, 5, 3), 4)
    with pytest.raises(ValueError, match=r"expected ceil\(5/2\)=3"):
        unmerge(torch.randn(1, 2, 3), 5)  # the original T is carried, never guessed
    with pytest.raises(ValueError, match="not T\\*S"):
        merge_tokens(torch.randn(1, 11, 3), 3, 4)


# ------------------------------------------------------------------------------------------------------
# merge_frames=False: the unmerged model, bit for bit
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 5, 6])
def test_merge_off_is_bit_identical(T: int) -> None:
    model = tiny_model()
    other = STDiT3(STDiT3Config.tiny()).eval()
    other.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(T)
    x, y = torch.randn(2, 4, T, 5, 7, generator=g), torch.randn(2, 1, L, 32, generator=g)
    xm = torch.ones(2, T, dtype=torch.bool)
    xm[:, 0] = False  # an I2V-style conditioning frame
    for kw in ({}, {"x_mask": xm}):
        ref = run(model, x, y, **kw)
        assert torch.equal(run(other, x, y, merge_frames=False, **kw), ref)
        assert torch.equal(run(model, x, y, merge_frames=False, **kw), ref)


# ------------------------------------------------------------------------------------------------------
# merge_frames=True: what holds exactly
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", FRAME_COUNTS)
def test_merged_forward_shapes_and_rope_positions(T: int) -> None:
    model = tiny_model()
    x, y = group_constant_latent(T, H=5, W=7)
    seen = {}
    hook = model.temporal_blocks[1].register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    out = run(model, x, y, merge_frames=True)
    hook.remove()
    assert out.shape == (2, 8, T, 5, 7) and out.isfinite().all()
    assert seen["merge_frames"] is True
    cos, sin = model.rope.cos_sin(merged_frames(T), torch.float32, torch.device("cpu"))  # positions 0..T'-1
    assert torch.equal(seen["rope"][0], cos) and torch.equal(seen["rope"][1], sin)


def test_single_frame_merging_is_a_no_op() -> None:
    """T=1: one group of one frame, so merging changes nothing, bit for bit."""
    model = tiny_model()
    x, y = group_constant_latent(1)
    assert torch.equal(run(model, x, y, merge_frames=True), run(model, x, y))


@pytest.mark.parametrize("T", [2, 5, 6])
def test_merged_output_keeps_group_constant_frames(T: int) -> None:
    """Attention outputs are repeated, everything else is per token: frames equal within a group stay equal."""
    model = tiny_model()
    x, y = group_constant_latent(T)
    out = run(model, x, y, merge_frames=True)
    assert torch.equal(unmerge(merge(out, T, dim=2), T, dim=2), out)


@pytest.mark.parametrize("T", [2, 5, 6])
def test_spatial_block_exact_on_group_constant_frames(T: int) -> None:
    """Spatial self-attention and cross-attention are per frame / per token, so with frames equal within
    each group the merged spatial block *is* the unmerged one (any T, odd included)."""
    model = tiny_model()
    S = 6
    g = torch.Generator().manual_seed(T)
    x = unmerge_tokens(torch.randn(2, merged_frames(T) * S, C, generator=g), T, S)  # (2, T*S, C)
    y, t_mlp = torch.randn(2, L, C, generator=g), torch.randn(2, 6 * C, generator=g)
    y_mask = caption_mask().bool()
    with torch.no_grad():
        for block in model.spatial_blocks:
            ref = block(x, y, t_mlp, T, S, y_mask=y_mask)
            assert torch.equal(block(x, y, t_mlp, T, S, y_mask=y_mask, merge_frames=True), ref)


def test_temporal_block_even_T_without_rope_matches_up_to_rounding() -> None:
    """Temporal attention over pairs of equal keys equals attention over one key each (the pair's two softmax
    weights are equal), so without RoPE merging is the same function for even T (not bit for bit: fewer
    terms are summed). With RoPE it is not: merged frame g sits at position g, not at 2g and 2g+1."""
    model = tiny_model()
    T, S = 6, 6
    g = torch.Generator().manual_seed(0)
    x = unmerge_tokens(torch.randn(2, merged_frames(T) * S, C, generator=g), T, S)
    y, t_mlp = torch.randn(2, L, C, generator=g), torch.randn(2, 6 * C, generator=g)
    block = model.temporal_blocks[0]
    with torch.no_grad():
        ref = block(x, y, t_mlp, T, S)
        torch.testing.assert_close(block(x, y, t_mlp, T, S, merge_frames=True), ref, atol=CLOSE_ATOL, rtol=0)
        rope, rope_m = (model.rope.cos_sin(n, torch.float32, x.device) for n in (T, merged_frames(T)))
        with_rope = block(x, y, t_mlp, T, S, rope=rope)
        assert not torch.allclose(block(x, y, t_mlp, T, S, rope=rope_m, merge_frames=True), with_rope, atol=1e-3)
        with pytest.raises(ValueError, match="rope has 6 positions"):
            block(x, y, t_mlp, T, S, rope=rope, merge_frames=True)  # full-length rope with merging


@pytest.mark.parametrize("T", [2, 5, 6])
def test_frame_constant_video_matches_up_to_rounding(T: int) -> None:
    """All frames equal: every temporal attention averages equal values, whatever the RoPE positions and the
    group sizes, so the merged model equals the unmerged one up to rounding, for odd T too."""
    model = tiny_model()
    x, y = group_constant_latent(1)
    x = x.expand(-1, -1, T, -1, -1).contiguous()
    torch.testing.assert_close(run(model, x, y, merge_frames=True), run(model, x, y), atol=CLOSE_ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------------
# Variants: RoPE positions of the merged frames, which blocks merge, which steps
# ------------------------------------------------------------------------------------------------------


def test_merged_positions() -> None:
    assert merged_positions(5).tolist() == [0.0, 1.0, 2.0]  # the paper's: 0..T'-1
    assert merged_positions(5, "centre").tolist() == [0.5, 2.5, 4.0]  # pairs at 2g + 0.5, the lone frame 4 at 4
    assert merged_positions(6, "centre").tolist() == [0.5, 2.5, 4.5]
    assert merged_positions(1, "centre").tolist() == [0.0]
    assert merged_positions(15, "centre").tolist() == [2 * g + 0.5 for g in range(7)] + [14.0]
    with pytest.raises(ValueError, match="merge positions must be one of"):
        merged_positions(5, "middle")


def _block_calls(model: STDiT3, **kw) -> tuple[torch.Tensor, list[dict]]:
    """The output and, per block in call order, the ``merge_frames`` and ``rope`` it was given."""
    seen: list[dict] = []
    hooks = [b.register_forward_pre_hook(lambda m, a, k: seen.append({"merge": k["merge_frames"], "rope": k.get("rope")}),
                                         with_kwargs=True) for b in (*model.spatial_blocks, *model.temporal_blocks)]
    try:
        x, y = group_constant_latent(5, H=5, W=7)
        x = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))  # frames differ in pairs
        return run(model, x, y, **kw), seen
    finally:
        for h in hooks:
            h.remove()


def test_default_variant_is_the_papers_bit_for_bit() -> None:
    """merge_frames=True alone: every block merges, RoPE positions 0..T'-1 (what STDiT3 did before the variants
    existed), and the named paper values give the same bits."""
    model = tiny_model()
    out, seen = _block_calls(model, merge_frames=True)
    assert [c["merge"] for c in seen] == [True] * 4
    cos, sin = model.rope.cos_sin(merged_frames(5), torch.float32, torch.device("cpu"))  # arange(T')
    assert all(torch.equal(c["rope"][0], cos) and torch.equal(c["rope"][1], sin) for c in seen if c["rope"])
    same, _ = _block_calls(model, merge_frames=True, merge_positions="index", merge_blocks="all")
    assert torch.equal(out, same)
    cfg = GenerateConfig("a red circle", steps=30, merge_steps=10)  # the pipeline's defaults: the paper's
    assert [cfg.merge_args(i) for i in (0, 9, 10, 29)] == [
        {"merge_frames": m, "merge_positions": "index", "merge_blocks": "all"} for m in (True, True, False, False)]


def test_centre_positions_reach_the_temporal_blocks_and_change_the_output() -> None:
    model = tiny_model()
    out, seen = _block_calls(model, merge_frames=True, merge_positions="centre")
    cos, sin = model.rope.cos_sin(3, torch.float32, torch.device("cpu"), torch.tensor([0.5, 2.5, 4.0]))
    ropes = [c["rope"] for c in seen if c["rope"] is not None]
    assert len(ropes) == 2 and all(torch.equal(r[0], cos) and torch.equal(r[1], sin) for r in ropes)
    freqs = model.rope.freqs.repeat_interleave(2)  # (head_dim,): the angle of position p is p * freqs
    torch.testing.assert_close(cos[1], torch.cos(2.5 * freqs))
    index, _ = _block_calls(model, merge_frames=True)
    assert out.isfinite().all() and not torch.allclose(out, index, atol=1e-4)


def test_centre_positions_keep_the_trained_distances() -> None:
    """RoPE attention depends on position differences only: merged pairs at centres 0.5, 2.5, 4.5 attend as
    frames 0, 2, 4 do (2 apart, as trained), where the paper's positions 0, 1, 2 make them 1 apart."""
    model = tiny_model()
    attn = model.temporal_blocks[0].attn
    h = torch.randn(6, 3, C, generator=torch.Generator().manual_seed(0))  # (B*S, T', C) merged tokens
    cpu = torch.device("cpu")

    def at(positions: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return attn(h, model.rope.cos_sin(3, torch.float32, cpu, positions))

    trained = at(torch.tensor([0.0, 2.0, 4.0]))
    torch.testing.assert_close(at(merged_positions(6, "centre")), trained, atol=CLOSE_ATOL, rtol=0)
    assert not torch.allclose(at(merged_positions(6)), trained, atol=1e-3)


@pytest.mark.parametrize("blocks, spatial, temporal", [("spatial", True, False), ("temporal", False, True)])
def test_merge_blocks_picks_which_blocks_merge(blocks: str, spatial: bool, temporal: bool) -> None:
    model = tiny_model()
    out, seen = _block_calls(model, merge_frames=True, merge_blocks=blocks)
    assert [c["merge"] for c in seen] == [spatial, temporal] * 2  # spatial_blocks[i], then temporal_blocks[i]
    assert all(c["rope"][0].shape[0] == (3 if temporal else 5) for c in seen if c["rope"] is not None)
    every, _ = _block_calls(model, merge_frames=True)
    none, _ = _block_calls(model)
    assert not torch.allclose(out, every, atol=1e-4) and not torch.allclose(out, none, atol=1e-4)
    off, _ = _block_calls(model, merge_blocks=blocks)  # without merge_frames the variant does nothing
    assert torch.equal(off, none)


def test_merge_when_and_bad_variants() -> None:
    first = GenerateConfig("a red circle", steps=30, merge_steps=10)
    last = GenerateConfig("a red circle", steps=30, merge_steps=10, merge_when="last")
    assert [i for i in range(30) if first.merges(i)] == list(range(10))
    assert [i for i in range(30) if last.merges(i)] == list(range(20, 30))
    assert not any(GenerateConfig("a red circle", merge_when="last").merges(i) for i in range(30))  # merge_steps 0
    for kw, match in (({"merge_positions": "middle"}, "merge positions"), ({"merge_blocks": "mlp"}, "merge blocks"),
                      ({"merge_when": "middle"}, "merge_when")):
        with pytest.raises(ValueError, match=match):
            GenerateConfig("a red circle", merge_steps=10, **kw)
    with pytest.raises(ValueError, match="merge blocks"):
        run(tiny_model(), *group_constant_latent(2), merge_frames=True, merge_blocks="mlp")


# ------------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------------

CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # not in torch's flop registry


def _sdpa_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)  # QK^T and AV


def flop_counts(model: STDiT3, T: int, merge_frames: bool) -> dict[str, dict[str, int]]:
    x, y = group_constant_latent(T)
    with FlopCounterMode(display=False, custom_mapping={CPU_SDPA: _sdpa_flops}) as counter:
        run(model, x, y, merge_frames=merge_frames)
    return {mod: {str(op).split(".")[-1]: n for op, n in ops.items()} for mod, ops in counter.get_flop_counts().items()}


def sdpa(counts, module: str) -> int:
    ops = counts[f"STDiT3.{module}"]
    return sum(n for op, n in ops.items() if "scaled_dot_product" in op)


def linear(counts, module: str) -> int:
    return sum(n for op, n in counts[f"STDiT3.{module}"].items() if op in ("mm", "addmm"))


@pytest.mark.parametrize("T", [6, 5])
def test_flops_per_attention(T: int) -> None:
    """Score FLOPs (QK^T, AV): temporal self-attention (T'/T)^2 (1/4 for even T), spatial self-attention and
    cross-attention T'/T (1/2); the q/k/v/out projections of image tokens T'/T; caption k/v and MLP 1."""
    model = tiny_model()
    full, merged = flop_counts(model, T, False), flop_counts(model, T, True)
    r = merged_frames(T) / T
    for i in range(model.config.depth):
        s, t = f"spatial_blocks.{i}", f"temporal_blocks.{i}"
        assert sdpa(merged, f"{t}.attn") / sdpa(full, f"{t}.attn") == pytest.approx(r * r)
        for name in (f"{s}.attn", f"{s}.cross_attn", f"{t}.cross_attn"):
            assert sdpa(merged, name) / sdpa(full, name) == pytest.approx(r)
        for blk in (s, t):
            for name in ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.proj"):
                assert linear(merged, f"{blk}.{name}") / linear(full, f"{blk}.{name}") == pytest.approx(r)
            for name in ("cross_attn.kv_linear", "mlp"):
                assert linear(merged, f"{blk}.{name}") == linear(full, f"{blk}.{name}")
    if T % 2 == 0:
        assert r * r == 0.25 and r == 0.5


# ------------------------------------------------------------------------------------------------------
# x_mask
# ------------------------------------------------------------------------------------------------------


def test_x_mask_must_be_equal_within_pairs() -> None:
    model = tiny_model()
    x, y = group_constant_latent(5)
    all_true = torch.ones(2, 5, dtype=torch.bool)
    ref = run(model, x, y, merge_frames=True)
    assert torch.equal(run(model, x, y, merge_frames=True, x_mask=all_true), ref)  # what T2V passes
    aligned = torch.tensor([[False, False, True, True, True]])  # whole pairs (+ the lone last frame)
    out = run(model, x, y, merge_frames=True, x_mask=aligned)
    assert out.isfinite().all() and not torch.equal(out, ref)
    mixed = torch.tensor([[False, True, True, True, True]])  # frame 0 conditions, frame 1 is noisy
    with pytest.raises(ValueError, match=r"sample 0 has x_mask\[0\]=False and x_mask\[1\]=True"):
        run(model, x, y, merge_frames=True, x_mask=mixed)
    assert run(model, x, y, x_mask=mixed).isfinite().all()  # without merging it is fine
    check_x_mask(torch.tensor([[True, True, False]]), 3)  # the odd last frame is always its own group


def test_spatial_block_x_mask_on_pairs_is_exact() -> None:
    """A pair-aligned x_mask selects the t/t0 modulation per frame around the merged attention: on group
    constant frames the merged spatial block still equals the unmerged one."""
    model = tiny_model()
    T, S = 5, 6
    g = torch.Generator().manual_seed(5)
    x = unmerge_tokens(torch.randn(2, merged_frames(T) * S, C, generator=g), T, S)
    y, t_mlp, t0_mlp = (torch.randn(2, n, generator=g) for n in (L * C, 6 * C, 6 * C))
    y = y.view(2, L, C)
    xm = torch.tensor([[False, False, True, True, True], [True, True, False, False, True]])
    block = model.spatial_blocks[1]
    with torch.no_grad():
        ref = block(x, y, t_mlp, T, S, x_mask=xm, t0_mlp=t0_mlp)
        assert torch.equal(block(x, y, t_mlp, T, S, x_mask=xm, t0_mlp=t0_mlp, merge_frames=True), ref)


# ------------------------------------------------------------------------------------------------------
# Streaming
# ------------------------------------------------------------------------------------------------------


def test_streams_with_merging_bit_identical() -> None:
    """blockrt streams spatial_blocks[i] + temporal_blocks[i]; merged and unmerged steps alternate in one
    runtime as in the sampler (merged for the first steps), each equal to the plain model."""
    model = tiny_model()
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(2, 4, 5, 6, 7, generator=g), torch.randn(2, 1, L, 32, generator=g)
    ref_merged, ref_full = run(model, x, y, merge_frames=True), run(model, x, y)
    assert not torch.allclose(ref_merged, ref_full, atol=1e-3)
    with blockrt.run(model, budget="16MB") as rt:
        assert [b.name for b in rt.plan.blocks] == ["st_blocks.0", "st_blocks.1"]
        for merge_frames, ref in ((True, ref_merged), (True, ref_merged), (False, ref_full)):
            assert torch.equal(run(rt, x, y, merge_frames=merge_frames), ref)


# ------------------------------------------------------------------------------------------------------
# CUDA (where a GPU is)
# ------------------------------------------------------------------------------------------------------

CUDA_ATOL = 1e-4  # fp32 CUDA (TF32 off) vs CPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_merged_matches_cpu_and_streams() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = tiny_model()
    x, y = group_constant_latent(5)
    ref = run(model, x, y, merge_frames=True)
    model = model.cuda()
    kw = {"mask": caption_mask().cuda(), "merge_frames": True}
    out = run(model, x.cuda(), y.cuda(), **kw)
    torch.testing.assert_close(out.cpu(), ref, atol=CUDA_ATOL, rtol=0)
    assert torch.equal(unmerge(merge(out, 5, dim=2), 5, dim=2), out)  # group-constant frames stay equal
    model = model.cpu()
    with blockrt.run(model, budget="256MB", config=RunConfig(device="cuda")) as rt:
        for _ in range(2):
            torch.testing.assert_close(run(rt, x.cuda(), y.cuda(), **kw), out, atol=CUDA_ATOL, rtol=0)
