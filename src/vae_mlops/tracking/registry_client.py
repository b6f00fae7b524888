"""The Model Registry of one registered model: versions, aliases, tags."""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
from mlflow.exceptions import MlflowException

from vae_mlops.tracking.store import error_code, mlflow_client, use_store


@dataclass(frozen=True)
class VersionInfo:
    """A registered model version, as plain data."""

    version: str
    run_id: str
    tags: dict[str, str]


class ModelRegistry:
    """The registry's calls for one registered model: versions, aliases, tags."""

    def __init__(self, name: str, uri: str) -> None:
        self.name = name
        self.uri = uri
        self.client = mlflow_client(uri)

    def aliases(self) -> dict[str, str]:
        """alias -> version; empty while the model has no version."""

        try:
            model = self.client.get_registered_model(self.name)
        except MlflowException as exc:
            if error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
                return {}
            raise
        return {alias: str(version) for alias, version in (model.aliases or {}).items()}

    def version(self, version: str) -> VersionInfo:
        mv = self.client.get_model_version(self.name, version)
        return VersionInfo(str(mv.version), mv.run_id, dict(mv.tags))

    def versions(self) -> list[VersionInfo]:
        found = self.client.search_model_versions(f"name = '{self.name}'")
        return sorted((VersionInfo(str(mv.version), mv.run_id, dict(mv.tags)) for mv in found), key=lambda v: int(v.version))

    def find(self, run_id: str, tag: str, value: str) -> VersionInfo | None:
        """The version registered from `run_id` whose `tag` equals `value`, if any."""
        found = self.client.search_model_versions(f"name = '{self.name}' and run_id = '{run_id}'")
        for mv in found:
            if mv.tags.get(tag) == value:
                return VersionInfo(str(mv.version), mv.run_id, dict(mv.tags))
        return None

    def create_version(self, model_uri: str, run_id: str, tags: dict[str, str]) -> VersionInfo:

        with use_store(self.uri):
            mv = mlflow.register_model(model_uri, self.name, tags=tags)
        return VersionInfo(str(mv.version), mv.run_id or run_id, dict(tags))

    def set_alias(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(self.name, alias, version)

    def set_tags(self, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, version, key, value)
