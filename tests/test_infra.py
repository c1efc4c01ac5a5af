"""infra/: what a site deploys is valid, and never open (issue 14).

CI has no container engine, so the compose file and the Kubernetes manifests cannot run here.
They are validated instead, offline, by schema checkers from PyPI that ship their schemas:
check-jsonschema's vendored Compose specification, and kubernetes-validate's Kubernetes 1.37
schemas (strict: an unknown field fails). Then each service is checked for a login: every
secret comes from the environment or a Kubernetes Secret, never a committed value.
The Orthanc configuration of infra/orthanc is started for real: it refuses a request without
its credentials and accepts one with them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "infra" / "compose" / "compose.yaml"
K8S = sorted((ROOT / "infra" / "k8s").glob("*.yaml"))
ORTHANC_JSON = ROOT / "infra" / "orthanc" / "orthanc.json"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|AUTH_STRING|ACCESS_KEY|REGISTERED_USERS|CONNECTION_URL", re.I)


def check_compose(path: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent)) or "check-jsonschema"
    return subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(path)], capture_output=True, text=True)


def test_the_compose_file_follows_the_compose_specification(tmp_path):
    done = check_compose(COMPOSE)
    assert done.returncode == 0, done.stdout + done.stderr
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["orthanc"]["portz"] = ["8042:8042"]  # the checker does refuse a wrong key
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(broken))
    assert check_compose(tmp_path / "compose.yaml").returncode != 0


def k8s_documents() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in K8S for d in yaml.safe_load_all(p.read_text()) if d]


def test_the_kubernetes_manifests_are_valid_for_kubernetes_1_37():
    import kubernetes_validate

    docs = k8s_documents()
    kinds = {d["kind"] for _, d in docs}
    assert {"Deployment", "StatefulSet", "Service", "NetworkPolicy"} <= kinds
    for name, doc in docs:
        kubernetes_validate.validate(doc, "1.37.0", strict=True)  # offline: the package ships its schemas
    wrong = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"portz": []}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, "1.37.0", strict=True)


# -- closed by default: compose ---------------------------------------------------------------
def env_of(service: dict) -> dict:
    env = service.get("environment") or {}
    return dict(e.split("=", 1) for e in env) if isinstance(env, list) else env


def test_every_compose_variable_is_required_and_none_has_a_default():
    text = COMPOSE.read_text()
    refs = re.findall(r"\$\{([^}]*)\}", text)
    assert refs
    for ref in refs:
        assert re.fullmatch(r"[A-Z0-9_]+:\?.+", ref), f"${{{ref}}}: use ${{VAR:?message}} (required, no default)"


def test_no_compose_service_is_open():
    compose = yaml.safe_load(COMPOSE.read_text())
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        env = env_of(service)
        for key, value in env.items():
            if SECRET_NAME.search(key):
                assert "${" in str(value), f"{name}: {key} is committed, not taken from the environment"
        image = service["image"]
        if image.startswith("postgres"):
            assert "POSTGRES_PASSWORD" in env and "POSTGRES_HOST_AUTH_METHOD" not in env, name
        elif "prefect server" in " ".join(service.get("command", [])):
            assert env.get("PREFECT_SERVER_API_AUTH_STRING"), f"{name}: the Prefect API would be open"
        elif image.startswith("orthancteam/orthanc"):
            assert env["ORTHANC__AUTHENTICATION_ENABLED"] == "true", name
            assert "${ORTHANC_USER" in env["ORTHANC__REGISTERED_USERS"], f"{name}: nobody could log in"
        elif image.startswith("chrislusf/seaweedfs"):
            assert any(a.startswith("-s3.config=") for a in service["command"]), f"{name}: anonymous S3"
        else:
            assert not service.get("ports"), f"{name}: a published service without a known login rule"
        if "PREFECT_API_URL" in env:
            assert env.get("PREFECT_API_AUTH_STRING"), f"{name}: a Prefect client without the auth string"


# -- closed by default: Kubernetes --------------------------------------------------------------
def containers(doc: dict) -> list[dict]:
    return doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])


def test_no_kubernetes_service_is_open_and_no_secret_is_committed():
    for name, doc in k8s_documents():
        assert doc["kind"] != "Secret", f"{name}: a Secret is committed; create it at the site (infra/README.md)"
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{name}: {doc['metadata']['name']} exposed"
        for c in containers(doc):
            env = {e["name"]: e for e in c.get("env", [])}
            for key, entry in env.items():
                if SECRET_NAME.search(key):
                    from_secret = "secretKeyRef" in entry.get("valueFrom", {})
                    assert from_secret or "$(" in entry.get("value", ""), f"{name}: {key} is not from a Secret"
            command = " ".join(c.get("command", []) + c.get("args", []))
            if "prefect server" in command:
                assert "PREFECT_SERVER_API_AUTH_STRING" in env, f"{name}: the Prefect API would be open"
            if "PREFECT_API_URL" in env:
                assert "PREFECT_API_AUTH_STRING" in env, f"{name}: a Prefect client without the auth string"
            if c["image"].startswith("orthancteam/orthanc"):
                assert env["ORTHANC__AUTHENTICATION_ENABLED"]["value"] == "true"
                assert "secretKeyRef" in env["ORTHANC__REGISTERED_USERS"]["valueFrom"], "nobody could log in"
            if c["image"].startswith("chrislusf/seaweedfs"):
                assert "-s3.config=" in command, f"{name}: anonymous S3"
            if c["image"].startswith("postgres"):
                assert "POSTGRES_PASSWORD" in env and "POSTGRES_HOST_AUTH_METHOD" not in env


def test_the_network_is_denied_by_default():
    policies = [d for _, d in k8s_documents() if d["kind"] == "NetworkPolicy"]
    assert any(p["spec"]["podSelector"] == {} and not p["spec"].get("ingress") for p in policies)


# -- the Orthanc configuration, started for real ----------------------------------------------------
def test_the_infra_orthanc_refuses_strangers_and_lets_its_user_in(tmp_path):
    """infra/orthanc/orthanc.json, its ports and folders moved to loopback and a temporary folder:
    the user named by ORTHANC_USER/ORTHANC_PASSWORD gets in, nobody else does."""
    from pacs2bids.orthanc import free_port, orthanc_binary
    from pacs2bids.testing_servers import _kill, _wait_port

    cfg = json.loads(ORTHANC_JSON.read_text())
    assert cfg["AuthenticationEnabled"] is True and cfg["RegisteredUsers"], "nobody could log in"
    port = free_port()
    cfg.update(HttpPort=port, DicomPort=free_port(), StorageDirectory=str(tmp_path / "db"),
               IndexDirectory=str(tmp_path / "db"), RemoteAccessAllowed=False, Plugins=[])
    (tmp_path / "orthanc.json").write_text(json.dumps(cfg))
    user, password = "site-admin", "a-password-for-this-test-only"
    env = {"PATH": os.environ.get("PATH", ""), "ORTHANC_USER": user, "ORTHANC_PASSWORD": password}
    with open(tmp_path / "orthanc.log", "wb") as log:
        proc = subprocess.Popen([orthanc_binary(), str(tmp_path / "orthanc.json")], stdout=log,
                                stderr=subprocess.STDOUT, env=env)
    try:
        _wait_port(port, proc, "Orthanc")
        url = f"http://127.0.0.1:{port}/system"
        assert requests.get(url, timeout=10).status_code == 401
        assert requests.get(url, auth=(user, "wrong"), timeout=10).status_code == 401
        assert requests.get(url, auth=(user, password), timeout=10).status_code == 200
    finally:
        _kill(proc)
