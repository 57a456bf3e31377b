"""What a sweep is: prompts x seeds x settings, read from a JSON file or a built-in preset, expanded into tasks.

A spec (JSON object; every key but ``prompts`` and ``settings`` optional)::

    {"prompts": ["a red circle moving right on a blue background", ...],   # or "prompts_file": "prompts.txt"
     "seeds": [0, 1, 2, 3],
     "settings": [{"name": "steps30"}, {"name": "lpl16", "lpl": 16}, {"name": "tdtm10", "tdtm": 10},
                  {"name": "int8", "storage_dtype": "int8", "budget": "32MB"}],
     "reference": "steps30",          # PSNR/SSIM are against this setting's video of the same prompt and seed
     "frames": 33, "resolution": "64x64", "aspect": "1:1", "cfg": 2.0,
     "weights": null,                 # a weights directory; null: the built-in shapes model
     "threads": 1,                    # torch threads per task (and the CPUs Ray reserves for it)
     "task_memory": null}             # memory Ray reserves per task; null: the setting's budget + TASK_BASE_BYTES

A setting: ``name`` and any of ``steps`` (30), ``lpl`` (model calls before the leap, or "dynamic"), ``tdtm``
(merged steps), ``budget`` ("64MB"), ``storage_dtype`` (None, "float16", "bfloat16", "int8"). Each task's id
names its setting, prompt and seed and ends with a hash of everything that decides its video, so a changed
spec never reuses another spec's results. The structure is checked here, before any work; a setting a
generation rejects (an empty prompt, a budget too small) fails only its own tasks, recorded with the error.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blockrt.device import resolve_budget
from blockrt.pipelines.shapes.dataset import FRAMES
from blockrt.pipelines.shapes.layout import CFG_SCALE

TASK_BASE_BYTES = 1536 * 2**20  # a task process's memory outside the budget: torch, transformers, diffusers, ffmpeg
_SETTING_KEYS = {"name", "steps", "lpl", "tdtm", "budget", "storage_dtype"}
_SPEC_KEYS = {"prompts", "prompts_file", "seeds", "settings", "reference", "frames", "resolution", "aspect", "cfg",
              "weights", "threads", "task_memory"}


def read_prompts(path: str | Path) -> list[str]:
    """One prompt a line; blank lines and lines starting with ``#`` are skipped."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--prompts: expected a text file with one prompt a line; found no file at {p}")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    prompts = [t for t in prompts if t and not t.startswith("#")]
    if not prompts:
        raise ValueError(f"--prompts: {p} holds no prompt (one a line; blank and '#' lines are skipped)")
    return prompts


@dataclass(frozen=True)
class Setting:
    """One column of a sweep: the generation knobs every prompt and seed runs with."""

    name: str
    steps: int = 30
    lpl: int | str | None = None
    tdtm: int = 0
    budget: str | int = "64MB"
    storage_dtype: str | None = None


@dataclass(frozen=True)
class Task:
    """One video: a setting, a prompt (and its index in the spec) and a seed, plus the spec's shared knobs."""

    setting: Setting
    prompt: str
    prompt_index: int
    seed: int
    frames: int
    resolution: str
    aspect: str
    cfg: float
    weights: str | None
    threads: int

    @property
    def key(self) -> dict[str, Any]:
        """Everything that decides the video (and so the result's identity)."""
        d = asdict(self)
        d["setting"] = {k: v for k, v in d["setting"].items() if k != "name"}
        return d

    @property
    def id(self) -> str:
        """``<setting>-p<prompt>-s<seed>-<hash>``: a folder name, stable across runs of the same spec."""
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:10]
        safe = re.sub(r"[^A-Za-z0-9_.+=]+", "_", self.setting.name)
        return f"{safe}-p{self.prompt_index:03d}-s{self.seed}-{digest}"


@dataclass(frozen=True)
class SweepSpec:
    """Prompts x seeds x settings and the knobs they share (see the module docstring for the JSON form)."""

    prompts: tuple[str, ...]
    settings: tuple[Setting, ...]
    seeds: tuple[int, ...] = (0,)
    reference: str | None = None
    frames: int = FRAMES  # the built-in shapes model's clips
    resolution: str = "64x64"
    aspect: str = "1:1"
    cfg: float = CFG_SCALE  # the built-in shapes model's
    weights: str | None = None
    threads: int = 1
    task_memory: str | int | None = None
    source: str = field(default="", compare=False)  # where the spec came from, for messages

    def __post_init__(self) -> None:
        where = f" in {self.source}" if self.source else ""
        if not self.prompts or not all(isinstance(p, str) for p in self.prompts):
            raise ValueError(f"sweep spec{where}: 'prompts' must be a non-empty list of strings; got {self.prompts!r}")
        if not self.settings:
            raise ValueError(f"sweep spec{where}: 'settings' must list at least one setting, e.g. [{{'name': 'steps30'}}]")
        names = [s.name for s in self.settings]
        if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"sweep spec{where}: setting names must be unique non-empty strings; got {names}")
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise ValueError(f"sweep spec{where}: 'seeds' must be a non-empty list of ints; got {self.seeds!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"sweep spec{where}: 'seeds' repeats a seed: {list(self.seeds)}")
        if self.reference is not None and self.reference not in names:
            raise ValueError(f"sweep spec{where}: 'reference' {self.reference!r} is not a setting; expected one of {names}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"sweep spec{where}: 'threads' must be an int >= 1; got {self.threads!r}")
        for s in self.settings:
            resolve_budget(s.budget)  # "64 megs" fails here, naming the accepted forms
        if self.task_memory is not None:
            resolve_budget(self.task_memory)

    @property
    def reference_setting(self) -> str:
        """The setting PSNR/SSIM compare against: ``reference``, else the first."""
        return self.reference or self.settings[0].name

    def tasks(self) -> list[Task]:
        """Every task, setting by setting, then prompt by prompt, then seed by seed."""
        return [Task(s, p, i, seed, self.frames, self.resolution, self.aspect, self.cfg, self.weights, self.threads)
                for s in self.settings for i, p in enumerate(self.prompts) for seed in self.seeds]

    def task_memory_bytes(self, setting: Setting) -> int:
        """The memory Ray reserves for one task of ``setting``."""
        if self.task_memory is not None:
            return resolve_budget(self.task_memory)[0]
        return resolve_budget(setting.budget)[0] + TASK_BASE_BYTES

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``from_dict`` reads it back)."""
        d = asdict(self)
        d.pop("source")
        d["prompts"], d["seeds"] = list(self.prompts), list(self.seeds)
        d["settings"] = [asdict(s) for s in self.settings]
        return d

    @classmethod
    def from_dict(cls, doc: dict[str, Any], source: str = "", base: Path | None = None) -> "SweepSpec":
        """A spec from its JSON form; ``prompts_file`` is read relative to ``base``."""
        where = f" in {source}" if source else ""
        if not isinstance(doc, dict):
            raise ValueError(f"sweep spec{where}: expected a JSON object; found {type(doc).__name__}")
        unknown = sorted(set(doc) - _SPEC_KEYS)
        if unknown:
            raise ValueError(f"sweep spec{where}: unknown keys {unknown}; expected some of {sorted(_SPEC_KEYS)}")
        doc = dict(doc)
        if "prompts_file" in doc:
            if "prompts" in doc:
                raise ValueError(f"sweep spec{where}: 'prompts' and 'prompts_file' exclude each other; give one")
            doc["prompts"] = read_prompts((base or Path.cwd()) / doc.pop("prompts_file"))
        settings = []
        for s in doc.get("settings") or []:
            if not isinstance(s, dict) or "name" not in s or set(s) - _SETTING_KEYS:
                raise ValueError(f"sweep spec{where}: a setting must be an object with a 'name' and some of "
                                 f"{sorted(_SETTING_KEYS - {'name'})}; got {s!r}")
            settings.append(Setting(**s))
        doc["settings"] = tuple(settings)
        doc["prompts"] = tuple(doc.get("prompts") or ())
        doc["seeds"] = tuple(doc.get("seeds", (0,)))
        return cls(**doc, source=source)

    @classmethod
    def load(cls, spec: str | Path) -> "SweepSpec":
        """A spec from a JSON file, or a built-in preset by name (``presets.PRESETS``)."""
        from blockrt.pipelines.sweep.presets import PRESETS

        if str(spec) in PRESETS:
            return cls.from_dict(PRESETS[str(spec)](), source=f"preset {spec}")
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"sweep spec: expected a JSON file or one of the presets {sorted(PRESETS)}; "
                             f"found neither at {spec!r}")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"sweep spec {path}: not valid JSON ({e})") from None
        return cls.from_dict(doc, source=str(path), base=path.parent)
