"""The ``blockrt`` command line: thin wrappers over the Python API (the only place that prints).

Every command checks its arguments and the optional packages it needs before doing any work; any
``BlockrtError`` (and any bad value) ends the command with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from blockrt.budget import format_bytes, parse_budget
from blockrt.config import RunConfig
from blockrt.device import IPHONE15PRO, get_profile, resolve_budget
from blockrt.errors import BlockrtError
from blockrt.runtime import run
from blockrt.version import __version__

# what each optional package is for, and the extra that installs it
_EXTRAS = {"matplotlib": "plot", "av": "video", "transformers": "hf", "diffusers": "hf", "sentencepiece": "hf",
           "google.protobuf": "hf", "ftfy": "hf", "coremltools": "coreml", "ray": "sweep", "PIL": "sweep"}


def _count(low: int):
    """An argparse type: an int >= ``low`` (argparse then prints the usage and exits 2 on anything else)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}; got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}; got {value}")
        return value
    parse.__name__ = f"int >= {low}"
    return parse


def _leap(text: str) -> int | str:
    """``--lpl``: the model calls before the leap (the paper: 16 of 30), or ``dynamic``."""
    if text == "dynamic":
        return text
    try:
        return _count(1)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected the model calls before the leap (the paper: 16 of 30 steps) "
                                         f"or 'dynamic'; got {text!r}") from None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing ("google.protobuf")
        return False


def require(command: str, *modules: str) -> None:
    """Fail before any work when an optional package ``command`` needs is missing, naming the pip command."""
    missing = [m for m in modules if not _installed(m)]
    if missing:
        extras = sorted({_EXTRAS.get(m, "all") for m in missing})
        raise BlockrtError(f"blockrt {command} needs {', '.join(missing)}, which is not installed; fix: "
                           f"pip install 'blockrt[{','.join(extras)}]' (or 'blockrt[all]')")


def _sayer(args: argparse.Namespace) -> Any:
    """``say(text, err=False)``: a line for the user, unless ``--quiet``; on stderr with ``err`` or ``--json``."""
    def say(text: str, err: bool = False) -> None:
        if not args.quiet:
            print(text, file=sys.stderr if err or getattr(args, "json", False) else sys.stdout)
    return say


def _demo(args: argparse.Namespace) -> int:
    import gc

    from safetensors.torch import save_file

    from blockrt.partitioners import partition
    from blockrt.pipelines.toy import ToyConfig, ToyTransformer

    from blockrt.skeleton import meta_weights

    say = _sayer(args)
    budget, _ = resolve_budget(args.budget)  # a bad budget fails before the model is built or anything written
    if args.dim % 8:
        raise ValueError(f"--dim must be divisible by the 8 heads; got {args.dim}")
    require("demo", "matplotlib")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = ToyConfig(vocab=1024, dim=args.dim, n_layers=args.layers, n_heads=8, max_len=args.tokens)
    model = ToyTransformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab, (1, args.tokens))
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad():
        model(ids)  # warm-up
        t0 = time.perf_counter()
        ref = model(ids)
        resident_s = time.perf_counter() - t0
    out_dir = Path(args.out)
    weights = out_dir / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    save_file({k: state[k].contiguous() for k in partition(model).all_specs()}, weights / "model.safetensors")
    del model, state
    gc.collect()
    with meta_weights():  # the streamed model is never materialised: its weights come from the checkpoint
        skeleton = ToyTransformer(cfg).eval()
    bps = None if args.read_gbps <= 0 else args.read_gbps * 1e9
    config = RunConfig(prefetch_depth=args.prefetch, read_bytes_per_s=bps, exact_rss=True)  # the CLI owns its process
    say(f"toy transformer: {cfg.n_layers} layers x dim {cfg.dim}, {format_bytes(model_bytes)} of fp32 weights "
          f"in {weights / 'model.safetensors'}; budget {format_bytes(budget)}; loader throttled to "
          f"{'disk speed' if bps is None else f'{bps / 1e9:.2f} GB/s (iPhone 15 Pro flash)'}")
    with run(skeleton, budget=args.budget, weights=weights, config=config) as rt:
        same = all(torch.equal(rt(ids), ref) for _ in range(args.passes))
        say(str(rt.profile))
        say(f"working set (measured, pass 0): {format_bytes(rt.retention.working_set_bytes)}; "
              f"ledger by kind: {', '.join(f'{k} {format_bytes(v)}' for k, v in rt.ledger.held().items() if v)}")
        if rt.retention.decision is not None:
            say(str(rt.retention))
        say(f"  resident (plain model)   {resident_s * 1e3:.1f} ms per pass, whole model in memory")
        say(f"outputs identical to the plain model (torch.equal): {'yes' if same else 'NO'}")
    rt.profile.save_trace(out_dir / "trace.json")
    rt.profile.plot(out_dir / "timeline.png")
    say(f"wrote {out_dir / 'trace.json'} (open in https://ui.perfetto.dev) and {out_dir / 'timeline.png'}")
    return 0 if same else 1


def _plan(args: argparse.Namespace) -> int:
    if args.weights is not None:
        require("plan --weights", "transformers", "diffusers", "huggingface_hub")
        from blockrt.pipelines.cli_plan import plan_model

        return plan_model(args)
    from blockrt.partitioners import partition
    from blockrt.pipelines.cli_plan import print_sweep
    from blockrt.pipelines.toy import ToyConfig, ToyTransformer

    from blockrt.planning import block_flops, flop_timings, plan_sweep
    from blockrt.skeleton import meta_weights

    profile = get_profile(args.profile)
    budgets = [parse_budget(b) for b in args.budgets.split(",")] if args.budgets else None
    ws = parse_budget(args.working_set) if args.working_set else 0
    with meta_weights():
        model = ToyTransformer(ToyConfig(vocab=1024, dim=args.dim, n_layers=args.layers, n_heads=8, max_len=args.tokens))
    plan = partition(model)
    flops, pinned_flops = block_flops(model, plan, (torch.zeros(1, args.tokens, dtype=torch.long),))
    timings, head = flop_timings(plan, flops, pinned_flops, profile)
    print(f"plan for the demo transformer ({args.layers} layers x dim {args.dim}, {args.tokens} tokens) on "
          f"{profile.name}: {len(plan.blocks)} blocks of {format_bytes(plan.largest_block().nbytes)}, "
          f"{format_bytes(plan.pinned_bytes)} pinned; per block {flops[0] / 1e9:.2f} GFLOP = "
          f"{timings[0].compute_s * 1e3:.1f} ms compute vs {timings[0].load_s * 1e3:.1f} ms load at "
          f"{profile.read_bytes_per_s / 1e9:.2f} GB/s; working set assumed {format_bytes(ws)}")
    print_sweep(plan_sweep(timings, pinned_bytes=plan.pinned_bytes, working_set_bytes=ws,
                           prefetch_depth=args.prefetch, head_s=head, budgets=budgets, points=args.points))
    return 0


def _export(args: argparse.Namespace) -> int:
    require("export coreml", "coremltools", "transformers", "diffusers")
    from blockrt.pipelines.opensora.coreml_export import MODELS, export_opensora, tiny_random_weights

    from blockrt.coreml import ExportError, ExportOptions

    if args.weights is None:
        weights = tiny_random_weights(Path(args.cache))
        _sayer(args)(f"no --weights given: exporting tiny RANDOM weights in the real layout ({weights})")
    else:
        weights = Path(args.weights)
    quantize = None if args.quantize in (None, "none") else args.quantize
    t5_quantize = "int8" if args.quantize is None else quantize  # T5 is int8 unless --quantize says otherwise
    models = tuple(m for m in args.models.split(",") if m) if args.models else MODELS
    bar: list = []

    def progress(done: int, total: int, name: str) -> None:
        if args.no_progress or args.quiet:
            return
        if not bar:
            from tqdm import tqdm

            bar.append(tqdm(total=total, desc="coreml export", unit="package"))
        bar[0].set_postfix_str(name)
        bar[0].update(done - bar[0].n)

    t0 = time.perf_counter()
    try:
        manifest = export_opensora(weights, args.out, models, ExportOptions(precision=args.precision, quantize=quantize),
                                   t5_quantize=t5_quantize, resolution=args.resolution, aspect=args.aspect,
                                   frames=args.frames, tdtm=not args.no_tdtm, progress=progress, overwrite=args.overwrite)
    except ExportError as e:
        print(f"blockrt: error: {e}", file=sys.stderr)
        return 2
    finally:
        if bar:
            bar[0].close()
    print(f"{'package':<24} {'MB':>9} {'weights':>8} {'quant':>6} {'export s':>9}  same as PyTorch original")
    for p in manifest.packages:
        parity = p.meta.get("parity") or {}
        same = {True: "yes", False: f"no (max abs {parity.get('max_abs_error')})"}.get(parity.get("equal"), "-")
        fns = " [+tdtm function]" if "functions" in p.meta else ""
        print(f"{p.name:<24} {p.bytes / 1e6:>9.2f} {p.weight_bytes / 1e6:>8.2f} {p.quantization or '-':>6} "
              f"{p.seconds.get('total_s', 0):>9.2f}  {same}{fns}")
    print(f"{len(manifest.packages)} packages, {manifest.total_bytes / 1e6:.1f} MB, {args.precision}, in "
          f"{time.perf_counter() - t0:.1f} s: {Path(args.out) / 'export.json'}")
    return 0


_GENERATE_NEEDS = ("transformers", "diffusers", "sentencepiece", "google.protobuf", "ftfy", "av")


def _generate(args: argparse.Namespace) -> int:
    from blockrt.pipelines.cli_generate import generate
    from blockrt.pipelines.progress import StageProgress

    if args.workers is not None or args.address is not None:
        from blockrt.pipelines.cli_sweep import generate_sweep

        require("generate --workers", *_GENERATE_NEEDS, "PIL", *(["ray"] if args.workers or args.address else []))
        return generate_sweep(args, _sayer(args))
    require("generate", *_GENERATE_NEEDS, *(["matplotlib"] if args.trace else []))
    progress = StageProgress(enabled=not (args.quiet or args.no_progress))
    try:
        return generate(args, _sayer(args), progress)
    finally:
        progress.close()


def _sweep(args: argparse.Namespace) -> int:
    from blockrt.pipelines.cli_sweep import sweep

    require("sweep", *_GENERATE_NEEDS, "PIL", *(["ray"] if args.workers or args.address else []))
    return sweep(args, _sayer(args))


def _parser() -> argparse.ArgumentParser:
    from blockrt.pipelines.shapes.layout import CFG_SCALE  # the built-in model's; imported where it is used

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="log what blockrt does (-vv: debug)")
    common.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors (and --json)")
    common.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")
    parser = argparse.ArgumentParser(prog="blockrt", description="Run models larger than memory, block by block.")
    parser.add_argument("--version", action="version", version=f"blockrt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", parents=[common],
                          help="stream a built-in transformer under a small budget and show the timeline")
    demo.add_argument("--out", default="out/toy-demo", help="directory for trace.json and timeline.png")
    demo.add_argument("--budget", default="64MB", help="memory budget, e.g. 64MB, 1GiB")
    demo.add_argument("--layers", type=_count(1), default=12)
    demo.add_argument("--dim", type=_count(8), default=512, help="model width (a multiple of 8 heads)")
    demo.add_argument("--tokens", type=_count(1), default=256)
    demo.add_argument("--passes", type=_count(1), default=5)
    demo.add_argument("--prefetch", type=_count(0), default=1, help="prefetch depth (0 = sequential loading)")
    demo.add_argument("--read-gbps", type=float, default=IPHONE15PRO.read_bytes_per_s / 1e9,
                      help="throttle loads to this many GB/s (0 = disk speed)")
    demo.add_argument("--threads", type=_count(1), default=2, help="torch compute threads")
    plan = sub.add_parser("plan", parents=[common],
                          help="predict sequential / concurrent / retention pass times over budgets "
                               "(paper Eq. 10/11) from FLOPs and a device profile, without running")
    plan.add_argument("--weights", default=None,
                      help="a transformers/diffusers model: a local directory or a repo id in the local Hugging Face "
                           "cache (default: the built-in demo transformer, sized by --layers/--dim)")
    plan.add_argument("--subfolder", default=None, help="the model's folder in a diffusers pipeline (transformer, unet)")
    plan.add_argument("--profile", default="iphone15pro", help="device profile (iphone15pro, laptop-nvme, ...)")
    plan.add_argument("--budgets", default=None, help="comma-separated budgets, e.g. 64MB,128MB (default: a sweep)")
    plan.add_argument("--points", type=_count(2), default=8, help="budgets in the default sweep")
    plan.add_argument("--prefetch", type=_count(0), default=1)
    plan.add_argument("--working-set", default=None, help="activation bytes to reserve, e.g. 20MB (default 0)")
    plan.add_argument("--layers", type=_count(1), default=12)
    plan.add_argument("--dim", type=_count(8), default=512)
    plan.add_argument("--tokens", type=_count(1), default=256, help="tokens of the example pass (FLOPs): the "
                      "prompt's for a language model, the text embeddings' for a diffusers denoiser")
    plan.add_argument("--height", type=_count(8), default=512, help="pixels of the example image or video "
                      "(diffusers models)")
    plan.add_argument("--width", type=_count(8), default=512)
    plan.add_argument("--frames", type=_count(1), default=1, help="frames of the example video (video models)")
    gen = sub.add_parser("generate", parents=[common],
                         help="text to video with Open-Sora v1.2 (T5 -> STDiT3 -> VAE) under one budget")
    gen.add_argument("--prompt", default=None, help="the text (default with the built-in model: "
                                                    "'a red circle moving right on a blue background')")
    gen.add_argument("--prompts", default=None, help="a text file, one prompt a line: one video each")
    gen.add_argument("--weights", default=None, help="directory with t5-v1_1-xxl/, OpenSora-STDiT-v3/, "
                                                     "OpenSora-VAE-v1.2/ (default: the small model trained on "
                                                     "synthetic shapes, shipped in pipelines/shapes/weights)")
    gen.add_argument("--random-weights", action="store_true", help="tiny random weights instead (noise videos)")
    gen.add_argument("--cache", default="out/weights/random/demo", help="where --random-weights are written")
    gen.add_argument("--resolution", default=None, help="preset (default: 64x64 with the built-in model, else 144p)")
    gen.add_argument("--aspect", default=None, help="H:W (default: 1:1 with the built-in model, else 3:4)")
    gen.add_argument("--frames", type=_count(1), default=None,
                     help="video length in frames (default: 33 with the built-in model, its clips; else 17)")
    gen.add_argument("--steps", type=_count(1), default=30)
    gen.add_argument("--cfg", type=float, default=None,
                     help=f"CFG scale (default: 7.0, Open-Sora's; {CFG_SCALE} for the built-in shapes model)")
    gen.add_argument("--seed", type=int, default=42)
    gen.add_argument("--lpl", type=_leap, default=None,
                     help="LPL: model calls before one leap to t=0 (the paper: 16 of 30), or 'dynamic'")
    gen.add_argument("--tdtm", type=_count(0), default=0,
                     help="merge frame pairs for N steps (the first N; --tdtm-when last: the last N)")
    gen.add_argument("--tdtm-positions", choices=("index", "centre"), default="index",
                     help="RoPE positions of merged frames: index 0..T'-1 (the paper's) or centre 2g+0.5")
    gen.add_argument("--tdtm-blocks", choices=("all", "spatial", "temporal"), default="all",
                     help="which blocks merge frames (the paper: all)")
    gen.add_argument("--tdtm-when", choices=("first", "last"), default="first",
                     help="merge in the first N steps (the paper's) or the last N")
    gen.add_argument("--budget", default="64MB", help="one budget for the whole run (3.3GB for the phone)")
    gen.add_argument("--device-profile", default=None, help="throttle loads like this device (iphone15pro)")
    gen.add_argument("--out", default="out/generate")
    gen.add_argument("--trace", action="store_true", help="also write trace.json and timeline.png of the run")
    gen.add_argument("--json", action="store_true", help="print the run's record (profile summary per stage) as "
                                                         "JSON on stdout; the human lines go to stderr")
    gen.add_argument("--workers", type=_count(0), default=None,
                     help="with --prompts: run the videos as a resumable sweep (see 'blockrt sweep') on N local Ray "
                          "workers (0: serially, still resumable)")
    gen.add_argument("--address", default=None, help="with --prompts: run the sweep on this Ray cluster (auto, "
                                                     "HOST:6379, ray://HOST:10001)")
    sw = sub.add_parser("sweep", parents=[common],
                        help="prompts x seeds x settings as independent, resumable tasks, serially or on Ray; "
                             "then a summary, contact sheets and quality scores")
    sw.add_argument("spec", help="a JSON sweep spec (pipelines/sweep/spec.py) or a preset: quality144, quality144-steps30, "
                                 "quality-small, smoke")
    sw.add_argument("--out", default=None, help="the sweep's folder (default out/sweep/<spec name>); the same "
                                                "folder resumes it")
    sw.add_argument("--workers", type=_count(0), default=0, help="local Ray workers (0: serially in this process)")
    sw.add_argument("--address", default=None, help="an existing Ray cluster instead (auto, HOST:6379, "
                                                    "ray://HOST:10001); the output folder must be shared with it")
    sw.add_argument("--retry-failed", action="store_true", help="run the tasks recorded as failed again")
    sw.add_argument("--json", action="store_true", help="print the per-setting summary as JSON on stdout")
    exp = sub.add_parser("export", help="export model blocks for the phone").add_subparsers(dest="format", required=True)
    co = exp.add_parser("coreml", parents=[common],
                        help="every block of Open-Sora's T5, STDiT3 and VAE as a CoreML .mlpackage")
    co.add_argument("--weights", default=None, help="directory with t5-v1_1-xxl/, OpenSora-STDiT-v3/, "
                                                    "OpenSora-VAE-v1.2/ (default: tiny random weights)")
    co.add_argument("--cache", default="out/weights/random/export", help="where the default random weights go")
    co.add_argument("--out", default="out/coreml", help="the export directory (new, or --overwrite an export)")
    co.add_argument("--models", default=None, help="comma-separated among t5,stdit3,vae (default: all)")
    co.add_argument("--precision", choices=("fp16", "fp32"), default="fp16")
    co.add_argument("--quantize", choices=("none", "int8", "int4", "palette8", "palette4"), default=None,
                    help="weight compression of every package (default: int8 for T5 only, as the paper)")
    co.add_argument("--resolution", default="144p", help="preset or HxW in pixels (the traced shapes)")
    co.add_argument("--aspect", default="3:4")
    co.add_argument("--frames", type=_count(1), default=17)
    co.add_argument("--no-tdtm", action="store_true", help="no TDTM function in the STDiT3 block packages")
    co.add_argument("--overwrite", action="store_true", help="replace a previous export in --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``blockrt`` console script: exit 0 on success, 2 with one line on stderr for any bad input or error."""
    args = _parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO, format="%(name)s: %(message)s")
    try:
        return {"demo": _demo, "plan": _plan, "generate": _generate, "export": _export,
                "sweep": _sweep}[args.command](args)
    except (BlockrtError, ValueError, OSError) as e:  # bad input or a failed run: one line, no traceback
        print(f"blockrt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
