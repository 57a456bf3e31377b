"""STDiT3: checkpoint key/shape parity on meta, forward shapes, caption masking, CFG batch order, the x_mask
(I2V) path, dtypes, and hand-computed values of the embeddings (spec: shared/design/opensora-v1.2.md §1)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import blockrt
from blockrt.pipelines.opensora.layers import apply_rope, pos_embed_2d, rope_frequencies, timestep_sinusoid
from blockrt.pipelines.opensora.stdit3 import STDiT3, STDiT3Config, unpatchify

KEYS = Path(__file__).parent / "fixtures" / "opensora_keys" / "stdit3_xl2.json"
XL2_BLOCK_PARAMS = 21_255_696  # one spatial or temporal block (spec §1.1)
BATCH_ATOL = 1e-5  # fp32, a batch of 2 vs 1: BLAS picks other kernels for M=1 (same maths, other rounding)
BF16_MIN_SNR_DB = 20.0  # bf16 weights and activations vs the fp32 model, tiny random model
CUDA_ATOL = 1e-4  # fp32 CUDA (TF32 off) vs CPU

L = 12  # caption tokens of the tiny config (model_max_length)
FPS, HEIGHT, WIDTH = 24, 240, 426


def tiny_model(seed: int = 0) -> STDiT3:
    torch.manual_seed(seed)
    return STDiT3(STDiT3Config.tiny()).eval()


def prompt_mask(*lengths: int) -> torch.Tensor:
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return mask  # (n, L)


def run(model: STDiT3, x, t, y, **kw) -> torch.Tensor:
    kw = {"fps": torch.full((1,), float(FPS)), "height": HEIGHT, "width": WIDTH, **kw}
    with torch.no_grad():
        return model(x, torch.as_tensor(t, dtype=torch.float32), y, **kw)


def inputs(B: int = 1, T: int = 3, H: int = 5, W: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, T, H, W, generator=g)
    y = torch.randn(B, 1, L, 32, generator=g)
    return x, y


# ------------------------------------------------------------------------------------------------------
# Checkpoint parity (XL/2 on meta)
# ------------------------------------------------------------------------------------------------------


def test_xl2_state_dict_matches_checkpoint_dump() -> None:
    dump = json.loads(KEYS.read_text())
    with torch.device("meta"):
        model = STDiT3(STDiT3Config.xl2())
    sd = model.state_dict()
    assert dump["num_state_dict_entries"] == len(sd) == 973
    assert [(k, list(v.shape)) for k, v in sd.items()] == [(e["key"], e["shape"]) for e in dump["state_dict"]]
    assert all(v.is_meta for v in sd.values())
    params = dict(model.named_parameters())
    kinds = {k: "parameter" if k in params else "buffer" for k in sd}
    assert kinds == {e["key"]: e["kind"] for e in dump["state_dict"]}
    assert sum(p.numel() for p in params.values()) == dump["num_parameters"] == 1_207_643_972
    assert sum(v.numel() for v in sd.values()) == dump["num_state_dict_elements"]
    assert not model.rope.freqs.requires_grad
    assert sum(p.numel() for p in model.spatial_blocks[0].parameters()) == XL2_BLOCK_PARAMS
    assert sum(p.numel() for p in model.temporal_blocks[27].parameters()) == XL2_BLOCK_PARAMS
    assert not dict(model.named_buffers()).keys() - sd.keys(), "no non-persistent buffers (they would stay on meta)"


def test_config_fields_and_validation() -> None:
    cfg = STDiT3Config.xl2()
    assert (cfg.head_dim, cfg.out_channels, cfg.mlp_hidden) == (72, 8, 4608)
    hf = {"model_type": "STDiT3", "depth": 28, "patch_size": [1, 2, 2], "enable_flash_attn": False}
    assert STDiT3Config.from_dict(hf) == cfg
    with pytest.raises(ValueError, match="divisible by num_heads"):
        STDiT3Config(hidden_size=100, num_heads=16)
    with pytest.raises(ValueError, match="even for RoPE"):
        STDiT3Config(hidden_size=36, num_heads=4)


def test_meta_build_loads_with_assign_and_matches() -> None:
    ref = tiny_model()
    with blockrt.meta_weights():
        skeleton = STDiT3(STDiT3Config.tiny())
    assert all(v.is_meta for v in skeleton.state_dict().values())
    skeleton.load_state_dict(ref.state_dict(), assign=True)
    x, y = inputs(T=2)
    assert torch.equal(run(skeleton.eval(), x, [700.0], y), run(ref, x, [700.0], y))


def test_rope_freqs_built_normally() -> None:
    freqs = STDiT3(STDiT3Config.tiny(depth=1)).rope.freqs
    assert freqs.shape == (8,) and torch.allclose(freqs, torch.tensor([10000 ** (-2 * i / 16) for i in range(8)]))
    xl = rope_frequencies(72)
    assert xl.shape == (36,) and xl[0] == 1.0 and math.isclose(xl[35].item(), 10000 ** (-70 / 72), rel_tol=1e-6)


# ------------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T,H,W", [(1, 5, 7), (5, 6, 9), (5, 9, 8), (2, 4, 4)])
def test_forward_shape_odd_sizes(T: int, H: int, W: int) -> None:
    model = tiny_model()
    x, y = inputs(B=2, T=T, H=H, W=W)
    out = run(model, x, [500.0, 500.0], y, mask=prompt_mask(4, 9))
    assert out.shape == (2, 8, T, H, W) and out.dtype == torch.float32 and out.isfinite().all()


def test_deterministic() -> None:
    model = tiny_model()
    x, y = inputs(B=2, T=5)
    a = run(model, x, [300.0, 900.0], y, mask=prompt_mask(3, 8))
    assert torch.equal(a, run(model, x, [300.0, 900.0], y, mask=prompt_mask(3, 8)))


def test_padding_caption_tokens_do_not_change_output() -> None:
    model = tiny_model()
    x, y = inputs(T=3)
    mask = prompt_mask(5)
    ref = run(model, x, [600.0], y, mask=mask)
    y2 = y.clone()
    y2[:, :, 5:] = torch.randn_like(y2[:, :, 5:]) * 10
    assert torch.equal(run(model, x, [600.0], y2, mask=mask), ref)
    y3 = y.clone()
    y3[:, :, 2] += 1.0  # a valid token does matter
    assert not torch.allclose(run(model, x, [600.0], y3, mask=mask), ref)
    assert not torch.allclose(run(model, x, [600.0], y2), ref)  # no mask: all 12 tokens attended


def test_cfg_batch_cond_rows_first() -> None:
    """A batch ``[cond, null]`` equals each row run alone; the null rows use the prompt's mask."""
    model = tiny_model()
    x, y = inputs(T=3)
    mask = prompt_mask(6)
    null = model.null_caption(1)
    assert null.shape == (1, 1, L, 32) and torch.equal(null[0, 0], model.y_embedder.y_embedding)
    y_cfg = torch.cat([y, null])
    x2, t2 = torch.cat([x, x]), [800.0, 800.0]
    out = run(model, x2, t2, y_cfg, mask=mask)  # mask (1, L) tiled to the CFG batch
    assert torch.equal(out, run(model, x2, t2, y_cfg, mask=mask.repeat(2, 1)))
    # exactly: rows do not interact (same batch size, so same kernels)
    assert torch.equal(out[:1], run(model, x2, t2, torch.cat([y, y]), mask=mask)[:1])
    assert torch.equal(out[1:], run(model, x2, t2, torch.cat([null, null]), mask=mask)[1:])
    # up to BLAS rounding: each row alone
    torch.testing.assert_close(out[:1], run(model, x, [800.0], y, mask=mask), atol=BATCH_ATOL, rtol=0)
    torch.testing.assert_close(out[1:], run(model, x, [800.0], null, mask=mask), atol=BATCH_ATOL, rtol=0)


def test_cfg_two_prompts_tile_prompt_major() -> None:
    """n=2 prompts, CFG batch ``[c0, c1, null, null]``: mask, fps, x_mask ``(n, ...)`` tile as ``[p0, p1, p0, p1]``."""
    model = tiny_model()
    x, y = inputs(B=2, T=2)
    mask, xm = prompt_mask(3, 9), torch.tensor([[True, False], [True, True]])
    y_cfg, x4, t4 = torch.cat([y, model.null_caption(2)]), torch.cat([x, x]), [700.0] * 4
    out = run(model, x4, t4, y_cfg, mask=mask, x_mask=xm, fps=torch.tensor([24.0, 24.0]))
    assert torch.equal(out, run(model, x4, t4, y_cfg, mask=mask.repeat(2, 1), x_mask=xm.repeat(2, 1)))
    for row, p in [(2, 0), (3, 1)]:  # null rows use their prompt's mask
        alone = run(model, x[p : p + 1], [700.0], model.null_caption(1), mask=mask[p : p + 1], x_mask=xm[p : p + 1])
        torch.testing.assert_close(out[row : row + 1], alone, atol=BATCH_ATOL, rtol=0)


def test_per_sample_caption_masks() -> None:
    """Two prompts of different lengths in one batch equal each prompt run alone."""
    model = tiny_model()
    x, y = inputs(B=2, T=4, H=6, W=5)
    mask = prompt_mask(3, 10)
    t = [400.0, 400.0]
    out = run(model, x, t, y, mask=mask)
    for i in range(2):
        dup = slice(i, i + 1)
        same = run(model, x[dup].repeat(2, 1, 1, 1, 1), t, y[dup].repeat(2, 1, 1, 1), mask=mask[dup].repeat(2, 1))
        assert torch.equal(out[dup], same[:1])
        alone = run(model, x[dup], t[:1], y[dup], mask=mask[dup])
        torch.testing.assert_close(out[dup], alone, atol=BATCH_ATOL, rtol=0)


def test_bf16_forward() -> None:
    model = tiny_model()
    x, y = inputs(B=2, T=5, H=5, W=9)
    ref = run(model, x, [985.96, 985.96], y, mask=prompt_mask(7))
    out = run(model.to(torch.bfloat16), x, [985.96, 985.96], y, mask=prompt_mask(7))
    assert out.dtype == torch.float32 and out.isfinite().all()
    snr = 10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean())
    assert snr > BF16_MIN_SNR_DB, f"bf16 SNR {snr:.1f} dB"


def test_bf16_quantises_timestep() -> None:
    """The timestep is cast to the model dtype first: in bf16, 985.96 and 984 are the same timestep."""
    model = tiny_model().to(torch.bfloat16)
    x, y = inputs(T=2)
    assert torch.equal(run(model, x, [985.96], y), run(model, x, [984.0], y))
    assert not torch.equal(run(model, x, [985.96], y), run(model, x, [988.0], y))


def test_streams_under_blockrt_with_identical_output() -> None:
    """blockrt streams spatial_blocks[i] + temporal_blocks[i] as one block: same output as the plain model."""
    model = tiny_model()
    x, y = inputs(B=2, T=3)
    kw = {"mask": prompt_mask(6), "num_frames": torch.tensor([1.0]), "ar": torch.tensor([0.56])}
    ref = run(model, x, [500.0, 500.0], y, **kw)
    with blockrt.run(model, budget="16MB") as rt:
        assert [b.name for b in rt.plan.blocks] == ["st_blocks.0", "st_blocks.1"]
        with torch.no_grad():
            out = rt(x, torch.tensor([500.0, 500.0]), y, fps=torch.tensor([24.0]), height=HEIGHT, width=WIDTH, **kw)
    assert torch.equal(out, ref)


def test_forward_needs_size_conditioning() -> None:
    model = tiny_model()
    x, y = inputs()
    with pytest.raises(ValueError, match="fps"):
        model(x, torch.tensor([1.0]), y, height=HEIGHT, width=WIDTH)
    with pytest.raises(ValueError, match="height"):
        model(x, torch.tensor([1.0]), y, fps=FPS, width=WIDTH)


# ------------------------------------------------------------------------------------------------------
# x_mask (I2V): frames with x_mask False use the t=0 modulation
# ------------------------------------------------------------------------------------------------------


def test_x_mask_all_true_is_no_op_and_tiles() -> None:
    model = tiny_model()
    x, y = inputs(B=2, T=3)
    ref = run(model, x, [500.0, 500.0], y, mask=prompt_mask(5))
    all_true = torch.ones(2, 3, dtype=torch.bool)
    assert torch.equal(run(model, x, [500.0, 500.0], y, mask=prompt_mask(5), x_mask=all_true), ref)
    xm = torch.tensor([[False, True, True]])
    mixed = run(model, x, [500.0, 500.0], y, mask=prompt_mask(5), x_mask=xm)
    assert not torch.allclose(mixed, ref)
    assert torch.equal(mixed, run(model, x, [500.0, 500.0], y, mask=prompt_mask(5), x_mask=xm.repeat(2, 1)))


def test_x_mask_t0_is_timestep_zero() -> None:
    """The blocks receive ``t0_mlp = t_block(t_embedder(0) + fps_embedder(fps))``."""
    model = tiny_model()
    x, y = inputs(T=3)
    seen = {}
    hook = model.spatial_blocks[0].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(kwargs), with_kwargs=True
    )
    run(model, x, [500.0], y, x_mask=torch.tensor([[True, False, True]]))
    hook.remove()
    with torch.no_grad():
        fps = model.fps_embedder(torch.tensor([float(FPS)]))
        t0_mlp = model.t_block(model.t_embedder(torch.zeros(1)) + fps)
    assert torch.equal(seen["t0_mlp"], t0_mlp)


@pytest.mark.parametrize("temporal", [False, True])
def test_block_x_mask_selects_per_frame(temporal: bool) -> None:
    """Spatial block: each frame equals the block run with t (x_mask True) or t0 (False). Temporal attention
    mixes frames, so there only the all-False case is separable."""
    model = tiny_model()
    blocks = model.temporal_blocks if temporal else model.spatial_blocks
    block, C, T, S = blocks[0], 64, 4, 6
    g = torch.Generator().manual_seed(3)
    x, yy = torch.randn(2, T * S, C, generator=g), torch.randn(2, L, C, generator=g)
    t_mlp, t0_mlp = torch.randn(2, 6 * C, generator=g), torch.randn(2, 6 * C, generator=g)
    rope = model.rope.cos_sin(T, torch.float32, x.device) if temporal else None
    with torch.no_grad():
        with_t = block(x, yy, t_mlp, T, S, rope=rope)
        with_t0 = block(x, yy, t0_mlp, T, S, rope=rope)
        xm = torch.zeros(2, T, dtype=torch.bool) if temporal else torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0]]).bool()
        out = block(x, yy, t_mlp, T, S, x_mask=xm, t0_mlp=t0_mlp, rope=rope)
    sel = xm[:, :, None, None].expand(2, T, S, C).reshape(2, T * S, C)
    assert torch.equal(out, torch.where(sel, with_t, with_t0))


def test_final_layer_x_mask_follows_original() -> None:
    """Frames with x_mask True: LN(x)·(1+scale)+shift with t. False: the original's t0 branch, which
    normalises the already t-modulated activations."""
    fl = tiny_model().final_layer
    T, S, C = 3, 4, 64
    g = torch.Generator().manual_seed(4)
    x, t, t0 = torch.randn(1, T * S, C, generator=g), torch.randn(1, C, generator=g), torch.randn(1, C, generator=g)
    xm = torch.tensor([[True, False, True]])

    def modulate(h, tt):
        shift, scale = fl.scale_shift_table[0] + tt, fl.scale_shift_table[1] + tt
        return F.layer_norm(h, (C,), eps=1e-6) * (1 + scale) + shift

    with torch.no_grad():
        out = fl(x, t, T, S, x_mask=xm, t0=t0).view(1, T, S, -1)
        h = modulate(x, t)
        expect_t, expect_t0 = fl.linear(h).view(1, T, S, -1), fl.linear(modulate(h, t0)).view(1, T, S, -1)
    torch.testing.assert_close(out[:, [0, 2]], expect_t[:, [0, 2]], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 1], expect_t0[:, 1], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------------
# Numerics by hand from the spec's formulas
# ------------------------------------------------------------------------------------------------------


def test_pos_embed_2d_known_points() -> None:
    H, W, dim = 3, 5, 64
    scale, base = math.sqrt(240 * 426) / 512, round(math.sqrt(H * W))
    pe = pos_embed_2d(H, W, dim, scale=scale, base_size=base, dtype=torch.float32, device=torch.device("cpu"))
    assert pe.shape == (1, H * W, dim)
    q = dim // 4  # frequencies per sin/cos quarter

    for r, c, i in [(1, 2, 0), (2, 4, 3), (0, 3, 15), (2, 1, 7)]:
        f = 1 / 10000 ** (2 * i / (dim // 2))
        x_c, y_r = c / scale * base / W, r / scale * base / H
        expected = [math.sin(x_c * f), math.cos(x_c * f), math.sin(y_r * f), math.cos(y_r * f)]
        got = [pe[0, r * W + c, k * q + i].item() for k in range(4)]
        assert got == pytest.approx(expected, abs=1e-5), (r, c, i)


def test_timestep_embedding_known_points() -> None:
    emb = timestep_sinusoid(torch.tensor([500.0, 0.0]))
    assert emb.shape == (2, 256)
    for k in (0, 1, 64, 127):
        f = math.exp(-math.log(10000) * k / 128)
        assert emb[0, k].item() == pytest.approx(math.cos(500 * f), abs=1e-4)  # cos first
        assert emb[0, 128 + k].item() == pytest.approx(math.sin(500 * f), abs=1e-4)
    assert torch.equal(emb[1], torch.cat([torch.ones(128), torch.zeros(128)]))


def test_rope_rotates_interleaved_pairs() -> None:
    model = tiny_model()
    cos, sin = model.rope.cos_sin(3, torch.float32, torch.device("cpu"))  # (3, 16)
    v = torch.randn(16)
    out = apply_rope(v.expand(3, 16), cos, sin)
    assert torch.equal(out[0], v)  # position 0: identity
    pos, freqs = 2, model.rope.freqs
    for j in range(8):
        th = pos * freqs[j].item()
        x0, x1 = v[2 * j].item(), v[2 * j + 1].item()
        assert out[pos, 2 * j].item() == pytest.approx(x0 * math.cos(th) - x1 * math.sin(th), abs=1e-5)
        assert out[pos, 2 * j + 1].item() == pytest.approx(x1 * math.cos(th) + x0 * math.sin(th), abs=1e-5)


def test_unpatchify_channel_fastest_and_crop() -> None:
    T, H, W, C = 2, 2, 3, 8
    feat = torch.randn(1, T * H * W, 4 * C)
    out = unpatchify(feat, (T, H, W), (1, 2, 2), C, (T, 3, 5))
    assert out.shape == (1, C, T, 3, 5)
    for t, h, w, i, j, c in [(0, 0, 0, 0, 0, 0), (1, 1, 2, 0, 0, 7), (0, 1, 1, 0, 1, 3), (1, 0, 2, 1, 0, 5)]:
        assert out[0, c, t, 2 * h + i, 2 * w + j] == feat[0, (t * H + h) * W + w, (i * 2 + j) * C + c]


def test_patch_embed_pads_at_the_end() -> None:
    emb = tiny_model().x_embedder
    x = torch.randn(1, 4, 1, 3, 5)
    with torch.no_grad():
        ref = emb.proj(F.pad(x, (0, 1, 0, 1))).flatten(2).transpose(1, 2)  # zeros after the last row/column
        assert torch.equal(emb(x), ref)


# ------------------------------------------------------------------------------------------------------
# CUDA (where a GPU is)
# ------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_and_runs_bf16() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = tiny_model()
    x, y = inputs(B=2, T=5, H=7, W=9)
    mask, t, xm = prompt_mask(4, 11), [500.0, 500.0], torch.tensor([[False, True, True, True, True]] * 2)
    ref = run(model, x, t, y, mask=mask, x_mask=xm)
    model = model.cuda()
    out = run(model, x.cuda(), torch.tensor(t).cuda(), y.cuda(), mask=mask.cuda(), x_mask=xm.cuda())
    torch.testing.assert_close(out.cpu(), ref, atol=CUDA_ATOL, rtol=0)
    model = model.to(torch.bfloat16)
    out16 = run(model, x.cuda(), torch.tensor(t).cuda(), y.cuda(), mask=mask.cuda(), x_mask=xm.cuda())
    assert out16.dtype == torch.float32 and out16.isfinite().all()
