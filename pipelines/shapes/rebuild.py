"""Rebuild the shipped shapes weights with one command: the five training runs of ``weights/TRAINING.md`` in turn.

    python -m blockrt.pipelines.shapes.rebuild --out out/shapes/rebuild     # about 5 h on 2 cores

Run 1 starts STDiT3 from the first shipped model (17 frames), read from git history (``BASE_COMMIT``) or from
``--base FILE`` and checked against ``BASE_SHA256``; it trains the VAE first (its work directory starts empty).
Each later run starts from the one before: run 2 from run 1's STDiT3, runs 3 and 4 also take run 2's and run 3's
VAE as it is (``--init-vae``); run 5 refines run 4's VAE (``--refine-vae``) and continues run 4's STDiT3 on the
refined latents. Every run is ``python -m blockrt.pipelines.shapes.train`` in a process of its own,
with the arguments recorded in ``TRAINING.md`` (run 1 ran with ``--steps 12000`` and was stopped at step 3750; its
learning rate is constant after the warm-up, so ``--steps 3750`` is the same run), its log in ``OUT/logs/``. A run
whose directory already holds its finished record is skipped, so a stopped rebuild resumes where it stopped.
``OUT/weights`` gets run 5's weights, the five records and a ``TRAINING.md``; the log says whether its STDiT3 is
byte for byte the shipped one (``layout.WEIGHTS_DIR``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from blockrt.pipelines.opensora.checkpoint_layout import DIRECTORIES
from blockrt.pipelines.shapes import layout

log = logging.getLogger("blockrt.shapes.rebuild")

BASE_COMMIT = "fab901c"  # the first shipped model (17 frames), the start of run 1
BASE_PATH = "pipelines/shapes/weights/OpenSora-STDiT-v3/model.safetensors"
BASE_SHA256 = "4cedfc320faf7ef2af4a5e1c252126c5882db635706b81c16629d10824ea986b"
STDIT3_FILE = f"{DIRECTORIES['stdit3']}/model.safetensors"
COMMON = ["--seed", "0", "--frames", "33", "--tvae-steps", "3000", "--tvae-focus", "20", "--tvae-cosine"]
# name -> (arguments after COMMON, the run whose VAE is reused or None, the run whose STDiT3 it starts from)
RUNS: dict[str, tuple[list[str], str | None, str | None]] = {
    "run1": (["--steps", "3750"], None, None),
    "run2": (["--steps", "4800", "--cosine"], None, "run1"),
    "run3": (["--steps", "7000", "--cosine"], "run2", "run2"),
    "run4": (["--clips", "6000", "--steps", "7000", "--cosine", "--lr", "3e-4"], "run3", "run3"),
    "run5": (["--clips", "6000", "--tvae-steps", "1500", "--tvae-ring", "1", "--refine-vae", "2000", "--vae-ring", "2",
              "--steps", "4000", "--cosine", "--lr", "3e-4"], "run4", "run4"),
}
# --smoke: the same chain with every stage a few steps long (checks the chain, not the weights)
SMOKE = ["--clips", "8", "--steps", "2", "--vae-steps", "2", "--vae-focus-steps", "2", "--tvae-steps", "2",
         "--save-every", "1", "--batch", "2", "--vae-batch", "4"]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def commands(out: Path, work: Path, base: Path, threads: int, smoke: bool = False) -> dict[str, list[str]]:
    """Each run's ``train`` arguments (after ``python -m blockrt.pipelines.shapes.train``), in order."""
    cmds = {}
    for name, (extra, vae_from, stdit3_from) in RUNS.items():
        init = base if stdit3_from is None else out / stdit3_from / STDIT3_FILE
        args = ["--out", str(out / name), "--work", str(work), *COMMON, *extra, "--threads", str(threads)]
        args += ["--init-vae", str(out / vae_from)] if vae_from else []
        smoke_args = (SMOKE + (["--refine-vae", "2"] if "--refine-vae" in extra else [])) if smoke else []
        cmds[name] = args + ["--init-stdit3", str(init)] + smoke_args
    return cmds


def fetch_base(dest: Path) -> Path:
    """The first shipped model's STDiT3 from git history into ``dest`` (written under a temporary name)."""
    top = Path(__file__).resolve().parent
    got = subprocess.run(["git", "-C", str(top), "show", f"{BASE_COMMIT}:{BASE_PATH}"], capture_output=True)
    if got.returncode != 0:
        raise SystemExit(f"run 1 starts from {BASE_PATH} at commit {BASE_COMMIT}, which git could not read here "
                         f"({got.stderr.decode().strip() or 'no git'}); in a full clone it can, or pass that file "
                         f"as --base FILE (sha256 {BASE_SHA256[:16]}...)")
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(got.stdout)
    os.replace(tmp, dest)
    return dest


def check_base(path: Path) -> None:
    found = sha256(path)
    if found != BASE_SHA256:
        raise SystemExit(f"--base {path}: expected the first shipped model's STDiT3 (sha256 {BASE_SHA256[:16]}...), "
                         f"found sha256 {found[:16]}...; take it from git: git show {BASE_COMMIT}:{BASE_PATH}")


def finished(run_dir: Path, args: list[str]) -> bool:
    """Whether ``run_dir`` holds the finished record of ``train`` with exactly ``args``."""
    from blockrt.pipelines.shapes.train import parse_args

    record = run_dir / layout.RECORD
    if not record.exists():
        return False
    r = json.loads(record.read_text())
    want = vars(parse_args(args))
    return r.get("args") == want and r.get("stdit3_steps_saved") == want["steps"]


def run_chain(cmds: dict[str, list[str]], logs: Path) -> None:
    """Run each ``train`` command in its own process unless its run has finished; stop at the first failure."""
    logs.mkdir(parents=True, exist_ok=True)
    for name, args in cmds.items():
        run_dir = Path(args[args.index("--out") + 1])
        if finished(run_dir, args):
            log.info("%s: finished before, kept (%s)", name, run_dir)
            continue
        log.info("%s: python -m blockrt.pipelines.shapes.train %s", name, " ".join(args))
        with open(logs / f"{name}.log", "w") as f:
            code = subprocess.run([sys.executable, "-m", "blockrt.pipelines.shapes.train", *args],
                                  stdout=f, stderr=subprocess.STDOUT).returncode
        if code != 0:
            raise SystemExit(f"{name} failed (exit {code}); its log: {logs / f'{name}.log'}; rerun to resume")


def assemble(out: Path, names: list[str]) -> Path:
    """``out/weights``: the last run's weights, every run's record (``training-<run>.json``) and ``TRAINING.md``."""
    from blockrt.files import replace_dir
    from blockrt.pipelines.shapes.training_summary import write_summary

    final = out / "weights"
    tmp = out / "weights.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(out / names[-1], tmp)
    records = []
    for name in names:
        records.append(f"training-{name}.json")
        shutil.copyfile(out / name / layout.RECORD, tmp / records[-1])
    (tmp / layout.RECORD).unlink()
    write_summary(tmp, tuple(records))
    replace_dir(tmp, final)
    return final


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="one directory per run, logs/ and the assembled weights/")
    ap.add_argument("--work", default=None, help="caches shared by the runs (default OUT/work)")
    ap.add_argument("--base", default=None, help="the first shipped model's STDiT3 file (default: from git)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the shipped runs: 2)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    ap.add_argument("--smoke", action="store_true", help="every stage a few steps long: checks the chain only")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    work = Path(args.work).resolve() if args.work else out / "work"
    base = Path(args.base).resolve() if args.base else work / "stdit3-first-shipped.safetensors"
    cmds = commands(out, work, base, args.threads, args.smoke)
    if args.dry_run:
        for name, cmd in cmds.items():
            print(f"{name}: python -m blockrt.pipelines.shapes.train {' '.join(cmd)}")
        return 0
    if args.base is None and not base.exists():
        work.mkdir(parents=True, exist_ok=True)
        fetch_base(base)
    check_base(base)
    run_chain(cmds, out / "logs")
    final = assemble(out, list(cmds))
    same = sha256(final / STDIT3_FILE) == sha256(layout.WEIGHTS_DIR / STDIT3_FILE)
    log.info("weights in %s; STDiT3 %s the shipped file", final, "is byte for byte" if same else "differs from")
    return 0


if __name__ == "__main__":
    sys.exit(main())
