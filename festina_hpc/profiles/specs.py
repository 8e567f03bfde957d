"""GPU and model specifications: the facts a profile is computed from.

``profiles/gpus.toml`` holds per GPU type its memory, TDP, idle power (bare,
and with a CUDA context held) and clocks; ``profiles/models.toml`` holds per model its architecture (from which
weight and KV-cache footprints follow) and its tensor parallelism per GPU
type. Names resolve case-insensitively through each entry's aliases, so
``h100`` finds ``h100-sxm-80gb``.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from festina_hpc.errors import ProfileError, UnknownProfileError

BYTES_PER_PARAM = 2  # FP16/BF16 weights
BYTES_PER_KV_ELEMENT = 2  # FP16/BF16 KV cache
GIB = 2**30


@dataclass(frozen=True)
class GpuSpec:
    name: str
    display_name: str
    aliases: tuple[str, ...]
    memory_gib: float
    tdp_w: float
    idle_w: float
    idle_with_context_w: float  # idle, but holding a CUDA context (a loaded model): the GPU stays in P0
    max_clock_mhz: int
    min_clock_mhz: int
    clock_step_mhz: int
    memory_clock_mhz: int
    peak_tflops: float
    memory_bandwidth_gbs: float
    interconnect_gbs: float
    table_clocks_mhz: tuple[int, ...]

    @property
    def supported_clocks_mhz(self) -> tuple[int, ...]:
        """SM clocks the GPU accepts, highest first."""
        return tuple(range(self.max_clock_mhz, self.min_clock_mhz - 1, -self.clock_step_mhz))

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hf_name: str
    aliases: tuple[str, ...]
    params_b: float
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    max_context_tokens: int
    tp: Mapping[str, int]

    @property
    def weights_bytes(self) -> float:
        return self.params_b * 1e9 * BYTES_PER_PARAM

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes per token of context, summed over all GPUs of an instance."""
        return 2 * self.layers * self.kv_heads * self.head_dim * BYTES_PER_KV_ELEMENT

    def tp_on(self, gpu: str) -> int:
        """Tensor-parallel degree when served on GPU type ``gpu``."""
        try:
            return self.tp[gpu]
        except KeyError:
            raise UnknownProfileError(f"model {self.name}: no tensor parallelism given for gpu {gpu}") from None

    def weights_gib_per_gpu(self, gpu: str) -> float:
        return self.weights_bytes / self.tp_on(gpu) / GIB


_INT_FIELDS = {"memory_clock_mhz", "max_clock_mhz", "min_clock_mhz", "clock_step_mhz", "layers", "hidden",
               "heads", "kv_heads", "head_dim", "max_context_tokens"}
_FLOAT_FIELDS = {"memory_gib", "tdp_w", "idle_w", "idle_with_context_w", "peak_tflops", "memory_bandwidth_gbs",
                 "interconnect_gbs", "params_b"}

T = TypeVar("T")


def _entry(path: Path, name: str, raw: Any, cls: Callable[..., T]) -> T:
    if not isinstance(raw, Mapping):
        raise ProfileError(f"{path}: [{name}] must be a table")
    fields = set(cls.__dataclass_fields__) - {"name"}  # type: ignore[attr-defined]
    missing = fields - set(raw)
    if missing:
        raise ProfileError(f"{path}: [{name}] is missing field {sorted(missing)[0]}")
    unknown = set(raw) - fields
    if unknown:
        raise ProfileError(f"{path}: [{name}] has unknown field {sorted(unknown)[0]}")
    values: dict[str, Any] = {"name": name}
    for key, value in raw.items():
        if key in _INT_FIELDS or key in _FLOAT_FIELDS:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ProfileError(f"{path}: [{name}] field {key} must be a positive number, got {value!r}")
            value = int(value) if key in _INT_FIELDS else float(value)
        elif key == "aliases":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ProfileError(f"{path}: [{name}] field aliases must be a list of strings, got {value!r}")
            value = tuple(value)
        elif key == "table_clocks_mhz":
            if not isinstance(value, list) or len(value) < 2 or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
                raise ProfileError(f"{path}: [{name}] field table_clocks_mhz must list at least 2 clocks (MHz), "
                                   f"got {value!r}")
            value = tuple(value)
        elif key == "hf_name" or key == "display_name":
            if not isinstance(value, str):
                raise ProfileError(f"{path}: [{name}] field {key} must be a string, got {value!r}")
        elif key == "tp":
            if not isinstance(value, Mapping) or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value.values()):
                raise ProfileError(f"{path}: [{name}] field tp must map GPU names to integers >= 1, got {value!r}")
            value = dict(value)
        values[key] = value
    return cls(**values)


def _load(path: Path, cls: Callable[..., T]) -> dict[str, T]:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: invalid TOML: {exc}") from None
    return {name: _entry(path, name, entry, cls) for name, entry in raw.items()}


class Catalog:
    """The GPU and model specs of one profiles folder, with name resolution."""

    def __init__(self, gpus: Mapping[str, GpuSpec], models: Mapping[str, ModelSpec]):
        self.gpus = dict(gpus)
        self.models = dict(models)
        self._gpu_names = self._index(self.gpus)
        self._variants: dict[str, str] = {}  # variant model -> the shipped model whose profile it uses
        self._model_names = self._index(self.models)

    @classmethod
    def load(cls, profiles_dir: Path) -> Catalog:
        gpus = _load(profiles_dir / "gpus.toml", GpuSpec)
        for gpu in gpus.values():
            if gpu.idle_with_context_w < gpu.idle_w:
                raise ProfileError(f"{profiles_dir / 'gpus.toml'}: [{gpu.name}] field idle_with_context_w must be "
                                   f"at least idle_w ({gpu.idle_w:g}), got {gpu.idle_with_context_w:g}")
            bad = [c for c in gpu.table_clocks_mhz if c not in gpu.supported_clocks_mhz]
            if bad:
                raise ProfileError(f"{profiles_dir / 'gpus.toml'}: [{gpu.name}] table clock {bad[0]} MHz "
                                   f"is not a supported clock")
        return cls(gpus, _load(profiles_dir / "models.toml", ModelSpec))

    @staticmethod
    def _index(entries: Mapping[str, GpuSpec] | Mapping[str, ModelSpec]) -> dict[str, str]:
        index: dict[str, str] = {}
        for name, spec in entries.items():
            for alias in (name, getattr(spec, "hf_name", name), *spec.aliases):
                index[alias.lower()] = name
        return index

    def gpu(self, name: str) -> GpuSpec:
        try:
            return self.gpus[self._gpu_names[name.lower()]]
        except KeyError:
            raise UnknownProfileError(f"unknown gpu {name!r} (known: {', '.join(sorted(self.gpus))})") from None

    def add_variant(self, name: str, profile: str) -> ModelSpec:
        """Serve ``name`` as a model of its own (a fine-tune of ``profile``, say) with the specs and
        profile tables of ``profile``: the same physics, its own instances, traffic and SLOs."""
        base = self.model(profile)
        base_name = self._variants.get(base.name, base.name)
        existing = self._model_names.get(name.lower())
        if existing is not None:
            if existing == name and self._variants.get(name) == base_name:
                return self.models[name]
            raise ProfileError(f"model {name!r} is already {existing!r} (a shipped model, alias or variant): "
                               f"a variant needs a name of its own")
        spec = dataclasses.replace(self.models[base_name], name=name, aliases=())
        self.models[name] = spec
        self._model_names[name.lower()] = name
        self._variants[name] = base_name
        return spec

    def profile_of(self, name: str) -> str:
        """The model whose profile tables ``name`` uses: itself, or a variant's base."""
        model = self.model(name).name
        return self._variants.get(model, model)

    def model(self, name: str) -> ModelSpec:
        try:
            return self.models[self._model_names[name.lower()]]
        except KeyError:
            known = ", ".join(sorted(self.models))
            raise UnknownProfileError(f"unknown model {name!r} (known: {known})") from None
