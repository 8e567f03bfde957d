"""ProfileStore: the one entry point for "how long and how much power".

Built once from the profiles folder (``profiles/`` or the config's
``profiles.dir``) and passed to whatever needs predictions: the CLI, the
simulated GPU, later the policies and the simulator. Tables load lazily, one
file per (GPU type, model), and are cached; a lookup is then constant time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from festina_hpc.errors import ProfileError, UnknownProfileError
from festina_hpc.profiles.physics import PhysicsParams, load_params
from festina_hpc.profiles.specs import Catalog, GpuSpec, ModelSpec
from festina_hpc.profiles.table import ProfileTable


@dataclass(frozen=True)
class Prediction:
    """One profile answer, with the inputs it answers for."""

    gpu: str
    model: str
    tp: int  # GPUs per instance; power_w is per GPU
    phase: str
    batch: int
    context_tokens: int
    sm_pct: float
    clock_mhz: int
    latency_s: float  # prefill: time for the batch; decode: time between tokens
    power_w: float  # board power of each of the instance's GPUs during the step
    energy_j: float  # step energy over all tp GPUs
    energy_per_token_j: float  # decode: per generated token; prefill: per prompt token
    clamped: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def table_path(profiles_dir: Path, gpu: str, model: str) -> Path:
    return profiles_dir / gpu / f"{model}.csv"


class ProfileStore:
    def __init__(self, profiles_dir: Path, clamp: bool = False):
        """``clamp`` is the default for lookups outside a table (config ``profiles.out_of_range``)."""
        self.dir = profiles_dir
        self.catalog = Catalog.load(profiles_dir)
        self.clamp = clamp
        self._tables: dict[tuple[str, str], ProfileTable] = {}
        self._physics: dict[str, PhysicsParams] | None = None

    def physics(self, gpu: str) -> PhysicsParams | None:
        """The fitted physics parameters of ``gpu`` (``calibration.toml``), or None where the folder has
        none for it (tables measured on a site's own GPUs, or a test's folder)."""
        if self._physics is None:
            path = self.dir / "calibration.toml"
            self._physics = load_params(path) if path.is_file() else {}
        return self._physics.get(self.gpu(gpu).name)

    def gpu(self, name: str) -> GpuSpec:
        return self.catalog.gpu(name)

    def model(self, name: str) -> ModelSpec:
        return self.catalog.model(name)

    def shipped(self) -> list[tuple[str, str]]:
        """(gpu, model) pairs that have a table file, sorted."""
        return sorted((gpu, model) for gpu in self.catalog.gpus for model in self.catalog.models
                      if table_path(self.dir, gpu, model).is_file())

    def table(self, gpu: str, model: str) -> ProfileTable:
        """The profile table of ``model`` on ``gpu`` (a variant's is its base model's)."""
        gpu_name, model_name = self.gpu(gpu).name, self.catalog.profile_of(model)
        key = (gpu_name, model_name)
        if key not in self._tables:
            path = table_path(self.dir, gpu_name, model_name)
            if not path.is_file():
                raise UnknownProfileError(f"no profile for model {model_name} on gpu {gpu_name} ({path} is missing)")
            table = ProfileTable.from_csv(path)
            expected = {"gpu": gpu_name, "model": model_name, "tp": self.model(model_name).tp_on(gpu_name)}
            for field, want in expected.items():
                if getattr(table, field) != want:
                    raise ProfileError(f"{path}: row 1: header field {field} = {getattr(table, field)} "
                                       f"does not match {want} (the file's place and models.toml)")
            self._tables[key] = table
        return self._tables[key]

    def predict(self, gpu: str, model: str, phase: str, batch: int, context_tokens: int,
                sm_pct: float = 100.0, clock_mhz: int | None = None, clamp: bool | None = None) -> Prediction:
        """Latency, power and energy of one step; ``clock_mhz=None`` means the GPU's max clock."""
        spec = self.gpu(gpu)
        table = self.table(gpu, model)
        clock = spec.max_clock_mhz if clock_mhz is None else clock_mhz
        hit = table.lookup(phase, batch, context_tokens, sm_pct, clock, self.clamp if clamp is None else clamp)
        energy_j = hit.power_w * hit.latency_s * table.tp
        # A clamped answer is the step at the table edge, so count that step's tokens too.
        lo_b, hi_b = table.bounds("batch")
        lo_c, hi_c = table.bounds("context_tokens")
        step_batch, step_context = min(max(batch, lo_b), hi_b), min(max(context_tokens, lo_c), hi_c)
        tokens = step_batch if phase == "decode" else step_batch * step_context
        return Prediction(gpu=table.gpu, model=table.model, tp=table.tp, phase=phase, batch=batch,
                          context_tokens=context_tokens, sm_pct=sm_pct, clock_mhz=clock,
                          latency_s=hit.latency_s, power_w=hit.power_w, energy_j=energy_j,
                          energy_per_token_j=energy_j / tokens, clamped=hit.clamped)
