"""The deployment files say what the README promises: a GPU per replica, gRPC health probes on the
served port, a headless service, round_robin clients, a GPU reservation in compose."""

import os

import yaml

DEPLOY = os.path.join(os.path.dirname(__file__), "..", "..", "deploy")


def load(*path):
    with open(os.path.join(DEPLOY, *path)) as f:
        return list(yaml.safe_load_all(f))


def test_deployment_requests_a_gpu_and_probes_grpc_health():
    (d,) = load("k8s", "deployment.yaml")
    c = d["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
    assert f"0.0.0.0:{port}" in c["args"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["grpc"]["port"] == port, probe
    assert d["spec"]["selector"]["matchLabels"] == d["spec"]["template"]["metadata"]["labels"]
    # The grace period outlasts the server's own drain deadline.
    grace_ms = int(c["args"][c["args"].index("--shutdown-grace-ms") + 1])
    assert d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] * 1000 > grace_ms


def test_service_is_headless_and_matches_the_pods():
    (s,) = load("k8s", "service.yaml")
    (d,) = load("k8s", "deployment.yaml")
    assert s["spec"]["clusterIP"] == "None"
    assert s["spec"]["selector"] == d["spec"]["template"]["metadata"]["labels"]
    assert {"port": 50051, "targetPort": "grpc", "name": "grpc"} in s["spec"]["ports"]


def test_client_job_uses_dns_and_round_robin():
    (j,) = load("k8s", "client-job.yaml")
    script = " ".join(j["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "dns:///attnd.default.svc.cluster.local:50051" in script
    assert "--load-balancing round_robin" in script


def test_compose_reserves_a_gpu_and_restarts_on_failure():
    (c,) = load("docker-compose.yml")
    s = c["services"]["attnd"]
    (dev,) = s["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    assert s["restart"] == "on-failure"
    assert s["build"]["dockerfile"] == "Dockerfile"


def test_kv_statefulset_gives_each_pod_an_address_its_caches_carry():
    pods, ready, sts = load("k8s", "kv-statefulset.yaml")
    assert (pods["kind"], ready["kind"], sts["kind"]) == ("Service", "Service", "StatefulSet")
    # The governing service keeps every pod's DNS record, ready or draining; the other lists the
    # ready ones for round_robin; both headless and selecting the StatefulSet's pods.
    assert sts["spec"]["serviceName"] == pods["metadata"]["name"]
    assert pods["spec"].get("publishNotReadyAddresses") is True
    labels = sts["spec"]["template"]["metadata"]["labels"]
    for s in (pods, ready):
        assert s["spec"]["clusterIP"] == "None"
        assert s["spec"]["selector"] == labels
    c = sts["spec"]["template"]["spec"]["containers"][0]
    advertise = c["args"][c["args"].index("--advertise-address") + 1]
    assert advertise.startswith("$(POD_NAME)." + pods["metadata"]["name"] + ".$(POD_NAMESPACE).svc")
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in c["env"]}
    assert env["POD_NAME"] == "metadata.name" and env["POD_NAMESPACE"] == "metadata.namespace"
    port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
    assert advertise.endswith(f":{port}")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    grace_ms = int(c["args"][c["args"].index("--shutdown-grace-ms") + 1])
    assert sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] * 1000 > grace_ms
