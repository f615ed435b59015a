"""Kubernetes manifests: schema-valid offline, consistent across objects, commands Shoal accepts.

Core kinds validate with kubernetes-validate in strict mode; RayJob, RayCluster and PyTorchJob with
jsonschema against the CRDs in ../shared/k8s-crds (third-party data beside the checkout), closed so
an unknown field fails as the API server would prune it. The shipped k8s/ files are the render of
configs/quickstart.yaml (golden), and every command in them parses with Shoal's own CLI parser.
"""

from __future__ import annotations

import argparse
import functools
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from shoal import cli, k8s
from shoal.config import load_config
from shoal.errors import ConfigError
from shoal.k8s import RenderOptions

from conftest import REPO

K8S_DIR = REPO / "k8s"
CRD_DIR = REPO.parent / "shared" / "k8s-crds"
QUICKSTART = REPO / "configs" / "quickstart.yaml"
SHIPPED_IMAGE = "shoal:latest"
REGENERATE = "for t in rayjob pytorchjob job; do shoal k8s render configs/quickstart.yaml --target $t --image shoal:latest -o k8s; done"
# the oldest Kubernetes whose schemas kubernetes-validate bundles (indexed Jobs need >= 1.24) and the newest
CORE_VERSIONS = (kubernetes_validate.utils.all_versions()[0], kubernetes_validate.latest_version())
CRD_FILES = {
    ("ray.io/v1", "RayJob"): "ray.io_rayjobs.yaml",
    ("ray.io/v1", "RayCluster"): "ray.io_rayclusters.yaml",
    ("kubeflow.org/v1", "PyTorchJob"): "kubeflow.org_pytorchjobs.yaml",
}
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
PORT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")

GPU = RenderOptions(gpu_resource="nvidia.com/gpu", storage_class="nfs-client", grace_period_s=120, restarts=5)
# id: (overrides of the quickstart, render keyword arguments)
VARIANTS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "quickstart": ((), {}),
    "gpus-namespace": (
        (
            "name=bert-large",
            "scaling.num_workers=4",
            "scaling.cpus_per_worker=2.5",
            "scaling.gpus_per_worker=1",
            "scaling.max_failures=2",
            "run.dir=/mnt/ckpt/exp1",
        ),
        {"namespace": "ml-team", "options": GPU},
    ),
    "one-worker": (
        ("scaling.num_workers=1", "scaling.cpus_per_worker=1.5", "run.dir=ckpt/run"),
        {"options": RenderOptions(memory="3Gi")},
    ),
}


def config(*overrides: str):
    return load_config(QUICKSTART, list(overrides))


@functools.cache
def render_variant(variant: str, target: str) -> dict[str, str]:
    overrides, kwargs = VARIANTS[variant]
    return k8s.render(config(*overrides), target, "registry.example.com/shoal:0.1.0", **kwargs)


def resources_of(files: dict[str, str]) -> list[dict[str, Any]]:
    """The Kubernetes objects among rendered files (kustomizations left out)."""
    return [yaml.load(text, Loader=LOADER) for path, text in files.items() if not path.endswith("kustomization.yaml")]


def shipped_files() -> dict[str, str]:
    return {str(p.relative_to(K8S_DIR)): p.read_text() for p in sorted(K8S_DIR.glob("*/**/*.yaml"))}


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [o for o in objs if o["kind"] == kind]
    return found


def all_sets() -> list[tuple[str, list[dict[str, Any]]]]:
    """(id, objects) for the shipped manifests and every variant x target."""
    sets = [("shipped", resources_of(shipped_files()))]
    sets += [(f"{v}-{t}", resources_of(render_variant(v, t))) for v in VARIANTS for t in k8s.TARGETS]
    return sets


SETS = all_sets()


def pod_templates(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """Every pod template inside a Job, RayJob or PyTorchJob."""
    spec = obj.get("spec", {})
    if obj["kind"] == "Job":
        return [spec["template"]]
    if obj["kind"] == "RayJob":
        cluster = spec["rayClusterSpec"]
        return [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]
    if obj["kind"] == "PyTorchJob":
        return [r["template"] for r in spec["pytorchReplicaSpecs"].values()]
    return []


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for t in pod_templates(obj) for c in t["spec"].get("initContainers", []) + t["spec"]["containers"]]


# ---------------------------------------------------------------- offline schema validation


@functools.cache
def crd_schema(api_version: str, kind: str) -> dict[str, Any]:
    """The CRD's openAPIV3Schema for that version, closed against unknown fields."""
    if not CRD_DIR.is_dir():
        pytest.skip(f"CRD schemas not found at {CRD_DIR} (third-party data beside the checkout)")
    crd = yaml.load((CRD_DIR / CRD_FILES[api_version, kind]).read_text(), Loader=LOADER)
    version = api_version.split("/")[1]
    (schema,) = [v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version]
    return closed(schema)


def closed(schema: Any) -> Any:
    """The schema with additionalProperties: false wherever it lists properties and keeps no unknown fields."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: closed(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = closed(out["additionalProperties"])
    if "items" in out:
        out["items"] = closed(out["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [closed(s) for s in out[key]]
    return out


def crd_errors(obj: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    import jsonschema

    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(obj)
    ]


@pytest.fixture(autouse=True, scope="module")
def _schemas_read_once():
    """kubernetes-validate reads its 2 MB definitions file on every call; read each once here."""
    import kubernetes_validate.utils as kv_utils

    with pytest.MonkeyPatch.context() as m:
        if hasattr(kv_utils, "schema_contents"):
            m.setattr(kv_utils, "schema_contents", functools.cache(kv_utils.schema_contents))
        yield


def validate_core(obj: dict[str, Any]) -> None:
    """kubernetes-validate, strict; an unknown kind raises SchemaNotFoundError (a failure, not a warning)."""
    for version in CORE_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(
                f"{obj['kind']}/{obj['metadata'].get('name')} invalid for Kubernetes {version}: {e.message} at {list(e.absolute_path)}"
            )


def test_closed_schema_rejects_an_unknown_field():
    schema = crd_schema("kubeflow.org/v1", "PyTorchJob")
    job = resources_of(shipped_files())
    pytorchjob = by_kind(job, "PyTorchJob")
    assert crd_errors(pytorchjob, schema) == []
    typo = {
        **pytorchjob,
        "spec": {**pytorchjob["spec"], "elasticPolicy": {**pytorchjob["spec"]["elasticPolicy"], "rdzvBackEnd": "c10d"}},
    }
    assert any("rdzvBackEnd" in e for e in crd_errors(typo, schema))


def test_kubernetes_validate_fails_on_unknown_kinds_and_fields_offline():
    with pytest.raises(kubernetes_validate.utils.SchemaNotFoundError):
        kubernetes_validate.validate(
            {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "x"}}, CORE_VERSIONS[-1], strict=True
        )
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "dta": {}},
            CORE_VERSIONS[-1],
            strict=True,
        )


def is_custom(obj: dict[str, Any]) -> bool:
    return (obj["apiVersion"], obj["kind"]) in CRD_FILES


CR_SETS = [(set_id, [o for o in objs if is_custom(o)]) for set_id, objs in SETS if any(is_custom(o) for o in objs)]


@pytest.mark.parametrize("set_id,objs", SETS, ids=[s for s, _ in SETS])
def test_core_objects_and_pod_templates_validate_strictly(set_id, objs):
    for obj in objs:
        if not is_custom(obj):
            validate_core(obj)
        for i, template in enumerate(pod_templates(obj) if is_custom(obj) else []):
            validate_core(
                {
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {"name": f"{obj['metadata']['name']}-{i}"},
                    "template": template,
                }
            )


@pytest.mark.parametrize("set_id,objs", CR_SETS, ids=[s for s, _ in CR_SETS])
def test_custom_resources_validate_against_the_crds(set_id, objs):
    for obj in objs:
        assert crd_errors(obj, crd_schema(obj["apiVersion"], obj["kind"])) == [], set_id
        if obj["kind"] == "RayJob":  # the embedded cluster is a RayCluster spec too
            cluster = {
                "apiVersion": "ray.io/v1",
                "kind": "RayCluster",
                "metadata": obj["metadata"],
                "spec": obj["spec"]["rayClusterSpec"],
            }
            assert crd_errors(cluster, crd_schema("ray.io/v1", "RayCluster")) == [], set_id


# ---------------------------------------------------------------- the shipped files


def test_shipped_manifests_are_the_render_of_the_quickstart():
    base = None
    expected: dict[str, str] = {}
    for target in k8s.TARGETS:
        files = k8s.render(config(), target, SHIPPED_IMAGE)
        target_base = {p: t for p, t in files.items() if p.startswith("base/")}
        assert base is None or target_base == base, "the base must not depend on the target"
        base = target_base
        expected.update(files)
    shipped = shipped_files()
    assert sorted(shipped) == sorted(expected), f"k8s/ holds other files than the render; regenerate: {REGENERATE}"
    for path, text in expected.items():
        assert shipped[path] == text, f"k8s/{path} differs from the render; regenerate: {REGENERATE}"


def test_kustomizations_list_exactly_their_directory():
    dirs = [K8S_DIR / "base", *(K8S_DIR / "overlays" / t for t in k8s.TARGETS)]
    for d in dirs:
        kust = yaml.safe_load((d / "kustomization.yaml").read_text())
        assert kust["kind"] == "Kustomization"
        files = [r for r in kust["resources"] if r.endswith(".yaml")]
        assert sorted(files) == sorted(p.name for p in d.glob("*.yaml") if p.name != "kustomization.yaml")
        bases = [r for r in kust["resources"] if not r.endswith(".yaml")]
        assert bases == ([] if d.name == "base" else ["../../base"])
        assert all((d / r).resolve().exists() for r in kust["resources"])


def test_dockerfile_installs_cpu_torch_before_the_project():
    text = (K8S_DIR / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    assert "ARG TORCH_VERSION=2.13.0" in lines and "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in lines
    torch_at = next(i for i, line in enumerate(lines) if "torch==${TORCH_VERSION}" in line and "--index-url" in line)
    project_at = next(i for i, line in enumerate(lines) if line.startswith("RUN pip install ."))
    assert torch_at < project_at
    copied = [w for line in lines if line.startswith("COPY") for w in line.split()[1:-1]]
    assert {"pyproject.toml", "README.md", "platform", "configs"} <= set(copied)
    assert all((REPO / c).exists() for c in copied)
    assert "USER 1000" in lines and f"WORKDIR {k8s.WORKDIR}" in lines  # the manifests' runAsUser and relative run.dir
    assert any("apt-get install" in line and "wget" in line for line in lines)  # KubeRay's probes call wget


# ---------------------------------------------------------------- cross-object checks


@pytest.mark.parametrize("variant", VARIANTS)
def test_headless_service_selects_the_job_pods_and_names_pod_zero(variant):
    objs = resources_of(render_variant(variant, "job"))
    service, job = by_kind(objs, "Service"), by_kind(objs, "Job")
    template = job["spec"]["template"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    assert template["spec"]["subdomain"] == service["metadata"]["name"]
    args = torchrun_args(by_name(containers(job), "worker")["command"])
    host, port = args.rdzv_endpoint.rsplit(":", 1)
    # Indexed Job pods are named <job>-<index> inside the Service's subdomain
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert int(port) == service["spec"]["ports"][0]["port"] == service["spec"]["ports"][0]["targetPort"]
    assert int(port) in [p["containerPort"] for p in by_name(containers(job), "worker")["ports"]]
    init = by_name(containers(job), "wait-for-rendezvous")["command"]
    assert init[-2] == host
    workers = config(*VARIANTS[variant][0]).scaling.num_workers
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == int(args.nnodes) == workers


@pytest.mark.parametrize("variant", VARIANTS)
def test_pytorchjob_torchrun_flags_match_the_elastic_policy(variant):
    job = by_kind(resources_of(render_variant(variant, "pytorchjob")), "PyTorchJob")
    spec, policy = job["spec"], job["spec"]["elasticPolicy"]
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    assert list(spec["pytorchReplicaSpecs"]) == ["Worker"]
    (c,) = worker["template"]["spec"]["containers"]
    assert c["name"] == "pytorch"  # the container the operator configures
    args = torchrun_args(c["command"])
    cfg = config(*VARIANTS[variant][0])
    assert worker["replicas"] == policy["minReplicas"] == policy["maxReplicas"] == cfg.scaling.num_workers
    assert args.nnodes == f"{policy['minReplicas']}:{policy['maxReplicas']}"
    # the operator's rendezvous host is <job>-worker-0, the pod and per-pod Service it creates
    assert args.rdzv_endpoint == f"{job['metadata']['name']}-worker-0:{policy['rdzvPort']}"
    assert args.rdzv_backend == policy["rdzvBackend"] == "c10d" and args.rdzv_id == policy["rdzvId"]
    assert args.rdzv_conf == ",".join(f"{kv['key']}={kv['value']}" for kv in policy["rdzvConf"])
    assert args.max_restarts == policy["maxRestarts"] == cfg.scaling.max_failures
    assert args.nproc_per_node == spec["nprocPerNode"] == "1"
    assert {"name": "pytorchjob-port", "containerPort": policy["rdzvPort"], "protocol": "TCP"} in c["ports"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_rayjob_has_one_worker_pod_per_rank_and_a_head_without_ranks(variant):
    job = by_kind(resources_of(render_variant(variant, "rayjob")), "RayJob")
    cfg = config(*VARIANTS[variant][0])
    cluster = job["spec"]["rayClusterSpec"]
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == cfg.scaling.num_workers
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    # enough for one rank, too few for two: Ray places exactly one rank on each worker pod
    assert cfg.scaling.cpus_per_worker <= float(group["rayStartParams"]["num-cpus"]) < 2 * cfg.scaling.cpus_per_worker
    assert float(group["rayStartParams"].get("num-gpus", 0)) == cfg.scaling.gpus_per_worker


@pytest.mark.parametrize(
    "variant,cpu,memory,gpus",
    [("quickstart", "1", "2Gi", None), ("gpus-namespace", "2500m", "13Gi", "1"), ("one-worker", "1500m", "3Gi", None)],
)
@pytest.mark.parametrize("target", k8s.TARGETS)
def test_worker_resources_come_from_scaling(variant, cpu, memory, gpus, target):
    objs = resources_of(render_variant(variant, target))
    job = next(o for o in objs if o["kind"] in ("RayJob", "PyTorchJob", "Job"))
    templates = pod_templates(job)[-1:]  # the RayJob's head is not a rank
    for t in templates:
        (c,) = t["spec"]["containers"]
        res = c["resources"]
        assert res["requests"]["cpu"] == cpu and res["requests"]["memory"] == res["limits"]["memory"] == memory
        assert "cpu" not in res["limits"]
        assert res["requests"].get("nvidia.com/gpu") == res["limits"].get("nvidia.com/gpu") == gpus
        tolerations = t["spec"].get("tolerations", [])
        assert ([tl["key"] for tl in tolerations] == ["nvidia.com/gpu"]) == (gpus is not None)


@pytest.mark.parametrize("set_id,objs", SETS, ids=[s for s, _ in SETS])
def test_names_are_dns_labels_and_references_resolve(set_id, objs):
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    for kind, name in names:
        assert DNS_LABEL.fullmatch(name) and len(name) <= 63, (kind, name)
    for obj in objs:
        namespace = obj["metadata"].get("namespace")
        assert {o["metadata"].get("namespace") for o in objs} == {namespace}
        for t in pod_templates(obj):
            spec = t["spec"]
            assert ("ServiceAccount", spec["serviceAccountName"]) in names
            volumes = {v["name"]: v for v in spec["volumes"]}
            for v in volumes.values():
                if "configMap" in v:
                    assert ("ConfigMap", v["configMap"]["name"]) in names
                if "persistentVolumeClaim" in v:
                    assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in names
            for c in spec.get("initContainers", []) + spec["containers"]:
                assert DNS_LABEL.fullmatch(c["name"])
                assert all(m["name"] in volumes for m in c.get("volumeMounts", []))
                assert all(PORT_NAME.fullmatch(p["name"]) and len(p["name"]) <= 15 for p in c.get("ports", []))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("target", k8s.TARGETS)
def test_grace_period_covers_the_preemption_checkpoint(variant, target):
    objs = resources_of(render_variant(variant, target))
    options = VARIANTS[variant][1].get("options", RenderOptions())
    job = next(o for o in objs if o["kind"] in ("RayJob", "PyTorchJob", "Job"))
    for t in pod_templates(job):
        assert t["spec"]["terminationGracePeriodSeconds"] == options.grace_period_s
    for c in containers(job):
        if c.get("command", [None])[0] == "torchrun":  # torchrun SIGKILLs its ranks after --shutdown-timeout
            assert torchrun_args(c["command"]).shutdown_timeout == options.grace_period_s - k8s.SHUTDOWN_MARGIN_S
        env = {e["name"]: e["value"] for e in c.get("env", [])}
        if "RAY_JOB_STOP_WAIT_TIME_S" in env:  # Ray's job supervisor SIGKILLs the driver after this
            assert int(env["RAY_JOB_STOP_WAIT_TIME_S"]) == options.grace_period_s - k8s.SHUTDOWN_MARGIN_S
    restarts = {
        "RayJob": job["spec"].get("backoffLimit"),
        "Job": job["spec"].get("backoffLimit"),
        "PyTorchJob": job["spec"].get("runPolicy", {}).get("backoffLimit"),
    }[job["kind"]]
    per_pod = 1 if job["kind"] == "RayJob" else config(*VARIANTS[variant][0]).scaling.num_workers
    assert restarts == options.restarts * per_pod


# ---------------------------------------------------------------- commands and the config they read


def torchrun_args(command: list[str]) -> argparse.Namespace:
    """torchrun's own parser on a container command (a typo in a flag fails here)."""
    from torch.distributed.run import get_args_parser

    assert command[0] == "torchrun"
    try:
        return get_args_parser().parse_args(command[1:])
    except SystemExit:
        pytest.fail(f"torchrun's parser rejects: {shlex.join(command)}")


def shoal_command(c: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    """The `shoal ...` argv a container (or a RayJob's entrypoint) runs."""
    if obj["kind"] == "RayJob":
        argv = shlex.split(obj["spec"]["entrypoint"])
        assert argv[0] == "shoal"
        return argv[1:]
    args = torchrun_args(c["command"])
    assert args.module and args.training_script == "shoal"
    return args.training_script_args


def parse_shoal(argv: list[str]) -> argparse.Namespace:
    try:
        return cli.build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"shoal's parser rejects: shoal {shlex.join(argv)}")


def by_name(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (found,) = [i for i in items if i["name"] == name]
    return found


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("target", k8s.TARGETS)
def test_entrypoints_parse_with_shoals_cli_and_read_the_mounted_config(variant, target, tmp_path):
    objs = resources_of(render_variant(variant, target))
    job = next(o for o in objs if o["kind"] in ("RayJob", "PyTorchJob", "Job"))
    cm = by_kind(objs, "ConfigMap")
    runners = [c for c in containers(job) if c["name"] in ("ray-head", "pytorch", "worker")]
    assert len(runners) == 1
    c = runners[0]
    args = parse_shoal(shoal_command(c, job))
    assert args.command == ("train" if target == "rayjob" else "worker") and args.resume
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for t in pod_templates(job) for v in t["spec"]["volumes"]}
    config_mount = next(n for n, v in volumes.items() if v.get("configMap", {}).get("name") == cm["metadata"]["name"])
    claim = next(n for n, v in volumes.items() if "persistentVolumeClaim" in v)
    key = Path(args.config).relative_to(mounts[config_mount]).as_posix()
    path = tmp_path / key
    path.write_text(cm["data"][key])
    plain = load_config(path)  # Shoal's own loader: the ConfigMap is the job with run.dir on the volume
    assert plain == config(*VARIANTS[variant][0]).replace({"run.dir": mounts[claim]})
    cfg = load_config(path, args.overrides)  # and what the command runs
    # a RayJob always drives the in-cluster Ray, never an address from a laptop config
    assert cfg == (plain.replace({"scaling.address": "auto"}) if target == "rayjob" else plain)
    for t in pod_templates(job):  # every pod (Ray head and workers alike) has the volume at run.dir
        main = t["spec"]["containers"][0]
        assert [m["mountPath"] for m in main["volumeMounts"] if m["name"] == claim] == [cfg.run.dir]


@pytest.mark.parametrize(
    "run_dir,expected",
    [(None, "/workspace/runs/quickstart"), ("ckpt/run", "/workspace/ckpt/run"), ("/mnt/ckpt/exp1", "/mnt/ckpt/exp1")],
)
def test_run_dir_is_absolute_on_the_volume(run_dir, expected):
    overrides = [f"run.dir={run_dir}"] if run_dir else []
    files = k8s.render(config(*overrides), "job", SHIPPED_IMAGE)
    assert (
        f"run.dir={expected}"
        in by_kind(resources_of(files), "Job")["spec"]["template"]["spec"]["containers"][0]["command"]
    )
    assert yaml.safe_load(by_kind(resources_of(files), "ConfigMap")["data"]["job.yaml"])["run"]["dir"] == expected


def test_embedded_scripts_compile_and_the_dns_wait_returns_for_a_known_host(monkeypatch):
    compile(k8s.STOP_DRIVER, "preStop", "exec")  # never run here: it signals `shoal train` processes
    monkeypatch.setattr(sys, "argv", ["-c", "localhost", "5"])
    exec(compile(k8s.WAIT_FOR_DNS, "wait-for-rendezvous", "exec"), {})


def script_commands(text: str) -> list[list[str]]:
    """A shell script's commands as tokens: continuation lines joined, comments dropped."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                commands.append(shlex.split(line, comments=True))
            except ValueError:  # a quote shlex cannot follow (in $(...)): fine unless it runs shoal
                assert "shoal" not in line.lower(), line
    return commands


def is_assignment(tokens: list[str]) -> bool:
    return len(tokens) == 1 and re.fullmatch(r"\w+=.*", tokens[0]) is not None


def expand(token: str, assigned: dict[str, str], positional: list[str]) -> list[str]:
    """Shell parameter expansion, enough for launch scripts: "$@", "${@:2}", $VAR, ${VAR:-default}."""
    if token == "$@":
        return list(positional)
    if m := re.fullmatch(r"\$\{@:(\d+)\}", token):
        return positional[int(m.group(1)) - 1 :]

    def value(m: re.Match[str]) -> str:
        name, op, word = m.group(1) or m.group(4), m.group(2), m.group(3)
        found = positional[int(name) - 1] if name.isdigit() and int(name) <= len(positional) else assigned.get(name)
        if found is None:
            found = word if op == "-" else "x"
        # NAME=${NAME:-default} reads the environment's NAME: expand without this assignment
        rest = {k: v for k, v in assigned.items() if k != name}
        return expand(found, rest, positional)[0] if found else found

    return [re.sub(r"\$\{(\w+)(?::([-?+])([^}]*))?\}|\$(\w+)", value, token)]


def launch_shoal_lines() -> list[tuple[str, list[str]]]:
    """(script, argv after `shoal`) for every `shoal ...` call in launch/, with sample arguments for "$@"."""
    positional = ["configs/quickstart.yaml", "train.max_steps=5"]
    found = []
    for script in sorted(p for p in (REPO / "launch").iterdir() if p.is_file()):
        commands = script_commands(script.read_text())
        assigned = dict(t[0].split("=", 1) for t in commands if is_assignment(t))
        calls = 0
        for tokens in commands:
            words = [w for t in tokens for w in expand(t, assigned, positional)]  # "$SHOAL" becomes shoal
            if "shoal" in words and not is_assignment(tokens):
                found.append((script.name, words[words.index("shoal") + 1 :]))
                calls += 1
        mentions = [t for t in commands if not is_assignment(t) and re.search(r"\bshoal\b|\$\{?SHOAL\b", " ".join(t))]
        assert calls or not mentions, f"launch/{script.name} runs shoal in a way this test does not read: {mentions[0]}"
    return found


def test_every_shoal_line_of_the_launch_scripts_parses():
    lines = launch_shoal_lines()
    assert {"local.sh", "torchrun_single.sh"} <= {script for script, _ in lines}
    for script, argv in lines:
        args = parse_shoal(argv)
        assert getattr(args, "config", "configs/quickstart.yaml") == "configs/quickstart.yaml", (script, argv)


def test_expand_handles_the_launch_script_forms():
    assigned = {"CONFIG": "${1:-configs/quickstart.yaml}"}
    assert expand("$@", assigned, ["a.yaml", "k=v"]) == ["a.yaml", "k=v"]
    assert expand("${@:2}", assigned, ["a.yaml", "k=v"]) == ["k=v"]
    assert expand("$CONFIG", assigned, []) == ["configs/quickstart.yaml"]
    assert expand("$CONFIG", assigned, ["b.yaml"]) == ["b.yaml"]
    assert expand("http://${HEAD:-127.0.0.1}:${PORT:?set PORT}", {}, []) == ["http://127.0.0.1:x"]
    assert expand("$SHOAL", {"SHOAL": "${SHOAL:-shoal}"}, []) == ["shoal"]


def test_readme_commands_parse():
    text = (K8S_DIR / "README.md").read_text()
    commands = [shlex.split(line, comments=True) for line in text.splitlines() if line.startswith("shoal ")]
    commands = [c[: c.index("|")] if "|" in c else c for c in commands]  # up to a pipe into kubectl
    assert any(c[:3] == ["shoal", "k8s", "render"] for c in commands)
    for argv in commands:
        try:
            cli.build_parser().parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"k8s/README.md: shoal's parser rejects {shlex.join(argv)}")


# ---------------------------------------------------------------- determinism and the command line


def test_render_is_deterministic():
    for variant in VARIANTS:
        for target in k8s.TARGETS:
            first, again = render_variant(variant, target), render_variant.__wrapped__(variant, target)
            assert first is not again and first == again and list(first) == list(again)


def test_render_command_writes_the_render_or_streams_it(tmp_path, capsys):
    parser = cli.build_parser()
    args = parser.parse_args(
        [
            "k8s",
            "render",
            str(QUICKSTART),
            "scaling.num_workers=3",
            "--target",
            "job",
            "--image",
            "img:1",
            "-o",
            str(tmp_path),
        ]
    )
    assert args.func(args) == 0
    expected = k8s.render(config("scaling.num_workers=3"), "job", "img:1")
    assert {str(p.relative_to(tmp_path)): p.read_text() for p in tmp_path.rglob("*.yaml")} == expected
    capsys.readouterr()
    args = parser.parse_args(
        ["k8s", "render", str(QUICKSTART), "--target", "rayjob", "--image", "img:1", "--namespace", "ml"]
    )
    assert args.func(args) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in docs] == ["ServiceAccount", "ConfigMap", "PersistentVolumeClaim", "RayJob"]
    assert {d["metadata"]["namespace"] for d in docs} == {"ml"}


def test_import_does_not_load_torch_or_ray():
    import subprocess

    code = "import sys, shoal.k8s; print(sorted(m for m in ('torch', 'ray', 'pydantic') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stderr


# ---------------------------------------------------------------- bad input: one clear error, nothing written


@pytest.mark.parametrize(
    "overrides,options,key,words",
    [
        (["name=Quickstart"], {}, "name", "name=quickstart"),
        (["name=" + "a" * 41], {}, "name", "at most 40"),
        (["name=my_job"], {}, "name", "name=my-job"),
        (["name=1st-run"], {}, "name", "starting with a letter"),
        (["scaling.gpus_per_worker=1"], {}, "scaling.gpus_per_worker", "--gpu-resource"),
        (["scaling.gpus_per_worker=0.5"], {"gpu_resource": "nvidia.com/gpu"}, "scaling.gpus_per_worker", "whole GPUs"),
        (["scaling.cpus_per_worker=0.0001"], {}, "scaling.cpus_per_worker", "millicores"),
        (["run.dir=/etc/shoal/run"], {}, "run.dir", "/etc/shoal"),
        (["run.dir=/"], {}, "run.dir", "plain path"),
        ([], {"memory": "lots"}, "--memory", "quantity"),
        ([], {"gpu_resource": "gpu"}, "--gpu-resource", "vendor.com/gpu"),
        ([], {"grace_period_s": 10}, "--grace-period", ">= 60"),
        ([], {"storage_class": "Fast_SSD"}, "--storage-class", "StorageClass"),
    ],
)
def test_bad_input_is_one_config_error_naming_the_key(overrides, options, key, words):
    with pytest.raises(ConfigError) as e:
        k8s.render(config(*overrides), "job", SHIPPED_IMAGE, options=RenderOptions(**options))
    assert e.value.key == key and words in str(e.value) and "\n" not in str(e.value)


def test_fractions_of_a_cpu_fit_torchrun_pods_but_not_ray_worker_pods():
    small = config("scaling.cpus_per_worker=0.5")
    job = by_kind(resources_of(k8s.render(small, "job", SHIPPED_IMAGE)), "Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "500m"
    with pytest.raises(ConfigError, match="whole CPUs") as e:
        k8s.render(small, "rayjob", SHIPPED_IMAGE)
    assert e.value.key == "scaling.cpus_per_worker"


@pytest.mark.parametrize("namespace,image", [("Team-A", "img:1"), ("ml", "img with space"), ("ml", "")])
def test_bad_namespace_or_image(namespace, image):
    with pytest.raises(ConfigError, match="--namespace|--image"):
        k8s.render(config(), "rayjob", image, namespace)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["name=Quickstart"], "shoal: error: name: 'Quickstart' cannot name Kubernetes objects"),
        (["scaling.num_workers=0"], "shoal: error: "),
        (
            ["scaling.gpus_per_worker=2"],
            "shoal: error: scaling.gpus_per_worker: asks for 2 GPU(s) per worker: pass --gpu-resource",
        ),
    ],
)
def test_cli_prints_one_line_exits_2_and_writes_nothing(extra, message, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["k8s", "render", str(QUICKSTART), *extra, "--target", "job", "--image", "img:1", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(message) and err.count("\n") == 1, err
    if "num_workers" in extra[0]:
        assert "scaling.num_workers: must be >= 1" in err
    assert not out.exists()
