"""deploy/k8s: the verifier's Kubernetes manifests, checked offline.

- Every document validates (strict: unknown fields are errors) against the Kubernetes JSON
  schemas that the PyPI package kubernetes-validate ships, for every Kubernetes version from 1.28
  to the newest it has; a misspelt field is caught (negative control).
- They fit together: Service and PodDisruptionBudget select the pod's labels, the HPA scales this
  Deployment, the Secret has the keys the pod reads, Prometheus' annotations name the served port.
- They fit the verifier: the container's args parse with `picospec serve`'s own parser; the probes
  hit /healthz on the served port; the HPA's metric is a gauge the real server exports at
  /metrics (tiny target); terminationGracePeriodSeconds covers preStop plus the documented drain
  deadline, readiness drops a draining (503) pod within seconds, liveness never restarts one.
"""
from __future__ import annotations

import argparse
import copy
import re
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

import kubernetes_validate as kv  # the test extra: schemas vendored, no network at test time
from kubernetes_validate import utils as kv_utils

K8S = ROOT / "deploy" / "k8s"


def version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


VERSIONS = sorted({v for v in kv_utils.all_versions() if version_key(v) >= (1, 28)}, key=version_key)


def load_all() -> dict[str, dict]:
    docs: dict[str, dict] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                assert doc["kind"] not in docs, f"two {doc['kind']}s"
                docs[doc["kind"]] = doc
    return docs


@pytest.fixture(scope="module")
def docs() -> dict[str, dict]:
    return load_all()


@pytest.fixture(scope="module")
def pod(docs) -> dict:
    return docs["Deployment"]["spec"]["template"]


@pytest.fixture(scope="module")
def container(pod) -> dict:
    (c,) = pod["spec"]["containers"]
    return c


def test_the_manifests_are_all_there(docs):
    assert set(docs) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Secret"}


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_strictly_against_the_kubernetes_schemas(docs, version):
    assert VERSIONS, "kubernetes-validate ships no schemas for 1.28+"
    for kind, doc in docs.items():
        kv_utils.validate(doc, version, strict=True)  # raises ValidationError with the path


def test_the_validator_catches_a_misspelt_field(docs):
    bad = copy.deepcopy(docs["Deployment"])
    c = bad["spec"]["template"]["spec"]["containers"][0]
    c["readinesProbe"] = c.pop("readinessProbe")
    with pytest.raises(kv.ValidationError, match="readinesProbe"):
        kv_utils.validate(bad, VERSIONS[-1], strict=True)
    bad = copy.deepcopy(docs["HorizontalPodAutoscaler"])
    bad["spec"]["minReplicas"] = "two"
    with pytest.raises(kv.ValidationError):
        kv_utils.validate(bad, VERSIONS[-1], strict=True)


def test_the_pieces_reference_each_other(docs, pod, container):
    dep, svc, hpa, pdb, secret = (docs[k] for k in ("Deployment", "Service", "HorizontalPodAutoscaler",
                                                    "PodDisruptionBudget", "Secret"))
    labels = pod["metadata"]["labels"]
    for selector in (svc["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"],
                     dep["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"], ref["apiVersion"]) == ("Deployment", dep["metadata"]["name"], dep["apiVersion"])
    (port,) = container["ports"]
    assert svc["spec"]["ports"][0]["targetPort"] == port["name"]
    keys = set(secret["stringData"])
    env = {e["name"]: e for e in container["env"]}
    assert env["PICOSPEC_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "token"}
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert vols["tokens"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert {i["key"] for i in vols["tokens"]["secret"]["items"]} <= keys
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
    assert int(ann["prometheus.io/port"]) == port["containerPort"]


def test_the_container_runs_picospec_serve_with_flags_it_has(container):
    from cloud.cli import add_serve_arguments

    assert container["command"] == ["picospec"] and container["args"][0] == "serve"
    p = argparse.ArgumentParser(exit_on_error=False)
    add_serve_arguments(p)
    args = p.parse_args(container["args"][1:])  # an unknown or malformed flag raises
    (port,) = container["ports"]
    assert args.port == port["containerPort"] and args.host == "0.0.0.0"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert args.tokens_file.startswith(mounts["tokens"] + "/")
    assert args.max_sessions == 64


def test_probes_and_termination_fit_the_drain(docs, pod, container):
    deadline = int(docs["Deployment"]["metadata"]["annotations"]["picospec.dev/drain-deadline-seconds"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert (get["path"], get["port"]) == ("/healthz", "ws"), probe
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace >= int(pre_stop[1]) + deadline + 5, "SIGKILL must not cut the drain short"
    ready = container["readinessProbe"]
    assert ready["periodSeconds"] * ready["failureThreshold"] <= 10, "a draining pod leaves the Service fast"
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > grace, "liveness must not restart a draining pod"
    # the number is the one docs/DEPLOY.md gives
    assert re.search(rf"drain deadline[^.]*\b{deadline} s", (ROOT / "docs" / "DEPLOY.md").read_text())


def test_the_autoscaling_metric_is_a_gauge_the_verifier_exports(docs):
    from cloud.engine import TargetEngine
    from tests.tiny import ServerThread, tiny_model

    (metric,) = docs["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    with ServerThread(TargetEngine(tiny_model(0))) as server:
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10).read().decode()
    assert f"# TYPE {name} gauge" in text and re.search(rf"^{name} 0$", text, re.M)
    assert float(metric["pods"]["target"]["averageValue"]) < 64  # below --max-sessions
