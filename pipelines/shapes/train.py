"""Train the shapes model on CPU: ``python -m blockrt.pipelines.shapes.train --out DIR --seed S``.

Stages (each resumable: its result is kept under ``--work`` and reused by a rerun with the same settings):

1. tokenizer: a SentencePiece unigram model trained on every caption as the pipeline feeds it (``preprocess``:
   cleaned, " aesthetic score: 6.5." appended) and on each caption word alone (``tokenizer_corpus``), checked
   to keep every caption word one piece, and a small T5 encoder with random frozen weights ->
   ``DIR/t5-v1_1-xxl``;
2. the VAE (``train_vae.py``): spatial (plain MSE, then ``--vae-focus-steps`` with the shape's pixels weighted
   up), then temporal, then frozen -> ``DIR/OpenSora-VAE-v1.2``; or ``--init-vae`` takes a trained one as it is,
   or fine-tunes it (``--refine-vae``: spatial with a ``--vae-ring`` of background weighted, then temporal); the
   latents of ``--clips`` clips are encoded once and cached (written atomically);
3. STDiT3 (the full-size model's class at small width) with Open-Sora's rectified-flow objective: for clean
   latents ``x0`` and noise ``e``, ``x_t = (1 - s) x0 + s e`` at ``t = 1000 s`` and the target is the velocity
   ``x0 - e`` (what ``sampler.sample`` integrates: ``z += v dt`` from ``t = 1000`` down to 0). ``s`` is drawn
   half from Open-Sora's logit-normal with its resolution/length timestep transform (``ratio`` of 64x64x17 =
   0.28, which alone would leave the first sampling steps near ``t = 1000`` almost untrained) and half uniform
   on (0, 1). 10% of captions are replaced by the null caption (``y_embedder.y_embedding``) for CFG. AdamW,
   EMA of the weights (what is saved), written every ``--save-every`` steps so a partial run is usable.

``DIR/training.json`` records the command, seed, sizes, per-stage times and the loss curve.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blockrt.pipelines.opensora import resolution
from blockrt.pipelines.shapes import layout
from blockrt.files import write_atomic
from blockrt.pipelines.shapes.dataset import FPS, FRAMES, GEOMETRIES, SIZE, all_captions, make_batch
from blockrt.pipelines.shapes.train_vae import LR as VAE_LR
from blockrt.pipelines.shapes.train_vae import (encode_spatial, finish_vae, reconstruction_psnr,
                                                round_trip_attributes, shape_cells, train_spatial, train_temporal)
from blockrt.pipelines.shapes.training_summary import write_summary

log = logging.getLogger(__name__)

CAPTION_DROPOUT = 0.1  # Open-Sora's class_dropout_prob
EMA_DECAY = 0.999
LR = 5e-4
WARMUP = 100
GRAD_CLIP = 1.0
UNIFORM_FRACTION = 0.5  # share of timesteps drawn uniformly instead of logit-normal + transform
LOG_EVERY = 50
FOCUS_LR = 5e-4  # spatial VAE phase 2
REFINE_LR = 1e-4  # --refine-vae: the spatial VAE's fine-tune (phase 3)
TEMPORAL_REFINE_LR = 3e-4  # --refine-vae: the temporal VAE's fine-tune on the refined spatial latents
ROUND_TRIP_CLIPS = 96  # held-out clips through the trained VAE: PSNR and what the judge reads back


class Recorder:
    """Averages losses over ``LOG_EVERY`` steps, logs them and keeps the curve for training.json."""

    def __init__(self) -> None:
        self.curves: dict[str, list[list[float]]] = {}
        self._acc: dict[str, list[float]] = {}
        self.t0 = time.perf_counter()

    def __call__(self, name: str, step: int, value: float) -> None:
        acc = self._acc.setdefault(name, [])
        acc.append(value)
        if len(acc) == LOG_EVERY:
            mean = float(np.mean(acc))
            self.curves.setdefault(name, []).append([step + 1, mean])
            acc.clear()
            log.info("%s step %d: %.5f (%.0f s)", name, step + 1, mean, time.perf_counter() - self.t0)


# -- text ---------------------------------------------------------------------------------------------------


def check_whole_words(tokenizer_dir: Path) -> None:
    """Raise ValueError unless every word the captions choose from (shape, colour, direction, background) is
    one token. A word cut into characters reaches STDiT3 only through the frozen random T5's mixing of its
    pieces: with a tokenizer trained on the captions alone ("left" -> "le" "f" "t", "down" -> "d" "o" "w" "n")
    the model learnt colour but not direction."""
    from blockrt.pipelines.opensora.t5 import load_tokenizer
    from blockrt.pipelines.shapes.dataset import BACKGROUNDS, DIRECTIONS, SHAPE_COLOURS, SHAPES

    tok = load_tokenizer(tokenizer_dir)
    split = {w: tok.tokenize(w) for w in (*SHAPES, *SHAPE_COLOURS, *DIRECTIONS, *BACKGROUNDS)}
    split = {w: p for w, p in split.items() if len(p) != 1}
    if split:
        raise ValueError(f"every caption word must be one token, but {split} are split; train the tokenizer on "
                         "tokenizer_corpus() (the captions and each caption word alone), not on the captions alone")


def tokenizer_corpus() -> list[str]:
    """What the SentencePiece (unigram, T5's kind) tokenizer is trained on: every caption as the pipeline feeds
    it, 4 times, and every word of those captions alone, 20 times. On the captions alone the unigram trainer
    collapses to about 40 pieces, mostly single characters, whatever the vocabulary bound; the lone words
    make every caption word one piece, as the real T5 vocabulary has them."""
    texts = pipeline_texts()
    words = sorted({w for t in texts for w in t.split()})
    return texts * 4 + words * 20


def pipeline_texts() -> list[str]:
    """Every caption as the pipeline hands it to T5 (cleaned, aesthetic score appended)."""
    from blockrt.pipelines.opensora.prompt import preprocess

    return [preprocess(c) for c in all_captions()]


@torch.no_grad()
def caption_features(t5_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 features of every caption, cut to the longest caption's tokens: ``(n, L, d)``, mask ``(n, L)``.

    Cutting the padding is exact for STDiT3: padded caption tokens are masked out of every cross-attention.
    """
    from blockrt.pipelines.opensora import loading
    from blockrt.pipelines.opensora.t5 import encode_prompts, load_tokenizer

    t5 = loading.load_t5(t5_dir, meta=False).model
    y, mask = encode_prompts(load_tokenizer(t5_dir), t5, pipeline_texts())  # (n, 1, 300, d), (n, 300)
    L = int(mask.sum(1).max())
    return y[:, 0, :L].contiguous(), mask[:, :L].contiguous()


# -- STDiT3 -------------------------------------------------------------------------------------------------


def init_stdit3(model: torch.nn.Module) -> None:
    """Open-Sora's STDiT3 initialisation: xavier linears with zero biases, N(0, 0.02) timestep/caption MLPs and
    ``t_block``, zero fps embedder output and temporal blocks' output projections (identity at start), and
    (as DiT) a zero final linear."""
    nn = torch.nn
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    w = model.x_embedder.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    for lin in (model.t_embedder.mlp[0], model.t_embedder.mlp[2], model.t_block[1], model.fps_embedder.mlp[0],
                model.y_embedder.y_proj.fc1, model.y_embedder.y_proj.fc2):
        nn.init.normal_(lin.weight, std=0.02)
    nn.init.zeros_(model.fps_embedder.mlp[2].weight)
    for block in model.temporal_blocks:
        for lin in (block.attn.proj, block.cross_attn.proj, block.mlp.fc2):
            nn.init.zeros_(lin.weight)
    nn.init.zeros_(model.final_layer.linear.weight)
    nn.init.zeros_(model.final_layer.linear.bias)


def sample_sigmas(n: int, gen: torch.Generator, ratio: float) -> torch.Tensor:
    """Noise levels ``s`` in (0, 1): logit-normal then Open-Sora's timestep transform, or uniform (mixed)."""
    s = torch.sigmoid(torch.randn(n, generator=gen))
    s = ratio * s / (1 + (ratio - 1) * s)  # timestep_transform on t/1000
    uniform = torch.rand(n, generator=gen)
    pick = torch.rand(n, generator=gen) < UNIFORM_FRACTION
    return torch.where(pick, uniform, s).clamp(1e-4, 1.0)


def train_stdit3(model, latents: torch.Tensor, cap_idx: torch.Tensor, y_all: torch.Tensor, mask_all: torch.Tensor,
                 *, steps: int, batch: int, seed: int, on_loss, save, save_every: int,
                 focus: float = 0.0, cosine: bool = False, lr: float = LR) -> dict[str, float]:
    """The rectified-flow loop; ``save(ema_model, step)`` is called every ``save_every`` steps and at the end.

    ``focus`` > 0 weights the loss of the latent cells that hold the shape ``1 + focus`` times (``shape_cells``):
    the background is learnt first and the shape's colour and motion, a few cells of 320, much later.
    ``cosine`` decays the learning rate ``lr`` to 0 over ``steps`` after the warm-up (else it stays at ``lr``).
    """
    import copy

    from blockrt.pipelines.opensora.sampler import timestep_ratio

    ratio = timestep_ratio(SIZE, SIZE, latents_frames_to_pixels(latents.shape[2]))
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def lr_factor(k: int) -> float:
        return min(1.0, (k + 1) / WARMUP) * (0.5 * (1 + math.cos(math.pi * k / steps)) if cosine else 1.0)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(seed + 3)
    null = model.y_embedder.y_embedding[: y_all.shape[1]]  # (L, d): the CFG null caption, cut like y
    n = latents.shape[0]
    side = dict(fps=torch.tensor([float(FPS)]), height=torch.tensor([float(SIZE)]), width=torch.tensor([float(SIZE)]))
    for step in range(steps):
        idx = torch.randint(n, (batch,), generator=gen)
        x0 = latents[idx]  # (b, 4, T_z, 8, 8): T_z = 5 (17 frames) or 9 (33)
        y = y_all[cap_idx[idx]].clone()  # (b, L, d)
        mask = mask_all[cap_idx[idx]]  # (b, L)
        drop = torch.rand(batch, generator=gen) < CAPTION_DROPOUT
        y[drop] = null
        s = sample_sigmas(batch, gen, ratio)
        noise = torch.randn(x0.shape, generator=gen)
        sb = s.view(-1, 1, 1, 1, 1)
        xt = (1 - sb) * x0 + sb * noise
        out = model(xt, s * 1000, y[:, None], mask=mask, **side)  # (b, 8, T_z, 8, 8)
        w = 1.0 + focus * shape_cells(x0)  # (b, 1, T_z, 8, 8)
        loss = ((out[:, : x0.shape[1]] - (x0 - noise)).pow(2) * w).mean() / w.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        sched.step()
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        on_loss("stdit3_loss", step, loss.item())
        if (step + 1) % save_every == 0 and step + 1 < steps:
            save(ema, step + 1)
    save(ema, steps)
    return {"final_lr": sched.get_last_lr()[0]}


def latents_frames_to_pixels(latent_frames: int) -> int:
    """The clip length (``dataset.GEOMETRIES``) whose latents have ``latent_frames`` frames: 5 -> 17, 9 -> 33."""
    by_latents = {resolution.latent_frames(f): f for f in GEOMETRIES}
    if latent_frames not in by_latents:
        raise ValueError(f"the shapes clips have {sorted(GEOMETRIES)} frames ({sorted(by_latents)} latent frames), "
                         f"got {latent_frames} latent frames")
    return by_latents[latent_frames]


# -- the whole run ------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _caption_index(seed: int, n: int, frames: int = FRAMES) -> torch.Tensor:
    """Index into ``all_captions()`` of clips ``0..n-1``."""
    from blockrt.pipelines.shapes.dataset import make_clip

    order = {c: i for i, c in enumerate(all_captions())}
    return torch.tensor([order[make_clip(seed, i, frames).spec.caption] for i in range(n)])


def _save_cache(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` to the safetensors file ``path`` atomically: a stopped run never leaves a torn cache."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()})
    write_atomic(path, lambda f: f.write(data))


def _temporal_stage(vae, args: argparse.Namespace, rec: Recorder, times: dict[str, float], *, lr: float,
                    set_stats: bool) -> torch.Tensor:
    """Encode the training clips' spatial latents, train the temporal VAE on them from its current weights
    (``--tvae-*``, peak ``lr``) and return STDiT3's normalised latents ``(n, 4, T_z, 8, 8)`` (``set_stats``: the
    pipeline's shift/scale set from them, else kept)."""
    t = time.perf_counter()
    spatial = encode_spatial(vae, args.seed, args.clips, args.frames)  # (n, 4, frames, 8, 8)
    times["encode_spatial_s"] = time.perf_counter() - t
    t = time.perf_counter()
    train_temporal(vae, spatial, args.seed, args.tvae_steps, args.vae_batch, rec, focus=args.tvae_focus,
                   ring=args.tvae_ring, cosine=args.tvae_cosine, lr=lr)
    times["temporal_vae_s"] = time.perf_counter() - t
    return finish_vae(vae, spatial, set_stats=set_stats)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from safetensors.torch import load_file

    from blockrt.pipelines.opensora.stdit3 import STDiT3
    from blockrt.pipelines.opensora.t5 import train_tiny_tokenizer
    from blockrt.pipelines.opensora.vae import VideoAutoencoderPipeline

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    rec = Recorder()
    times: dict[str, float] = {}
    record: dict[str, Any] = {"command": " ".join(["python -m blockrt.pipelines.shapes.train", *sys.argv[1:]]),
                              "args": vars(args), "torch": torch.__version__, "threads": args.threads,
                              "frames": args.frames,
                              "sizes": {"t5": layout.T5_SIZES, "stdit3": layout.STDIT3_SIZES,
                                        "spatial_vae": layout.SPATIAL_SIZES_BY_FRAMES[args.frames],
                                        "temporal_vae": layout.TEMPORAL_SIZES},
                              "objective": {"caption_dropout": CAPTION_DROPOUT, "ema_decay": EMA_DECAY, "lr": args.lr,
                                            "warmup": WARMUP, "uniform_fraction": UNIFORM_FRACTION,
                                            "target": "x0 - noise", "x_t": "(1 - s) x0 + s noise, t = 1000 s"}}

    def write_record(**extra: Any) -> None:
        record.update(times=times, losses=rec.curves, **extra)
        text = (json.dumps(record, indent=1) + "\n").encode()
        write_atomic(out / layout.RECORD, lambda f: f.write(text))  # rebuild.finished reads it

    t = time.perf_counter()
    tok = train_tiny_tokenizer(tokenizer_corpus(), work / "tokenizer", vocab_size=args.vocab)
    check_whole_words(tok)
    layout.write_t5(out, tok, args.seed)
    y_all, mask_all = caption_features(out / "t5-v1_1-xxl")
    times["t5_s"] = time.perf_counter() - t
    log.info("tokenizer + T5 + caption features %s: %.1f s", tuple(y_all.shape), times["t5_s"])

    frames, spatial_sizes = args.frames, layout.SPATIAL_SIZES_BY_FRAMES[args.frames]
    vae = VideoAutoencoderPipeline(layout.vae_config(spatial_sizes))
    stamp1 = f"seed{args.seed}-clips{args.clips}-s{args.vae_steps}-frames{frames}"  # caches of either length apart
    stamp = f"{stamp1}-f{args.vae_focus_steps}x{args.vae_focus:g}-t{args.tvae_steps}"
    if args.tvae_focus or args.tvae_cosine:
        stamp += f"x{args.tvae_focus:g}" + ("c" if args.tvae_cosine else "")
    if args.tvae_ring:
        stamp += f"r{args.tvae_ring}"
    if args.init_vae:  # a VAE trained before (a weights directory): only the latents are computed, or refined
        from blockrt.pipelines.opensora.checkpoint_layout import DIRECTORIES

        vae_file = Path(args.init_vae) / DIRECTORIES["vae"] / "model.safetensors"
        vae.load_state_dict(load_file(vae_file))
        record["init_vae"] = {"file": str(vae_file), "sha256": _sha256(vae_file)}
        stamp = f"{stamp1}-vae{record['init_vae']['sha256'][:12]}"
        if args.refine_vae:
            stamp += f"-refine{args.refine_vae}r{args.vae_ring}-t{args.tvae_steps}x{args.tvae_focus:g}r{args.tvae_ring}"
    vae_cache, lat_cache = work / f"vae-{stamp}.safetensors", work / f"latents-{stamp}.safetensors"
    spatial_cache = work / f"spatial-{stamp1}.safetensors"  # after phase 1
    reused = vae_cache.exists() and lat_cache.exists()
    if reused:
        vae.load_state_dict(load_file(vae_cache))
        latents = load_file(lat_cache)["latents"]
        log.info("VAE and latents reused from %s", work)
    elif args.init_vae and args.refine_vae:  # fine-tune both stages; shift/scale kept, so STDiT3's latents stay
        t = time.perf_counter()
        train_spatial(vae, args.seed, args.clips, args.refine_vae, args.vae_batch, rec, focus=args.vae_focus,
                      ring=args.vae_ring, lr=REFINE_LR, cosine=True, phase=3, frames=frames)
        times["spatial_vae_phase3_s"] = time.perf_counter() - t
        latents = _temporal_stage(vae, args, rec, times, lr=TEMPORAL_REFINE_LR, set_stats=False)
    elif args.init_vae:
        t = time.perf_counter()
        latents = finish_vae(vae, encode_spatial(vae, args.seed, args.clips, frames), set_stats=False)
        times["encode_s"] = time.perf_counter() - t
    else:
        t = time.perf_counter()
        if spatial_cache.exists():
            vae.spatial_vae.load_state_dict(load_file(spatial_cache))
            log.info("spatial VAE phase 1 reused from %s", spatial_cache)
        else:
            train_spatial(vae, args.seed, args.clips, args.vae_steps, args.vae_batch, rec, frames=frames)
            _save_cache(spatial_cache, vae.spatial_vae.state_dict())
        times["spatial_vae_s"] = time.perf_counter() - t
        t = time.perf_counter()
        train_spatial(vae, args.seed, args.clips, args.vae_focus_steps, args.vae_batch, rec, focus=args.vae_focus,
                      lr=FOCUS_LR, phase=2, frames=frames)
        times["spatial_vae_phase2_s"] = time.perf_counter() - t
        latents = _temporal_stage(vae, args, rec, times, lr=VAE_LR, set_stats=True)
    if not reused:
        _save_cache(vae_cache, vae.state_dict())
        _save_cache(lat_cache, {"latents": latents})
    vae.eval().requires_grad_(False)
    layout.write_vae(out, vae, spatial_sizes)
    psnr, originals, rebuilt = reconstruction_psnr(vae, args.seed + 1, 0, ROUND_TRIP_CLIPS, frames)  # held out
    record["vae_reconstruction_psnr_db"] = psnr
    kept = round_trip_attributes(originals, rebuilt, make_batch(args.seed + 1, 0, ROUND_TRIP_CLIPS, frames)[1])
    record["vae_round_trip_kept"], record["vae_round_trip_clips"] = kept, ROUND_TRIP_CLIPS
    log.info("VAE written; on %d held-out clips: round-trip PSNR %.2f dB, the judge reads back shape %.0f%%, "
             "colour %.0f%%, direction %.0f%%", ROUND_TRIP_CLIPS, psnr, 100 * kept["shape"], 100 * kept["colour"],
             100 * kept["direction"])
    write_record()

    cap_idx = _caption_index(args.seed, args.clips, frames)
    model = STDiT3(layout.stdit3_config())
    init_stdit3(model)
    if args.init_stdit3:  # continue from earlier weights (the EMA of a previous run)
        model.load_state_dict(load_file(args.init_stdit3))
        record["init_stdit3"] = {"file": args.init_stdit3, "sha256": _sha256(Path(args.init_stdit3))}

    def save(ema: torch.nn.Module, step: int) -> None:
        layout.write_stdit3(out, ema)
        write_record(stdit3_steps_saved=step, stdit3_s=time.perf_counter() - t_stdit)
        log.info("STDiT3 (EMA) written at step %d", step)

    t_stdit = time.perf_counter()
    info = train_stdit3(model, latents, cap_idx, y_all, mask_all, steps=args.steps, batch=args.batch,
                        seed=args.seed, on_loss=rec, save=save, save_every=args.save_every, focus=args.latent_focus,
                        cosine=args.cosine, lr=args.lr)
    times["stdit3_s"] = time.perf_counter() - t_stdit
    write_record(stdit3_steps_saved=args.steps, **info)
    write_summary(out)
    return record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="weights directory to write (the three model directories)")
    ap.add_argument("--work", default="out/shapes/work", help="caches: tokenizer, trained VAE, latents")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clips", type=int, default=3000, help="training clips (latents cached once)")
    ap.add_argument("--vae-steps", type=int, default=1200)
    ap.add_argument("--vae-focus-steps", type=int, default=800, help="spatial VAE phase 2: shape pixels weighted")
    ap.add_argument("--vae-focus", type=float, default=20.0, help="phase 2 weight of a shape pixel is 1 + this")
    ap.add_argument("--frames", type=int, default=FRAMES, choices=sorted(GEOMETRIES),
                    help="clip length (dataset.GEOMETRIES: 33 draws larger, slower shapes; 9 latent frames)")
    ap.add_argument("--tvae-steps", type=int, default=800)
    ap.add_argument("--tvae-focus", type=float, default=0.0, help="temporal VAE loss weight 1 + this on shape cells")
    ap.add_argument("--tvae-cosine", action="store_true", help="decay the temporal VAE's learning rate to 0 (cosine)")
    ap.add_argument("--init-vae", default=None,
                    help="a weights directory whose OpenSora-VAE-v1.2 is used as it is (no VAE training) or refined")
    ap.add_argument("--refine-vae", type=int, default=0, metavar="STEPS",
                    help="with --init-vae: fine-tune its spatial VAE this many steps (cosine; shape and --vae-ring "
                         "weighted --vae-focus), then its temporal VAE --tvae-steps on the new latents")
    ap.add_argument("--vae-ring", type=int, default=2, help="--refine-vae: background pixels this near the shape "
                                                             "are weighted as the shape")
    ap.add_argument("--tvae-ring", type=int, default=0, help="temporal VAE: latent cells this near the shape's "
                                                              "are weighted as the shape's")
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6000, help="STDiT3 steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--latent-focus", type=float, default=4.0, help="STDiT3 loss weight 1 + this on shape cells")
    ap.add_argument("--cosine", action="store_true", help="decay the STDiT3 learning rate to 0 (cosine)")
    ap.add_argument("--lr", type=float, default=LR, help="STDiT3 peak learning rate (AdamW)")
    ap.add_argument("--init-stdit3", default=None, help="start STDiT3 from this model.safetensors (else Open-Sora's init)")
    ap.add_argument("--vocab", type=int, default=64, help="SentencePiece vocabulary bound")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine 2 threads ran 10x slower)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if min(args.clips, args.steps, args.batch, args.vae_batch, args.save_every) < 1:
        raise SystemExit("--clips, --steps, --batch, --vae-batch and --save-every must be >= 1")
    if not args.lr > 0:
        raise SystemExit(f"--lr must be > 0, got {args.lr}")
    if args.refine_vae and not args.init_vae:
        raise SystemExit(f"--refine-vae {args.refine_vae} fine-tunes a trained VAE: give it with --init-vae DIR")
    if min(args.refine_vae, args.vae_ring, args.tvae_ring) < 0:
        raise SystemExit("--refine-vae, --vae-ring and --tvae-ring must be >= 0")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
