"""The Kubernetes manifests (deploy/k8s): every overlay, alone and with each component, is
rendered by `kubectl kustomize`, validated against the Kubernetes schemas (kubernetes-validate,
strict) and KEDA's CRD schemas (vendored from KEDA 2.20.2), and cross-checked against the code:
settings, ports, probes, drain, queue streams, GPU requests, images, secrets. The autoscaling
metric's premise (XLEN of a queue stream = requests waiting + running) is checked on a real Redis
through the real queue protocol."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from shared import config
from shared import redis_keys as keys
from shared.pools import POOLS
from shared.request_protocol import PRIORITIES

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
COMPONENTS = sorted(p.name for p in (K8S / "components").iterdir() if (p / "kustomization.yaml").exists())
VARIANTS = [(o, None) for o in OVERLAYS] + [(o, c) for o in OVERLAYS for c in COMPONENTS]
KUBERNETES_VERSION = "1.32.0"  # native gRPC probes: GA since 1.27
KEDA = json.loads((ROOT / "tests" / "data" / "keda-2.20.2-crd-schemas.json").read_text())

MODULE_SETTINGS = {"gateway": config.GATEWAY, "compiler_service": config.COMPILER, "serving_service": config.SERVING}
PORT_SETTING = {"gateway": "gateway_port", "compiler_service": "compiler_port", "serving_service": "serving_port"}
# Variables the manifests may set that are not Llamaship settings: the standard AWS environment
# boto3 reads for the S3 store, and the pod IP the advertise address is built from.
OTHER_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION", "POD_IP"}
# Secrets the deployment references and the README tells the operator to create.
SECRETS = {"llamaship-redis", "llamaship-s3", "llamaship-api-keys", "llamaship-gateway-tls", "llamaship-internal-tls"}
IMAGE_TARGET = {"gateway": "runtime", "compiler_service": "compiler", ("serving_service", "cpu"): "runtime",
                ("serving_service", "cuda"): "runtime-cuda"}


def _kubectl() -> str:
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.skip("kubectl is not installed: `kubectl kustomize` renders the overlays")
    return exe


@functools.cache
def _render_cached(overlay: str, component: str | None) -> tuple[str, ...]:
    kubectl = _kubectl()
    if component is None:
        target = K8S / "overlays" / overlay
        out = subprocess.run([kubectl, "kustomize", str(target)], capture_output=True, text=True, timeout=120)
    else:
        # A kustomization outside the tree that adds the component to the overlay (kustomize
        # takes relative paths only).
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "kustomization.yaml").write_text(yaml.safe_dump({
                "resources": [os.path.relpath(K8S / "overlays" / overlay, tmp)],
                "components": [os.path.relpath(K8S / "components" / component, tmp)]}))
            out = subprocess.run([kubectl, "kustomize", tmp], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {overlay} (+{component}) failed:\n{out.stderr}"
    return tuple(json.dumps(d) for d in yaml.safe_load_all(out.stdout) if d)


def render(overlay: str, component: str | None = None) -> list[dict]:
    return [json.loads(d) for d in _render_cached(overlay, component)]


def _of(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def _module(container: dict) -> str:
    cmd = container.get("command") or []
    assert cmd[:2] == ["python", "-m"] and len(cmd) >= 3, f"{container['name']}: command {cmd} is not python -m ..."
    assert cmd[2] in MODULE_SETTINGS, f"{container['name']}: unknown service module {cmd[2]}"
    return cmd[2]


def _env(docs, container: dict) -> tuple[dict[str, str | None], list[dict]]:
    """The container's environment, name -> literal value (None: from a Secret or the pod), with
    ConfigMaps from envFrom expanded; and the entries that take values from elsewhere."""
    maps = {m["metadata"]["name"]: m.get("data", {}) for m in _of(docs, "ConfigMap")}
    env: dict[str, str | None] = {}
    for src in container.get("envFrom") or []:
        assert "configMapRef" in src, f"{container['name']}: envFrom {src} hides which variables it sets"
        env.update(maps[src["configMapRef"]["name"]])
    refs = []
    for e in container.get("env") or []:
        env[e["name"]] = e.get("value")
        if "valueFrom" in e:
            refs.append(e)
    return env, refs


def _containers(docs):
    """(deployment, pod spec, container, service module) for every container of every Deployment."""
    for d in _of(docs, "Deployment"):
        spec = d["spec"]["template"]["spec"]
        for c in spec["containers"]:
            yield d, spec, c, _module(c)


def _pool(docs, container) -> str:
    return _env(docs, container)[0]["LLAMASHIP_POOL"]


def _volume_at(spec: dict, container: dict, path: str) -> dict | None:
    """The pod volume the container has mounted at `path` or above it."""
    mounts = [m for m in container.get("volumeMounts") or []
              if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
    if not mounts:
        return None
    name = max(mounts, key=lambda m: len(m["mountPath"]))["name"]
    return next(v for v in spec["volumes"] if v["name"] == name)


def _gib(quantity: str) -> float:
    units = {"Ki": 2**-20, "Mi": 2**-10, "Gi": 1, "Ti": 2**10}
    m = re.fullmatch(r"([\d.]+)(Ki|Mi|Gi|Ti)?", str(quantity))
    assert m, f"quantity {quantity!r}"
    return float(m.group(1)) * units[m.group(2)] if m.group(2) else float(m.group(1)) / 2**30


def _closed(schema):
    """The CRD schema with unknown fields refused (the API server would prune them silently: a
    misspelt field would just vanish)."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


def _validate(doc: dict) -> list[str]:
    name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    group_version = doc.get("apiVersion", "")
    if group_version.split("/")[0].endswith("keda.sh"):
        schema = KEDA["schemas"].get(f"{group_version}/{doc['kind']}")
        if schema is None:
            return [f"{name}: no vendored KEDA schema for {group_version} {doc['kind']}"]
        validator = jsonschema.Draft7Validator(_closed(schema))
        return [f"{name}: {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{name}: no Kubernetes {KUBERNETES_VERSION} schema for {group_version} {doc.get('kind')}"]
    except kubernetes_validate.ValidationError as exc:
        return [f"{name}: {'/'.join(map(str, exc.path))}: {exc.message}"]
    return []


def _matches(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"selector {selector}: only matchLabels is checked here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


variants = pytest.mark.parametrize("overlay,component", VARIANTS,
                                   ids=[o + (f"+{c}" if c else "") for o, c in VARIANTS])


def test_the_overlays_and_their_pools():
    assert {"cpu", "cuda"} <= set(OVERLAYS) and {"gateway-tls", "internal-tls"} <= set(COMPONENTS)
    for overlay in OVERLAYS:
        docs = render(overlay)
        pools = sorted(_pool(docs, c) for _, _, c, m in _containers(docs) if m == "serving_service")
        expected = sorted(overlay.split("-"))  # cpu, cuda, cpu-cuda
        assert pools == expected, f"overlay {overlay} deploys pools {pools}"
        assert set(pools) <= set(POOLS)
        modules = sorted(m for _, _, _, m in _containers(docs))
        assert modules.count("gateway") == 1 and modules.count("compiler_service") == 1, modules


@variants
def test_every_object_is_valid_against_the_kubernetes_and_keda_schemas(overlay, component):
    docs = render(overlay, component)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "ScaledObject"} <= kinds, kinds
    errors = [e for d in docs for e in _validate(d)]
    assert not errors, "\n".join(errors)


@variants
def test_env_vars_are_settings_of_the_service_with_valid_values(overlay, component):
    docs = render(overlay, component)
    for dep, spec, c, module in _containers(docs):
        env, refs = _env(docs, c)
        where = f"{dep['metadata']['name']}/{c['name']}"
        for name in env:
            if name.startswith("LLAMASHIP_"):
                setting = next((s for s in config.SETTINGS.values() if s.env == name), None)
                assert setting is not None, f"{where}: {name} is not a setting in shared/config.py"
                assert setting.name in MODULE_SETTINGS[module], f"{where}: {module} does not read {name}"
            else:
                assert name in OTHER_ENV, f"{where}: {name} is neither a setting nor a known variable"
        for e in refs:  # values from Secrets and the pod: only these sources
            src = e["valueFrom"]
            assert set(src) <= {"secretKeyRef", "fieldRef"}, f"{where}: {e['name']} from {src}"
        # every literal value passes the service's own start-up validation
        literal = {k: (v.replace("$(POD_IP)", "10.0.0.1") if v else v) for k, v in env.items()
                   if v is not None and k.startswith("LLAMASHIP_")}
        assert not any("$(" in v for v in literal.values()), f"{where}: unexpanded reference in {literal}"
        config.resolve(MODULE_SETTINGS[module], env=literal)
        assert "LLAMASHIP_REDIS_URL" in {e["name"] for e in refs if "secretKeyRef" in e["valueFrom"]}, \
            f"{where}: the Redis URL comes from the llamaship-redis Secret"
        store = env.get("LLAMASHIP_STORE") or ""
        if module != "gateway":
            assert store.startswith("s3://"), f"{where}: store {store!r} is not S3"
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"} <= set(env), where
            # the store's local cache (and the compiler's scratch) on a volume large enough for it
            cache = _volume_at(spec, c, env.get("LLAMASHIP_STORE_CACHE_DIR") or "~")
            assert cache is not None, f"{where}: the store cache is not on a volume"
            size = _gib(cache.get("emptyDir", {}).get("sizeLimit", "0"))
            assert size > float(env["LLAMASHIP_STORE_CACHE_GIB"]), f"{where}: cache volume {size} GiB"
            if module == "compiler_service":
                assert _volume_at(spec, c, env.get("LLAMASHIP_WORK_DIR") or "~") is not None, where


@variants
def test_ports_and_probes_match_the_services(overlay, component):
    docs = render(overlay, component)
    services = _of(docs, "Service")
    for dep, spec, c, module in _containers(docs):
        env, _ = _env(docs, c)
        where = f"{dep['metadata']['name']}/{c['name']}"
        port = config.SETTINGS[PORT_SETTING[module]].default
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["grpc"] == port, f"{where}: gRPC port {ports['grpc']} != {module}'s default {port}"
        assert env.get(config.SETTINGS[PORT_SETTING[module]].env, str(port)) == str(port), where
        assert ports["metrics"] == int(env["LLAMASHIP_METRICS_PORT"]) \
            == int(dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]), where
        tls = bool(env.get("LLAMASHIP_TLS_CERT_FILE"))
        mtls = bool(env.get("LLAMASHIP_INTERNAL_TLS_CA")) and module != "gateway"  # the gateway's public port: no mTLS
        if env.get("LLAMASHIP_INTERNAL_TLS_CA"):  # all three files, from the internal TLS Secret
            files = [env.get(f"LLAMASHIP_INTERNAL_TLS_{k}") for k in ("CA", "CERT", "KEY")]
            assert all(files), f"{where}: {files}"
            for f in files:
                volume = _volume_at(spec, c, f)
                assert volume and volume.get("secret", {}).get("secretName") == "llamaship-internal-tls", f"{where}: {f}"
                assert f.rsplit("/", 1)[1] in ("ca.crt", "tls.crt", "tls.key"), f"{where}: {f} is not a key of the Secret"
        probes = ["readinessProbe", "livenessProbe"] + (["startupProbe"] if module == "serving_service" else [])
        for kind in probes:
            probe = c.get(kind)
            assert probe, f"{where}: no {kind}"
            if mtls:  # the kubelet's gRPC probe cannot present a certificate: our own check, over mTLS
                assert "grpc" not in probe and probe.get("exec", {}).get("command") == [
                    "python", "-m", "llamaship.healthcheck", "--internal-tls", f"127.0.0.1:{port}"], f"{where}: {kind}"
            elif tls:  # the kubelet's gRPC probe cannot speak TLS
                assert probe.get("tcpSocket", {}).get("port") == port and "grpc" not in probe, f"{where}: {kind}"
            else:
                assert probe.get("grpc", {}).get("port") == port, f"{where}: {kind} {probe} is not grpc.health.v1 on {port}"
                assert probe["grpc"].get("service", "") == "", f"{where}: the services report health under ''"
        labels = dep["spec"]["template"]["metadata"]["labels"]
        mine = [s for s in services if _matches({"matchLabels": s["spec"]["selector"]}, labels)]
        assert len(mine) == 1, f"{where}: {len(mine)} Services select it"
        sp = mine[0]["spec"]["ports"]
        grpc = [p for p in sp if p["name"] == "grpc"]
        assert grpc and grpc[0]["port"] == port and grpc[0]["targetPort"] in ("grpc", port), f"{where}: {sp}"
        if module == "gateway":  # the OpenAI-compatible HTTP API: env, container port and Service agree
            http_port = int(env["LLAMASHIP_HTTP_PORT"])
            assert {"name": "http", "containerPort": http_port} in c["ports"], f"{where}: {c['ports']}"
            http = [p for p in sp if p["name"] == "http"]
            assert http and http[0]["targetPort"] in ("http", http_port), f"{where}: {sp}"
            host, _, cport = env["LLAMASHIP_COMPILER_ADDRESS"].rpartition(":")
            compiler = [s for s in services if s["metadata"]["name"] == host]
            assert compiler and int(cport) == config.SETTINGS["compiler_port"].default
            assert any(p["port"] == int(cport) for p in compiler[0]["spec"]["ports"])
            compiler_labels = [d["spec"]["template"]["metadata"]["labels"] for d, _, _, m in _containers(docs)
                               if m == "compiler_service"]
            assert _matches({"matchLabels": compiler[0]["spec"]["selector"]}, compiler_labels[0])


def _drain_budget_s() -> float:
    """What a replica's SIGTERM drain may take, read from the code: running streams' grace, the wait
    for interrupted ones, the gRPC server's grace."""
    main = (ROOT / "serving_service" / "__main__.py").read_text()
    worker = (ROOT / "serving_service" / "queue_worker.py").read_text()
    drain = re.search(r"worker\.drain\(timeout_s=([\d.]+)\)", main)
    stop = re.search(r"server\.stop\(grace=([\d.]+)\)", main)
    cancel = re.search(r"def drain\(.*?asyncio\.wait\(list\(self\.tasks\), timeout=([\d.]+)\)\s*$", worker, re.S | re.M)
    assert drain and stop and cancel, "the replica's drain changed: update this test and the preStop hook"
    assert "add_signal_handler(sig, stop.set)" in (ROOT / "shared" / "service.py").read_text()
    return float(drain.group(1)) + float(cancel.group(1)) + float(stop.group(1))


@variants
def test_serving_replicas_drain_on_prestop_and_pdbs_cover_every_deployment(overlay, component):
    docs = render(overlay, component)
    pdbs = _of(docs, "PodDisruptionBudget")
    deployments = _of(docs, "Deployment")
    for dep, spec, c, module in _containers(docs):
        where = dep["metadata"]["name"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        for other in deployments:  # no Deployment adopts another's pods
            if other is not dep:
                assert not _matches(other["spec"]["selector"], labels), f"{other['metadata']['name']} selects {where}"
        covering = [p for p in pdbs if _matches(p["spec"]["selector"], labels)]
        assert len(covering) == 1, f"{where}: {len(covering)} PodDisruptionBudgets"
        if module == "serving_service":
            assert c["command"] == ["python", "-m", "serving_service"]  # PID 1 is the replica itself
            hook = c["lifecycle"]["preStop"]["exec"]["command"]
            assert hook[:2] == ["/bin/sh", "-c"] and re.match(r"kill -TERM 1;", hook[2]), hook
            assert "while kill -0 1" in hook[2], "the hook waits for the drain to end"
            grace = spec["terminationGracePeriodSeconds"]
            assert grace >= _drain_budget_s() + 10, f"{where}: {grace}s < drain {_drain_budget_s()}s + margin"
            assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def _so_for(docs, dep):
    sos = [s for s in _of(docs, "ScaledObject") if s["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
           and s["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"]
    assert len(sos) == 1, f"{dep['metadata']['name']}: {len(sos)} ScaledObjects"
    return sos[0]


@variants
def test_each_pool_scales_on_its_own_queue_streams(overlay, component):
    docs = render(overlay, component)
    auths = {a["metadata"]["name"] for a in _of(docs, "TriggerAuthentication")}
    targets = []
    for dep, _, c, module in _containers(docs):
        if module != "serving_service":
            assert not any(s["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"] for s in _of(docs, "ScaledObject"))
            continue
        pool = _pool(docs, c)
        so = _so_for(docs, dep)
        targets.append(so["metadata"]["name"])
        spec = so["spec"]
        assert spec["minReplicaCount"] >= 1, "a pool without a live replica never sees a queue (gateway: UNAVAILABLE)"
        tenants: dict[str, set[str]] = {}
        for t in spec["triggers"]:
            assert t["type"] in ("redis-streams", "redis-cluster-streams", "redis-sentinel-streams"), t["type"]
            assert t["authenticationRef"]["name"] in auths
            md = t["metadata"]
            # streamLength (XLEN): a consumerGroup would switch KEDA to pending or lag counts
            assert "consumerGroup" not in md and "lagCount" not in md and "pendingEntriesCount" not in md, md
            assert int(md["streamLength"]) == int(_env(docs, c)[0]["LLAMASHIP_SLOTS"]), md
            stream = md["stream"]
            assert stream.startswith(keys.gen_stream(pool, PRIORITIES[0], "").split(PRIORITIES[0])[0]), \
                f"{so['metadata']['name']} scales the {pool} pool on {stream}"
            priority, tenant = keys.gen_stream_priority(stream), keys.gen_stream_tenant(stream)
            assert keys.gen_stream_pool(stream) == pool and priority in PRIORITIES, stream
            assert keys.gen_stream(pool, priority, tenant) == stream, f"{stream} is not a queue stream name"
            tenants.setdefault(tenant, set()).add(priority)
        for tenant, prios in tenants.items():
            assert prios == set(PRIORITIES), f"{pool}: tenant {tenant} lacks a trigger for {set(PRIORITIES) - prios}"
        mod = spec["advanced"]["scalingModifiers"]
        names = [t["name"] for t in spec["triggers"]]
        assert len(set(names)) == len(names)
        terms = [x.strip() for x in mod["formula"].split("+")]
        assert sorted(terms) == sorted(names), f"the formula {mod['formula']!r} must add up every trigger {names}"
        assert mod["metricType"] == "AverageValue"
        slots = int(_env(docs, c)[0]["LLAMASHIP_SLOTS"])
        assert float(mod["target"]) == slots, f"target {mod['target']} != the replica's {slots} slots"
    assert sorted(targets) == sorted(s["metadata"]["name"] for s in _of(docs, "ScaledObject"))


def _dockerfile_stage(target: str) -> str:
    """The Dockerfile text that builds `target`: its stage and the stages it is built FROM."""
    found = re.findall(r"^FROM (\S+) AS (\S+)\n(.*?)(?=^FROM |\Z)", (ROOT / "Dockerfile").read_text(), re.M | re.S)
    stages = {name: (parent, body) for parent, name, body in found}
    text = ""
    while target in stages:
        parent, body = stages[target]
        text, target = body + text, parent
    return text


@variants
def test_gpus_images_and_secrets(overlay, component):
    docs = render(overlay, component)
    targets = set(re.findall(r"^FROM \S+ AS (\S+)", (ROOT / "Dockerfile").read_text(), re.M))
    referenced = set()
    for dep, spec, c, module in _containers(docs):
        where = dep["metadata"]["name"]
        res = c.get("resources", {})
        gpus = int(res.get("limits", {}).get("nvidia.com/gpu", 0))
        key = (module, _pool(docs, c)) if module == "serving_service" else module
        if key == ("serving_service", "cuda"):
            assert gpus >= 1, f"{where}: the cuda pool requests no GPU"
            assert spec.get("nodeSelector") and any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", []))
        else:
            assert gpus == 0 and "nvidia.com/gpu" not in res.get("requests", {}), f"{where} requests a GPU"
        image = c["image"].rsplit(":", 1)[0].rsplit("/", 1)[-1]
        assert image == IMAGE_TARGET[key] and image in targets, f"{where}: image {c['image']} (Dockerfile targets {targets})"
        if (_env(docs, c)[0].get("LLAMASHIP_STORE") or "").startswith("s3://"):
            assert "boto3" in _dockerfile_stage(image), f"{where}: image target {image} lacks boto3 (s3:// store)"
        for e in c.get("env") or []:
            if "secretKeyRef" in e.get("valueFrom", {}):
                referenced.add(e["valueFrom"]["secretKeyRef"]["name"])
        for v in spec.get("volumes") or []:
            if "secret" in v:
                referenced.add(v["secret"]["secretName"])
    for a in _of(docs, "TriggerAuthentication"):
        referenced |= {r["name"] for r in a["spec"]["secretTargetRef"]}
    assert referenced <= SECRETS, referenced - SECRETS
    assert not _of(docs, "Secret"), "secrets are created by the operator, never rendered with values"
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Kubernetes"):]
    section = section[:section.index("\n## ", 1)] if "\n## " in section[1:] else section
    missing = [s for s in referenced if s not in section]
    assert not missing, f"README's Kubernetes section does not say how to create {missing}"


def test_queue_stream_length_counts_waiting_and_running_requests(redis_url):
    """The premise of the ScaledObject's metric, on the real protocol: XLEN of a queue stream is
    waiting + running; the group's lag drops to 0 while requests still run."""
    from gateway.gen_queue import GenerationQueue
    from shared import redis_conn
    from shared.generation import GenRequest
    from shared.request_protocol import Picked

    async def body():
        r = redis_conn.client(redis_url)
        await r.flushdb()
        q = GenerationQueue(r, max_depth=100, wait_timeout_s=5)
        stream = keys.gen_stream("cpu", "interactive", "default")
        for i in range(5):
            await q.enqueue(GenRequest(f"r{i}", "m", "p", 4, tenant="default", priority="interactive"), "cpu", 8)
        pq = q.pool("cpu")

        async def counts() -> tuple[int, int]:
            """(waiting: not yet delivered to the group, running: pending in the group)"""
            group = next(g for g in await r.xinfo_groups(stream) if g["name"] == keys.GEN_GROUP)
            waiting = len(await r.xrange(stream, "(" + group["last-delivered-id"], "+"))
            if "lag" in group:  # Redis 7, which KEDA's lagCount needs
                assert group["lag"] == waiting
            return waiting, group["pending"]
        taken = [await pq.pick("replica-a", 1 << 40, 1 << 40, {"m": 1}) for _ in range(3)]
        assert all(isinstance(p, Picked) and p.entry.stream == stream for p in taken)
        assert (await r.xlen(stream), *await counts()) == (5, 2, 3)
        for p in taken[:2]:
            assert await pq.finish(p.entry, "replica-a")
        for _ in range(2):
            assert isinstance(await pq.pick("replica-a", 1 << 40, 1 << 40, {"m": 1}), Picked)
        assert (await r.xlen(stream), *await counts()) == (3, 0, 3)
        await r.aclose()

    asyncio.run(body())
