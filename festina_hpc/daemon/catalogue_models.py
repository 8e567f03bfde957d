"""What festinad serves when the model catalogue names its models: gateway models with the catalogue's SLOs.

The catalogue (``festina models``) is the source of served models and SLOs; ``--models`` and
``[daemon] models`` remain a bootstrap and an override (see ``festina_hpc/cli/daemon.py``).
A catalogued model is served under its catalogue name: ``/v1/models`` lists it and answers
echo it (``GatewayModel.public_name``); the profile's canonical name (the name its instances,
records and keys use), its Hugging Face name and its aliases are accepted in requests too. Its scaling bounds,
engine arguments and Slurm account become festinad's ``ModelOptions`` of that model.
"""

from __future__ import annotations

from collections.abc import Sequence

from festina_hpc.daemon.festinad import ModelOptions
from festina_hpc.daemon.gateway import GatewayModel
from festina_hpc.db.catalogue import CatalogueEntry
from festina_hpc.policy.types import ModelLimits, Slo
from festina_hpc.profiles.store import ProfileStore


def catalogue_gateway_models(entries: Sequence[CatalogueEntry], profiles: ProfileStore, gpu_type: str,
                             max_prompt_tokens: int = 0) -> list[GatewayModel]:
    """The gateway models of the entries on ``gpu_type`` (entries on other GPU types are not served here)."""
    served = []
    for entry in entries:
        if entry.gpu_type != gpu_type:
            continue
        spec = profiles.model(entry.profile)
        limit = min(max_prompt_tokens or spec.max_context_tokens, spec.max_context_tokens)
        aliases = tuple(dict.fromkeys(a for a in (spec.hf_name, *spec.aliases) if a not in (spec.name, entry.name)))
        served.append(GatewayModel(spec.name, Slo(entry.ttft_slo_s, entry.tbt_slo_s), aliases, limit,
                                   entry.max_output_tokens or spec.max_context_tokens, spec.max_context_tokens,
                                   public_name=entry.name))
    return served


def catalogue_model_options(entries: Sequence[CatalogueEntry], profiles: ProfileStore,
                            gpu_type: str) -> dict[str, ModelOptions]:
    """festinad's options of the entries on ``gpu_type``, by canonical profile name (what instances run)."""
    return {profiles.model(e.profile).name: ModelOptions(
        limits=ModelLimits(e.min_instances, e.max_instances, e.keep_alive_s),
        engine_args=e.engine_args, account=e.account) for e in entries if e.gpu_type == gpu_type}
