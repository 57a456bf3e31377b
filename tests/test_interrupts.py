"""Every way a pass can end leaves the process as it was and the next call correct: a ``KeyboardInterrupt``
raised inside a block (and at random moments by a real SIGINT), a ``BudgetError`` while a traceback still
holds a weight, two threads calling one runtime; and the smallest budget an error names is one that runs."""

from __future__ import annotations

import re
import signal
import threading
import time

import pytest
import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import _get_current_dispatch_mode

import blockrt
from blockrt import BudgetError, RunConfig
from blockrt.partitioners import partition

from models import build_toy

N_THREADS = 2
CALLS_PER_THREAD = 6
RANDOM_INTERRUPTS = 25
THREAD_TIMEOUT_S = 120


def reference(model, inputs):
    with torch.no_grad():
        return model(**inputs).clone()


def budget_for(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) // 2 + (4 << 20)


def clean_process() -> None:
    """No dispatch mode left on the stack, and an unrelated 16 MB allocation works."""
    assert _get_current_dispatch_mode() is None
    x = torch.zeros(4 << 20)
    assert x.sum().item() == 0


def interrupt_in(module: torch.nn.Module, armed: dict) -> None:
    """A forward pre-hook that raises ``KeyboardInterrupt`` (as Ctrl-C does) when ``armed["on"]``."""
    def hook(mod, args):
        if armed["on"]:
            armed["on"] = False
            raise KeyboardInterrupt
    module.register_forward_pre_hook(hook)


@pytest.mark.parametrize("where", ["first_layer_inner", "middle_layer_inner", "last_layer_inner", "head"])
@pytest.mark.parametrize("when", [0, 1, 3])  # measuring memory, measuring time, steady (retention planned)
def test_keyboard_interrupt_inside_a_pass_leaves_no_trace(where, when):
    model, inputs = build_toy(0)
    ref = reference(model, inputs)
    armed = {"on": False}
    target = {"first_layer_inner": model.layers[0].mlp, "middle_layer_inner": model.layers[4].attn.qkv,
              "last_layer_inner": model.layers[-1].mlp[2], "head": model.head}[where]
    interrupt_in(target, armed)
    rt = blockrt.run(model, budget=budget_for(model))
    with rt:
        for _ in range(when):
            assert torch.equal(rt(**inputs), ref)
        armed["on"] = True
        with pytest.raises(KeyboardInterrupt):
            rt(**inputs)
        clean_process()
        for _ in range(4):  # the next calls are right, through measuring and retention
            assert torch.equal(rt(**inputs), ref)
        assert rt.ledger.peak <= rt.budget
    clean_process()
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert not rt._loader._thread.is_alive()


def test_keyboard_interrupt_when_the_model_is_called_directly():
    """Called as ``model(...)`` (not through the runtime) the interrupted pass is cleaned at the next call."""
    model, inputs = build_toy(0)
    ref = reference(model, inputs)
    armed = {"on": False}
    interrupt_in(model.layers[3].mlp, armed)
    with blockrt.run(model, budget=budget_for(model)) as rt, torch.no_grad():
        assert torch.equal(model(**inputs), ref)
        armed["on"] = True
        with pytest.raises(KeyboardInterrupt):
            model(**inputs)
        for _ in range(3):
            assert torch.equal(model(**inputs), ref)
        assert torch.equal(rt(**inputs), ref)
    clean_process()


def _sigint_after(delay_s: float) -> None:
    signal.signal(signal.SIGALRM, signal.default_int_handler)  # the alarm raises KeyboardInterrupt, as Ctrl-C does
    signal.setitimer(signal.ITIMER_REAL, delay_s)


def _no_alarm() -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)


def test_random_sigint_never_leaves_a_wrong_output_or_a_tracker(tmp_path):
    """Real Ctrl-C at random moments of the first (measuring) and later passes, inside blockrt's own code too:
    the next call is right and no dispatch mode is left behind."""
    model, inputs = build_toy(0, n_layers=6)
    ref = reference(model, inputs)
    state = model.state_dict()
    save_file({k: state[k].contiguous() for k in partition(model).all_specs()}, tmp_path / "model.safetensors")
    rng = torch.Generator().manual_seed(0)
    hits = 0
    for k in range(RANDOM_INTERRUPTS):
        with blockrt.meta_weights():
            skeleton = build_toy(0, n_layers=6)[0]
        with blockrt.run(skeleton, budget=budget_for(model), weights=tmp_path) as rt:
            t0 = time.perf_counter()
            if k % 2:  # odd rounds: interrupt a later pass, after one full measuring pass
                rt(**inputs)
            one_pass = max(time.perf_counter() - t0, 1e-3)
            try:
                _sigint_after(float(torch.rand((), generator=rng)) * one_pass * 1.2 + 1e-5)
                rt(**inputs)
            except KeyboardInterrupt:
                hits += 1
            finally:
                _no_alarm()
            assert _get_current_dispatch_mode() is None
            assert torch.is_grad_enabled()  # the caller's grad mode is back, wherever the interrupt landed
            for _ in range(2):
                assert torch.equal(rt(**inputs), ref)
    clean_process()
    assert hits > 0


def test_two_threads_calling_one_runtime_are_serialised():
    """Calls from two threads at once wait for each other: every output is right and nobody hangs."""
    model, inputs = build_toy(0)
    ref = reference(model, inputs)
    barrier = threading.Barrier(N_THREADS)
    results: list[bool] = []
    errors: list[BaseException] = []
    with blockrt.run(model, budget=budget_for(model)) as rt:
        def worker():
            try:
                barrier.wait()
                for _ in range(CALLS_PER_THREAD):
                    results.append(torch.equal(rt(**inputs), ref))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
        threads = [threading.Thread(target=worker) for _ in range(N_THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(THREAD_TIMEOUT_S)
        assert not any(t.is_alive() for t in threads), "a thread hung"
        assert not errors, errors
        assert results == [True] * (N_THREADS * CALLS_PER_THREAD)
        assert rt.ledger.peak <= rt.budget


def _named_budget(e: BudgetError) -> int:
    m = re.search(r"\((\d+) bytes\)", str(e))  # the figure an error names, e.g. "1.69 MB (1685504 bytes)"
    assert m, str(e)
    return int(m.group(1))


def test_the_smallest_budget_named_runs():
    """Start far too low; each BudgetError names a budget; the one named after activations were measured runs."""
    model = build_toy(0, dim=128, n_layers=4, max_len=64)[0]  # one model: each closed run gives its weights back
    ids = torch.randint(0, 128, (8, 64))  # activations larger than a block
    with torch.no_grad():
        ref = model(ids).clone()
    budget, named = 10_000, []
    for _ in range(3):
        try:
            with blockrt.run(model, budget=budget, config=RunConfig(retention=False)) as rt:
                assert torch.equal(rt(ids), ref)
                assert torch.equal(rt(ids), ref)
            break
        except BudgetError as e:
            assert _named_budget(e) > budget
            budget = _named_budget(e)
            named.append(budget)
    else:
        pytest.fail(f"still refused after the budgets named: {named}")
    assert len(named) == 2  # the set-up floor (before activations), then floor + the measured working set
    clean_process()


def test_an_error_inside_a_block_while_a_view_holds_a_weight_is_not_masked():
    """An error raised inside a block (a BudgetError here) while something still holds a view of one of its
    weights (a traceback's frame can) comes out as itself, not as a swap_tensors use_count error; the next
    call is right, and close() stops the loader."""
    model, inputs = build_toy(0)
    ref = reference(model, inputs)
    held, armed = [], {"on": False}

    def keep_view(mod, args):
        held.append(mod.weight.t())

    def fail(mod, args):
        if armed["on"]:
            armed["on"] = False
            raise BudgetError("activations of block 'layers.2' need more than the budget (raised by the test)")
    model.layers[2].mlp[0].register_forward_pre_hook(keep_view)
    model.layers[2].mlp[2].register_forward_pre_hook(fail)
    rt = blockrt.run(model, budget=budget_for(model))
    try:
        assert torch.equal(rt(**inputs), ref)
        held.clear()
        armed["on"] = True
        with pytest.raises(BudgetError, match="raised by the test"):
            rt(**inputs)
        held.clear()
        for _ in range(3):
            assert torch.equal(rt(**inputs), ref)
            held.clear()
    finally:
        rt.close()
    assert not rt._loader._thread.is_alive()
    clean_process()
