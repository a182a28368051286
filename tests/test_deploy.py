"""deploy/: the Kubernetes manifests validate against Kubernetes' own schemas (offline, with
kubernetes-validate), and the pieces agree with each other and with the server's settings."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from ghostpen.server.app import LIVENESS_SERVICE
from ghostpen.server.settings import Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
KUBERNETES_VERSION = "1.30"  # grpc probes are GA from 1.27; 1.30 is widely run


def _resources() -> list[tuple[str, dict]]:
    found = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        found += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def _one(kind: str, name: str) -> dict:
    return next(d for _, d in _resources() if d["kind"] == kind and d["metadata"]["name"] == name)


@pytest.mark.parametrize(
    ("file", "resource"),
    _resources(),
    ids=lambda value: value if isinstance(value, str) else value["metadata"]["name"],
)
def test_each_manifest_is_valid_kubernetes(file: str, resource: dict) -> None:
    kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def test_the_validator_rejects_a_broken_manifest() -> None:
    broken = _one("StatefulSet", "ghostpen")
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_kustomization_names_every_manifest_and_config_file() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {f"kubernetes/{p.name}" for p in (DEPLOY / "kubernetes").glob("*.yaml")}
    for generator in kustomization["configMapGenerator"]:
        for file in generator["files"]:
            assert (DEPLOY / file).is_file(), file


def test_the_frontends_settings_load_and_match_the_fleets() -> None:
    frontends = _one("StatefulSet", "ghostpen")
    environ = dict(_one("ConfigMap", "ghostpen-settings")["data"])
    environ["GHOSTPEN_DATABASE"] = "postgresql://ghostpen:secret@postgres:5432/ghostpen"
    settings = Settings.load(environ=environ)  # every key is a known setting
    vllm = _one("StatefulSet", "vllm")
    expected = tuple(f"http://vllm-{i}.vllm:8000" for i in range(vllm["spec"]["replicas"]))
    assert settings.engine.engine == "remote"
    assert settings.engine.upstream_urls() == expected
    args = vllm["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--served-model-name={settings.engine.upstream_model}" in args

    pod = frontends["spec"]["template"]["spec"]
    assert pod["enableServiceLinks"] is False  # GHOSTPEN_PORT=tcp://... would break the settings
    assert pod["terminationGracePeriodSeconds"] > settings.server.shutdown_grace_s
    container = pod["containers"][0]
    assert container["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE
    assert container["readinessProbe"]["grpc"]["port"] == settings.server.port

    replicas = (DEPLOY / "kubernetes" / "nginx" / "ghostpen-replicas.conf").read_text()
    servers = re.findall(r"^server (ghostpen-\d+)\.ghostpen\.", replicas, re.MULTILINE)
    assert servers == [f"ghostpen-{i}" for i in range(frontends["spec"]["replicas"])]
