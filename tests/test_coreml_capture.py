"""Capturing blocks from one pass (``capture_blocks``) and exporting a whole model (``export_model``).

Replays must reproduce the recorded block outputs bit for bit (``torch.equal``) for every tiny model; a
tiny T5 encoder (position_bias passed between blocks as a kwarg) and the toy transformer export every
block, in memory and streamed from a checkpoint onto a meta skeleton, where only the block being
converted has its weights bound.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("coremltools")

import blockrt  # noqa: E402
from blockrt.coreml import ExportError, ExportOptions, capture_blocks, export_model, inspect_package, read_manifest  # noqa: E402
from blockrt.coreml.capture import PINNED  # noqa: E402
from models import BUILDERS, build_toy  # noqa: E402
from blockrt.partitioners import partition  # noqa: E402
from blockrt.partitioners.registry import layer_partitioner  # noqa: E402

SEQ_RANGE = (1, 32)


def tiny_t5(seed: int = 0):
    """T5EncoderModel with d_model 32 and 2 layers, and its inputs (batch 1, 8 tokens)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    ids = torch.randint(2, 64, (1, 8), generator=torch.Generator().manual_seed(seed))
    return T5EncoderModel(cfg).eval(), {"input_ids": ids}


def checkpoint(model, path):
    """The model's owned tensors (tied ones once) as one safetensors file."""
    sd = model.state_dict()
    save_file({k: sd[k].contiguous() for k in partition(model).all_specs()}, path)
    return path


def t5_flexible(cb) -> dict:
    """Sequence length flexible in T5's hidden states (B, L, D) and position bias (1, H, L, L)."""
    return {"hidden_states": (1, SEQ_RANGE, 32), "position_bias": (1, 4, SEQ_RANGE, SEQ_RANGE)}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_replays_reproduce_every_block_bit_for_bit(name) -> None:
    model, inputs = BUILDERS[name]()
    captured = capture_blocks(model, (), inputs)
    plan = partition(model, partitioner=layer_partitioner(type(model)))
    assert [cb.block.name for cb in captured] == [b.name for b in plan.blocks]
    for cb in captured:
        assert cb.replay_equal(), (name, cb.name)
        assert len(cb.example_inputs) == len(cb.input_names) == len(cb.sources)
    for prev, cb in zip(captured, captured[1:]):  # each block's main input is the previous block's output
        assert cb.sources[0] == f"{prev.name}.{prev.output_names[0]}"
    assert captured[0].sources[0].startswith(PINNED)  # the embeddings are computed outside the blocks


def test_t5_position_bias_is_an_output_of_block_0_and_an_input_of_the_others() -> None:
    model, inputs = tiny_t5()
    b0, b1 = capture_blocks(model, (), inputs)
    assert b0.input_names == ("hidden_states",) and b0.output_names == ("hidden_states_out", "position_bias")
    assert b1.input_names == ("hidden_states", "position_bias")
    assert b1.sources == ("encoder_block_0.hidden_states_out", "encoder_block_0.position_bias")
    assert b1.output_names == ("hidden_states_out",)  # the bias passed straight through is not re-exported
    assert b1.example_inputs[1] is b0.expected_outputs[1]


class SumOfLayers(torch.nn.Module):
    """Every layer's output is also summed by the model's own code: a use outside the blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 8)
        total = torch.zeros_like(x)
        for layer in self.layers:
            x = layer(x)
            total = total + x
        return total


def test_intermediate_outputs_used_outside_a_multi_layer_block_are_outputs() -> None:
    torch.manual_seed(0)
    model = SumOfLayers().eval()
    plan = partition(model, target_bytes=2 * (8 * 8 + 8) * 4)  # two layers per block
    assert [b.modules for b in plan.blocks] == [("layers.0", "layers.1"), ("layers.2", "layers.3")]
    b0, b1 = capture_blocks(model, (torch.randn(2, 8),), plan=plan)
    assert len(b0.output_names) == 2 and len(b1.output_names) == 2  # layer 0's output is read by `total + x`
    assert b0.expected_outputs[0].shape == (2, 8) and b1.sources == (f"{b0.name}.{b0.output_names[1]}",)
    assert b0.sources == ("input:x",)  # the model's own argument
    assert b0.replay_equal() and b1.replay_equal()


def test_blocks_called_out_of_order_are_refused() -> None:
    model, inputs = build_toy(n_layers=2)
    layers = model.layers
    model.layers = torch.nn.ModuleList([layers[0], layers[1], layers[0]])  # layer 0 runs again after layer 1
    plan = partition(build_toy(n_layers=2)[0])
    with pytest.raises(ExportError, match="called again after"):
        capture_blocks(model, (), inputs, plan=plan)


@pytest.fixture(scope="module")
def t5_export(tmp_path_factory):
    model, inputs = tiny_t5()
    d = tmp_path_factory.mktemp("t5") / "export"
    manifest = export_model(model, (), inputs, d, ExportOptions(precision="fp32"), flexible=t5_flexible)
    return model, inputs, d, manifest


def test_t5_export_every_block_with_wiring_and_ranges(t5_export) -> None:
    model, inputs, d, manifest = t5_export
    assert read_manifest(d).to_dict() == manifest.to_dict()
    assert [p.name for p in manifest.packages] == ["encoder_block_0", "encoder_block_1"]
    assert manifest.wiring == {"encoder_block_0.hidden_states": "pinned:hidden_states",
                               "encoder_block_1.hidden_states": "encoder_block_0.hidden_states_out",
                               "encoder_block_1.position_bias": "encoder_block_0.position_bias"}
    assert "shared.weight" in manifest.pinned and "encoder.final_layer_norm.weight" in manifest.pinned
    for p in manifest.packages:
        assert p.checks["expected_equal"] is True and p.checks["trace_equal"] is True
        info = inspect_package(d / p.file)
        assert [t.name for t in info.inputs] == [t.name for t in p.inputs]
        assert [t.name for t in info.outputs] == [t.name for t in p.outputs]
        assert info.input("hidden_states").shape == (1, SEQ_RANGE, 32)
    assert inspect_package(d / "encoder_block_1.mlpackage").input("position_bias").shape == (1, 4, SEQ_RANGE, SEQ_RANGE)
    assert manifest.extra["model_class"].endswith("T5EncoderModel")


def test_streamed_skeleton_exports_the_same_packages_one_block_at_a_time(t5_export, tmp_path) -> None:
    model, inputs, d_mem, mem = t5_export
    path = checkpoint(model, tmp_path / "model.safetensors")
    with blockrt.meta_weights():
        skeleton, _ = tiny_t5()
    plan = partition(skeleton)
    bound_at_progress = []

    def progress(done: int, total: int, name: str) -> None:
        real = [b.name for b in plan.blocks
                if any(not skeleton.get_parameter(t.key).is_meta for t in b.tensors)]
        bound_at_progress.append(real)

    manifest = export_model(skeleton, (), inputs, tmp_path / "export", ExportOptions(precision="fp32"),
                            weights=path, flexible=t5_flexible, progress=progress)
    assert bound_at_progress == [["encoder.block.0"], ["encoder.block.1"]]  # one block's weights at a time
    assert all(p.is_meta for b in plan.blocks for t in b.tensors for p in [skeleton.get_parameter(t.key)])
    for p, q in zip(manifest.packages, mem.packages):
        assert p.checks["expected_equal"] is True
        assert p.inputs == q.inputs and p.outputs == q.outputs and p.weight_bytes == q.weight_bytes
        weights = "Data/com.apple.CoreML/weights/weight.bin"
        assert (tmp_path / "export" / p.file / weights).read_bytes() == (d_mem / q.file / weights).read_bytes()


def test_toy_export_int8_through_a_runtime(tmp_path) -> None:
    model, inputs = build_toy(n_layers=2)
    with blockrt.run(model, budget=1 << 30, partitioner=layer_partitioner(type(model))) as rt:  # a layer a block
        manifest = export_model(rt, (), inputs, tmp_path / "export", ExportOptions(quantize="int8"))
        out = rt(**inputs)  # the runtime still works afterwards
    assert [p.name for p in manifest.packages] == ["layers_0", "layers_1"]
    assert manifest.wiring == {"layers_0.x": "pinned:x", "layers_1.x": "layers_0.x_out"}
    for p in manifest.packages:
        assert p.checks["expected_equal"] is True and p.quantization == "int8"
        assert inspect_package(tmp_path / "export" / p.file).has_quantized_weights
    with torch.no_grad():
        assert torch.equal(out, build_toy(n_layers=2)[0](**inputs))


def test_in_memory_model_on_meta_without_weights_is_a_clear_error(tmp_path) -> None:
    with blockrt.meta_weights():
        skeleton, inputs = tiny_t5()
    with pytest.raises(ExportError, match="weights="):
        export_model(skeleton, (), inputs, tmp_path / "export")
    assert not (tmp_path / "export").exists()
