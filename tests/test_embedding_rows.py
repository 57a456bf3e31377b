"""Embedding rows on demand (``blockrt/embedding_rows.py``): a large pinned embedding table is read by rows on
each call, with outputs identical to the plain model, less pinned memory, and the ledger still under budget."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import blockrt
from blockrt import BudgetError, RunConfig
from blockrt.embedding_rows import row_streamed_tables
from models import build_toy
from blockrt.partitioners import partition

pytestmark = pytest.mark.timeout(120)

VOCAB, D_MODEL = 32128, 64  # T5's vocabulary: a 8.2 MB float32 table, 64 layers wide to stay fast
TABLE_BYTES = VOCAB * D_MODEL * 4
BUDGET = "256MB"
ROWS = RunConfig(row_stream_min_bytes=1 << 20)
PINNED = RunConfig(row_stream_min_bytes=None)
RSS_SAVING_FRACTION = 0.5  # the table's RSS saving must show at least half its bytes (sampling and heap noise)
PAD = 0


def t5_config():
    from transformers import T5Config

    return T5Config(vocab_size=VOCAB, d_model=D_MODEL, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                    dropout_rate=0.0, pad_token_id=PAD, eos_token_id=1, decoder_start_token_id=0)


def t5_model(seed: int = 0):
    from transformers import T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(t5_config()).eval()


def t5_skeleton():
    from transformers import T5EncoderModel

    with blockrt.meta_weights():
        return T5EncoderModel(t5_config()).eval()


def ids(distinct: bool = True, seed: int = 0) -> torch.Tensor:
    """(2, 16) token ids with padding, repeats, the first and last rows, and adjacent runs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, VOCAB - 1, (2, 16), generator=g)  # (B, T)
    if not distinct:
        return torch.full((2, 16), 7)
    x[0, :3] = torch.tensor([5, 6, 7])  # adjacent rows: one read
    x[0, 3:5] = VOCAB - 1
    x[1, 10:] = PAD  # padding, repeated
    x[1, 0] = x[0, 8]  # a repeat across the batch
    return x


def reference(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).last_hidden_state.clone()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A T5 encoder checkpoint (every tensor once, as HF saves it) and its outputs on ``ids()``."""
    model = t5_model()
    path = tmp_path_factory.mktemp("t5") / "model.safetensors"
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(sd, str(path))
    return path, reference(model, ids()), reference(model, ids(seed=1))


def test_parity_from_checkpoint_on_meta_skeleton(checkpoint):
    path, ref, ref1 = checkpoint
    model = t5_skeleton()
    with blockrt.run(model, BUDGET, weights=path, config=ROWS) as rt:
        assert rt._rows == {"shared.weight": ("shared", "encoder.embed_tokens")}  # two modules, one tensor
        for x, want in ((ids(), ref), (ids(seed=1), ref1), (ids(), ref)):
            assert torch.equal(rt(input_ids=x).last_hidden_state, want)
        assert model.shared.weight.is_meta and model.encoder.embed_tokens.padding_idx is None  # T5 sets none
        held = rt.ledger.held()
        assert held["rows"] == 0 and held["pinned"] == rt.plan.pinned_bytes - TABLE_BYTES
        rows_read = [e for e in rt.profile.events if e.kind == "load" and e.block == "rows:shared.weight"]
        assert len(rows_read) == 3 and rows_read[0].nbytes == ids().unique().numel() * D_MODEL * 4
        summary = rt.profile.summary()
        assert summary.bytes_loaded >= sum(e.nbytes for e in rows_read)


def test_parity_in_memory_and_pinned_bytes_drop():
    model = t5_model()
    ref = reference(model, ids())
    with blockrt.run(model, BUDGET, config=PINNED) as rt:
        assert torch.equal(rt(input_ids=ids()).last_hidden_state, ref)
        pinned_before, peak_before = rt.ledger.held()["pinned"], rt.profile.summary().peak_ledger_bytes
    model = t5_model()
    with blockrt.run(model, BUDGET, config=ROWS) as rt:
        assert torch.equal(rt(input_ids=ids()).last_hidden_state, ref)
        assert model.shared.weight.is_meta  # the user's table went to the store, like the blocks
        pinned_after, peak_after = rt.ledger.held()["pinned"], rt.profile.summary().peak_ledger_bytes
    assert pinned_before - pinned_after == TABLE_BYTES
    assert peak_before - peak_after >= TABLE_BYTES - 64 * D_MODEL * 4  # less the rows a call holds


def test_rss_peak_lower_than_pinned(checkpoint):
    path, ref, _ = checkpoint
    peaks = {}
    for name, config in (("pinned", PINNED), ("rows", ROWS)):
        config = dataclasses.replace(config, exact_rss=True)  # RSS is what is measured: it follows the ledger
        with blockrt.run(t5_skeleton(), BUDGET, weights=path, config=config) as rt:
            for _ in range(3):
                assert torch.equal(rt(input_ids=ids()).last_hidden_state, ref)
            peaks[name] = rt.profile.summary().peak_anon_delta
    assert peaks["pinned"] - peaks["rows"] >= RSS_SAVING_FRACTION * TABLE_BYTES, peaks


def test_tight_budget_more_distinct_ids_later(checkpoint):
    """The rows buffer is sized by the input's shape, so a pass measured with one distinct id covers a later
    pass of the same shape with 32: the ledger stays under a budget a pinned table does not fit in."""
    path, ref, _ = checkpoint
    with blockrt.run(t5_skeleton(), BUDGET, weights=path, config=ROWS) as rt:
        rt(input_ids=ids())
        need = rt.minimum_budget()  # after pass 0: pinned + slots + the measured working set
    assert need < TABLE_BYTES
    with pytest.raises(BudgetError):
        blockrt.run(t5_skeleton(), need, weights=path, config=PINNED)
    model = t5_skeleton()
    with blockrt.run(model, need, weights=path, config=ROWS) as rt:
        same = ids(distinct=False)
        plain_same = rt(input_ids=same).last_hidden_state.clone()  # pass 0 measures with one distinct id
        for _ in range(3):
            assert torch.equal(rt(input_ids=ids()).last_hidden_state, ref)
        assert torch.equal(rt(input_ids=same).last_hidden_state, plain_same)
        assert rt.profile.summary().peak_ledger_bytes <= need


def test_out_of_range_ids_raise_like_torch(checkpoint):
    path, ref, _ = checkpoint
    bad = ids().clone()
    bad[0, 0] = VOCAB
    with pytest.raises(IndexError):
        reference(t5_model(), bad)  # what the plain model does
    with blockrt.run(t5_skeleton(), BUDGET, weights=path, config=ROWS) as rt:
        with pytest.raises(IndexError, match=f"has {VOCAB} rows"):
            rt(input_ids=bad)
        bad[0, 0] = -1
        with pytest.raises(IndexError, match="index out of range"):
            rt(input_ids=bad)
        assert rt.ledger.held()["rows"] == 0
        assert torch.equal(rt(input_ids=ids()).last_hidden_state, ref)  # still usable


def test_padding_idx_kept_and_bfloat16_checkpoint_widens(tmp_path):
    """An Embedding with padding_idx (restored after each call) streamed from a bfloat16 checkpoint into a
    float32 model gives the plain model's output on the bfloat16-rounded table."""
    model, inputs = build_toy(vocab=4096, max_len=64)
    with torch.no_grad():
        model.pos_emb.weight.copy_(model.pos_emb.weight.to(torch.bfloat16).float())
    model.pos_emb.padding_idx = 3
    with torch.no_grad():
        ref = model(**inputs)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "head.weight"}
    sd["pos_emb.weight"] = sd["pos_emb.weight"].to(torch.bfloat16)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with blockrt.meta_weights():
        skeleton, _ = build_toy(vocab=4096, max_len=64)
    skeleton.pos_emb.padding_idx = 3
    with blockrt.run(skeleton, BUDGET, weights=tmp_path, config=RunConfig(row_stream_min_bytes=0)) as rt:
        assert set(rt._rows) == {"pos_emb.weight"}
        assert torch.equal(rt(**inputs), ref)
        assert skeleton.pos_emb.padding_idx == 3 and skeleton.pos_emb.weight.is_meta


def test_tied_lm_head_keeps_table_pinned():
    model, inputs = build_toy()
    plan = partition(model, target_bytes=None)
    assert plan.aliases == {"head.weight": "tok_emb.weight"}
    assert "tok_emb.weight" not in row_streamed_tables(model, plan, 0)  # the head is a Linear
    assert set(row_streamed_tables(model, plan, 0)) == {"pos_emb.weight"}
    assert row_streamed_tables(model, plan, None) == {}
    big = model.pos_emb.weight.numel() * 4 + 1
    assert row_streamed_tables(model, plan, big) == {}
    with torch.no_grad():
        ref = model(**inputs)
    with blockrt.run(model, BUDGET, config=RunConfig(row_stream_min_bytes=0)) as rt:
        assert torch.equal(rt(**inputs), ref)
        assert not model.tok_emb.weight.is_meta  # pinned, read whole as before


@pytest.mark.parametrize("bad", [-1, True, 1.5, "16MB"])
def test_config_validation(bad):
    with pytest.raises(ValueError, match=r"row_stream_min_bytes must be an int >= 0 \(0 = read every eligible "
                                         r"embedding table by rows\) or None \(keep every table pinned\); got"):
        RunConfig(row_stream_min_bytes=bad)
