"""deploy/k8s/: the Kubernetes manifests are valid for pinned Kubernetes versions and agree with fedseg itself.

Offline and without a cluster: every manifest is validated with kubernetes-validate's bundled schemas in strict mode
(unknown fields are errors), every container command is parsed by the real Typer/click command it names (an unknown
or misspelt flag, a missing required option or a bad value fails), the server.toml of the ConfigMap loads with
fedseg's own loader, and the NetworkPolicies allow only what deploy/k8s/README.md says.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import click
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import typer
import yaml

from fedseg.server.configfile import load_server_config

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
# The oldest and the newest schema set kubernetes-validate 1.37 bundles (pyproject.toml pins that release).
KUBERNETES_VERSIONS = ("1.34.0", "1.37.0")
FLEET_PORT = 9092
SERVER_METRICS_PORT = 9300
SITE_METRICS_PORT = 9301


def _files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _all() -> list[dict[str, Any]]:
    return [doc for path in _files() for doc in _documents(path)]


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _all() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _validate(doc: dict[str, Any], version: str) -> None:
    """Strict validation; a kind without a bundled schema is an error here, not the CLI's warning."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.path)
        raise AssertionError(
            f"{doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {where}: {e.message}"
        ) from e
    except kubernetes_validate.SchemaNotFoundError as e:
        raise AssertionError(e.message) from e


def test_kubernetes_validate_bundles_the_pinned_versions() -> None:
    bundled = {v.rsplit(".", 1)[0] for v in kubernetes_validate.utils.all_versions()}
    assert {v.rsplit(".", 1)[0] for v in KUBERNETES_VERSIONS} <= bundled


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", _files(), ids=lambda p: p.name)
def test_manifest_validates_strictly(path: Path, version: str) -> None:
    docs = _documents(path)
    assert docs, path
    for doc in docs:
        _validate(doc, version)


def test_strict_validation_rejects_an_unknown_field() -> None:
    bad = _one("StatefulSet", "fedseg-site-1")
    bad = yaml.safe_load(yaml.safe_dump(bad))
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True  # typo
    with pytest.raises(AssertionError, match="readOnlyRootFileSystem"):
        _validate(bad, KUBERNETES_VERSIONS[0])


def test_kustomization_lists_every_manifest_but_the_example_secrets() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in _files() if not p.name.endswith(".example.yaml")}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for its built-in kustomize) not installed")
def test_kustomize_renders_and_the_result_validates() -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    assert {d["kind"] for d in docs} >= {"Namespace", "ConfigMap", "Service", "StatefulSet", "NetworkPolicy"}
    for doc in docs:
        _validate(doc, KUBERNETES_VERSIONS[-1])


# --- the container commands are real fedseg commands ---------------------------------------------------------


def _scripts() -> dict[str, click.Command]:
    """Console script name -> its click group, from pyproject.toml's [project.scripts]."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    groups: dict[str, click.Command] = {}
    for name, target in scripts.items():
        module, func = target.split(":")
        app = importlib.import_module(module).app
        assert func == "main", target
        groups[name] = typer.main.get_command(app)
    return groups


def _containers() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for doc in _all():
        if doc["kind"] in ("StatefulSet", "Deployment"):
            for c in doc["spec"]["template"]["spec"]["containers"]:
                out.append((doc["metadata"]["name"], c))
    return out


def _parse(argv: list[str]) -> tuple[click.Command, dict[str, Any]]:
    """Parse a container's command + args with the command's own click parser (no callback runs)."""
    groups = _scripts()
    assert argv[0] in groups, f"{argv[0]} is not a fedseg console script"
    command: click.Command = groups[argv[0]]
    rest = argv[1:]
    while isinstance(command, click.Group):
        assert rest and rest[0] in command.commands, f"{argv}: no subcommand {rest[:1]} in {list(command.commands)}"
        command, rest = command.commands[rest[0]], rest[1:]
    ctx = command.make_context(argv[0], list(rest))  # click.UsageError on an unknown flag or a bad value
    return command, ctx.params


def test_container_commands_parse_with_the_real_cli() -> None:
    seen = set()
    for name, container in _containers():
        argv = [str(a) for a in container["command"] + container.get("args", [])]
        command, _ = _parse(argv)
        options = {opt for p in command.params for opt in p.opts}
        for flag in (a for a in argv if a.startswith("--")):
            assert flag in options, f"{name}: {flag} is not an option of {argv[:2]}"
        seen.add(command.name)
    assert seen == {"start", "join"}


def test_an_unknown_flag_fails_the_parse() -> None:
    with pytest.raises(click.UsageError, match="--metric-port"):
        _parse(["fed-client", "join", "--site", "s", "--data", "/data", "--metric-port", "9301"])


def _container(name: str) -> dict[str, Any]:
    return next(c for n, c in _containers() if n == name)


def _argv_value(container: dict[str, Any], flag: str) -> str:
    argv = [str(a) for a in container["command"] + container.get("args", [])]
    return argv[argv.index(flag) + 1]


def _mounts(statefulset: str) -> dict[str, dict[str, Any]]:
    """mountPath -> mount (with the volume it mounts under "volume")."""
    doc = _one("StatefulSet", statefulset)
    volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"]["volumes"]}
    volumes.update({t["metadata"]["name"]: {"pvc": True} for t in doc["spec"].get("volumeClaimTemplates", [])})
    mounts = {}
    for m in _container(statefulset)["volumeMounts"]:
        mounts[m["mountPath"]] = {**m, "volume": volumes[m["name"]]}
    return mounts


def _mount_of(path: str, mounts: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    best = None
    for mount_path, mount in mounts.items():
        inside = path == mount_path or path.startswith(mount_path.rstrip("/") + "/")
        if inside and (best is None or len(mount_path) > len(best["mountPath"])):
            best = mount
    return best


def _server_toml() -> dict[str, Any]:
    return tomllib.loads(_one("ConfigMap", "fedseg-server-config")["data"]["server.toml"])


def test_server_config_loads_and_matches_the_service_and_mounts(tmp_path: Path) -> None:
    raw = _one("ConfigMap", "fedseg-server-config")["data"]["server.toml"]
    certs = tmp_path / "certs"  # the pod's /certs and /config do not exist here
    certs.mkdir()
    for name in ("ca.crt", "server.pem", "server.key"):
        (certs / name).write_text("placeholder")
    (tmp_path / "sites.toml").write_text(_one("ConfigMap", "fedseg-server-config")["data"]["sites.toml"])
    (tmp_path / "validation").mkdir()
    local = raw.replace('"/certs/', f'"{certs}/').replace('"/config/', f'"{tmp_path}/')
    local = local.replace('"/data/validation"', f'"{tmp_path / "validation"}"')
    (tmp_path / "server.toml").write_text(local)
    cfg = load_server_config(tmp_path / "server.toml")
    assert not cfg.loopback and cfg.tls is not None and cfg.supernode_auth
    assert (cfg.port, cfg.metrics.port, cfg.metrics.host) == (FLEET_PORT, SERVER_METRICS_PORT, "0.0.0.0")

    service = _one("Service", "fedseg-server")
    assert [(p["port"], p["protocol"]) for p in service["spec"]["ports"]] == [(FLEET_PORT, "TCP")]  # fleet only
    ports = {p["name"]: p["containerPort"] for p in _container("fedseg-server")["ports"]}
    assert ports == {"fleet": FLEET_PORT, "metrics": SERVER_METRICS_PORT}
    assert service["spec"]["ports"][0]["targetPort"] == "fleet"

    # every file the config names comes from the right read-only mount; what it writes is on the claim
    mounts = _mounts("fedseg-server")
    toml = _server_toml()
    secret = _one_example("fedseg-server-tls")
    for key in ("ca", "cert", "key"):
        mount = _mount_of(toml["tls"][key], mounts)
        assert mount and mount["readOnly"] and mount["volume"]["secret"]["secretName"] == "fedseg-server-tls"
        assert Path(toml["tls"][key]).name in secret["stringData"]
    for path in (toml["sites_file"], "/config/server.toml"):
        mount = _mount_of(path, mounts)
        assert mount and mount["readOnly"] and Path(path).name in _one("ConfigMap", "fedseg-server-config")["data"]
    mount = _mount_of(toml["validation"]["data"], mounts)
    assert mount and mount["readOnly"] and mount["volume"]["persistentVolumeClaim"]["readOnly"]
    for path in (toml["output_dir"], toml["database"]):
        mount = _mount_of(path, mounts)
        assert mount and not mount.get("readOnly") and mount["volume"] == {"pvc": True}, path


def _one_example(name: str) -> dict[str, Any]:
    found = [d for p in K8S.glob("*.example.yaml") for d in _documents(p) if d["metadata"]["name"] == name]
    assert len(found) == 1, name
    return found[0]


def test_site_paths_match_its_mounts_and_secret() -> None:
    site = _container("fedseg-site-1")
    mounts = _mounts("fedseg-site-1")
    secret = _one_example("fedseg-site-1")
    for flag in ("--root-certificates", "--auth-key"):
        path = _argv_value(site, flag)
        mount = _mount_of(path, mounts)
        assert mount and mount["readOnly"] and mount["volume"]["secret"]["secretName"] == "fedseg-site-1", flag
        assert Path(path).name in secret["stringData"], flag
    data = _mount_of(_argv_value(site, "--data"), mounts)
    assert data and data["readOnly"] and data["volume"]["persistentVolumeClaim"]["readOnly"]
    assert _mount_of(_argv_value(site, "--labels"), mounts) is data
    workdir = _mount_of(_argv_value(site, "--workdir"), mounts)
    assert workdir and not workdir.get("readOnly") and workdir["volume"] == {"pvc": True}
    host, port = _argv_value(site, "--server").rsplit(":", 1)
    assert int(port) == FLEET_PORT and host.split(".")[0] == "fedseg-server"
    assert int(_argv_value(site, "--metrics-port")) == SITE_METRICS_PORT
    assert [p["containerPort"] for p in site["ports"]] == [SITE_METRICS_PORT]


@pytest.mark.parametrize("name", ["fedseg-server", "fedseg-site-1"])
def test_pods_run_as_the_image_user_with_a_read_only_root(name: str) -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "--uid 1000" in dockerfile and "USER fedseg" in dockerfile
    pod = _one("StatefulSet", name)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["runAsGroup"] == 1000
    assert pod["securityContext"]["fsGroup"] == 1000
    assert pod["automountServiceAccountToken"] is False
    container = _container(name)
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    # with a read-only root, the places fedseg and its libraries write are volumes: /tmp (tempfile), $HOME (caches)
    mounts = _mounts(name)
    env = {e["name"]: e["value"] for e in container["env"]}
    for path in ("/tmp", env["HOME"]):
        assert path in mounts and "emptyDir" in mounts[path]["volume"], path
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])


# --- NetworkPolicies -----------------------------------------------------------------------------------------


def _labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "fedseg", "app.kubernetes.io/component": component}


def _ports(rule: dict[str, Any]) -> set[tuple[str, int]]:
    return {(p.get("protocol", "TCP"), p["port"]) for p in rule.get("ports", [])}


def test_site_egress_is_only_the_fleet_port_and_dns() -> None:
    policy = _one("NetworkPolicy", "fedseg-site")["spec"]
    assert policy["podSelector"]["matchLabels"] == _labels("site")
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    allowed = set()
    for rule in policy["egress"]:
        assert rule.get("to") and rule.get("ports"), f"an egress rule without peers or ports allows all: {rule}"
        for peer in rule["to"]:
            assert "ipBlock" not in peer, peer
        allowed |= _ports(rule)
        if _ports(rule) == {("TCP", FLEET_PORT)}:
            assert rule["to"] == [{"podSelector": {"matchLabels": _labels("server")}}]
        else:
            assert _ports(rule) <= {("UDP", 53), ("TCP", 53)}
            assert all(peer["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"} for peer in rule["to"])
    assert allowed == {("TCP", FLEET_PORT), ("UDP", 53), ("TCP", 53)}
    for rule in policy["ingress"]:
        assert rule.get("from") and _ports(rule) == {("TCP", SITE_METRICS_PORT)}


def test_only_sites_and_prometheus_reach_the_server() -> None:
    policy = _one("NetworkPolicy", "fedseg-server")["spec"]
    assert policy["podSelector"]["matchLabels"] == _labels("server")
    assert "Ingress" in policy["policyTypes"]
    by_port = {}
    for rule in policy["ingress"]:
        assert rule.get("from") and rule.get("ports"), f"an ingress rule without peers or ports allows all: {rule}"
        for port in _ports(rule):
            by_port[port] = rule["from"]
    assert set(by_port) == {("TCP", FLEET_PORT), ("TCP", SERVER_METRICS_PORT)}
    assert by_port[("TCP", FLEET_PORT)] == [{"podSelector": {"matchLabels": _labels("site")}}]
    prometheus = by_port[("TCP", SERVER_METRICS_PORT)]
    assert all(p["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"} for p in prometheus)
    if "Egress" in policy["policyTypes"]:
        assert policy.get("egress", []) == []
