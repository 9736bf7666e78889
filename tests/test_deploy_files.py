"""The deployment files agree with their schemas, with env.env and with the settings.

docker-compose.yaml is checked against the Compose Specification (tests/schemas/README.md says
where that schema comes from), deploy/k8s/ against the Kubernetes API schemas that
kubernetes-validate ships, and both against the commands the platform's processes run. Nothing
here needs a database, a broker or Docker.
"""

import ast
import copy
import fnmatch
import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from django.conf import settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yaml"
COMPOSE_SCHEMA = Path(__file__).resolve().parent / "schemas" / "compose-spec.json"
K8S_DIR = ROOT / "deploy" / "k8s"
# Named .example so that `kubectl apply -f deploy/k8s/` never applies its placeholders.
SECRET_TEMPLATE = K8S_DIR / "secret.yaml.example"
KUBERNETES_VERSION = "1.31.0"

# The platform's processes, as the Procfile runs them on one machine. `$NAME` stands for a
# variable however a file writes it: ${NAME:-default} in compose, $(NAME) in Kubernetes.
COMMANDS = {
    "api": "gunicorn face_detect_api.wsgi:application --bind 0.0.0.0:8000 --workers $GUNICORN_WORKERS"
    " --no-control-socket --access-logfile - --graceful-timeout 20",
    "worker": "celery -A face_detect_api worker -Q detect -n detect@%h --concurrency $WORKER_CONCURRENCY"
    " --without-gossip --without-mingle -O fair",
    "worker-blazeface": "celery -A face_detect_api worker -Q detect-blazeface -n detect-blazeface@%h"
    " --concurrency $WORKER_CONCURRENCY --without-gossip --without-mingle -O fair",
    "callbacks": "celery -A face_detect_api worker -Q callbacks -n callbacks@%h --pool threads --concurrency 4"
    " --without-gossip --without-mingle",
    "beat": "celery -A face_detect_api beat --schedule /tmp/celerybeat-schedule",
}
COMPOSE_SERVICES = {
    "migrate", "api", "worker", "worker-blazeface", "callbacks", "beat", "flower",
    "postgres", "rabbitmq", "redis", "minio", "createbucket",
}
ONE_SHOT = {"migrate", "createbucket"}
APP_SERVICES = {"migrate", "api", "worker", "worker-blazeface", "callbacks", "beat"}
# Each detection engine's worker pool: (compose service / Deployment suffix, its queue).
POOLS = (("worker", "detect"), ("worker-blazeface", "detect-blazeface"))
# env.env's variables whose values are or carry credentials: the Kubernetes Secret's keys.
SECRETS = {
    "SECRET_KEY", "DATABASE_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "REDIS_URL",
    "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY",
}
# ConfigMap values that differ from env.env's because a cluster is not the compose stack.
CLUSTER_VALUES = {"ALLOWED_HOSTS", "PUBLIC_BASE_URL", "CSRF_TRUSTED_ORIGINS", "WORKER_CONCURRENCY",
                  "MINIO_PUBLIC_ENDPOINT", "MINIO_PUBLIC_SECURE"}


# --- Helpers ---------------------------------------------------------------------------------


def env_file():
    """env.env as {name: value}."""
    values = {}
    for line in (ROOT / "env.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def load_compose():
    return yaml.safe_load(COMPOSE_FILE.read_text())


def k8s_documents():
    """(file name, document) for every manifest in deploy/k8s/, the Secret template included."""
    paths = sorted(K8S_DIR.glob("*.yaml")) + [SECRET_TEMPLATE]
    return [(path.name, doc) for path in paths for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s_object(kind, name):
    matches = [doc for _, doc in k8s_documents() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def only_container(workload):
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def command_words(command):
    """A container command as words: `sh -c "exec ..."` unwrapped, every variable written `$NAME`."""
    words = shlex.split(command) if isinstance(command, str) else list(command)
    if words[:2] == ["sh", "-c"]:
        words = shlex.split(words[2])
        if words[0] == "exec":
            words = words[1:]
    variable = re.compile(r"\$\$?(?:\{(\w+)(?::?-[^}]*)?\}|\((\w+)\)|(\w+))")
    return [variable.sub(lambda m: "$" + next(g for g in m.groups() if g), word) for word in words]


def strings_in(node):
    """Every string in a parsed YAML document, keys included."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from strings_in(key)
            yield from strings_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings_in(item)


def quantity(value):
    """A Kubernetes quantity (`2Gi`, `500m`, `1`) as a number of bytes or cores."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    return float(match[1]) * units.get(match[2], 1)


def python_snippet(test):
    """The code of a healthcheck written as `python -c CODE`."""
    words = list(test)
    if words[0] in ("CMD", "CMD-SHELL"):
        words = words[1:]
    assert words[:2] == ["python", "-c"], words
    return words[2]


def dockerfile_instructions():
    """(INSTRUCTION, arguments) for every instruction of the Dockerfile, continuations joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            yield keyword.upper(), rest.strip()


def settings_reads():
    """The variables the settings read: (through the env* helpers, by any means)."""
    tree = ast.parse((ROOT / "face_detect_api" / "settings.py").read_text())
    helpers, anywhere = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = node.args[0].value
            if isinstance(node.func, ast.Name) and node.func.id.startswith("env"):
                helpers.add(name)
            if ast.unparse(node.func) in ("os.environ.get", "os.getenv"):
                anywhere.add(name)
        if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            if isinstance(node.slice, ast.Constant):
                anywhere.add(node.slice.value)
    return helpers, helpers | anywhere


# --- docker compose --------------------------------------------------------------------------


def compose_errors(document):
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(document)]


def test_the_compose_file_follows_the_compose_specification():
    assert compose_errors(load_compose()) == []


def test_the_compose_schema_rejects_a_misspelt_key():
    """Proof that the check above can fail: the schema forbids keys it does not define."""
    document = load_compose()
    broken = copy.deepcopy(document)
    broken["services"]["worker"]["helthcheck"] = broken["services"]["worker"].pop("healthcheck")
    assert compose_errors(broken)
    broken = copy.deepcopy(document)
    broken["services"]["api"]["depends_on"]["postgres"]["condition"] = "service_ready"
    assert compose_errors(broken)


def test_the_stack_has_the_services_of_the_spec():
    assert set(load_compose()["services"]) == COMPOSE_SERVICES


def test_every_long_running_service_has_a_healthcheck():
    for name, service in load_compose()["services"].items():
        if name in ONE_SHOT:
            assert service.get("restart") == "no", name
            continue
        healthcheck = service.get("healthcheck", {})
        assert healthcheck.get("test") and not healthcheck.get("disable"), f"{name} has no healthcheck"
        assert healthcheck["test"][0] in ("CMD", "CMD-SHELL"), name
        assert service.get("restart") == "unless-stopped", name


@pytest.mark.parametrize("pool", [pool for pool, _ in POOLS])
def test_the_worker_can_be_scaled_to_many_copies(pool):
    worker = load_compose()["services"][pool]
    for key in ("container_name", "hostname", "ports"):
        assert key not in worker, f"{pool} sets {key}: --scale {pool}=N would clash"
    assert "replicas" not in worker.get("deploy", {})


def test_beat_runs_once():
    beat = load_compose()["services"]["beat"]
    assert beat.get("deploy", {}).get("replicas", 1) == 1


def test_the_containers_run_the_platform_commands():
    services = load_compose()["services"]
    for name, command in COMMANDS.items():
        assert command_words(services[name]["command"]) == command.split(), name
    assert services["migrate"]["command"] == ["python", "manage.py", "migrate", "--no-input"]


def test_the_worker_healthchecks_ping_their_own_node():
    """The name pinged is the one the worker registers: -n QUEUE@%h, %h being $HOSTNAME."""
    services = load_compose()["services"]
    for name, queue in (*POOLS, ("callbacks", "callbacks")):
        words = command_words(services[name]["command"])
        assert words[words.index("-n") + 1] == f"{queue}@%h"
        check = services[name]["healthcheck"]["test"]
        assert check[0] == "CMD-SHELL"
        assert f"inspect ping -d {queue}@$$HOSTNAME" in check[1], name


def test_the_api_healthchecks_ask_the_health_endpoint():
    api_check = python_snippet(load_compose()["services"]["api"]["healthcheck"]["test"])
    healthcheck = dict(dockerfile_instructions())["HEALTHCHECK"]
    image_check = python_snippet(json.loads(healthcheck[healthcheck.index("CMD ") + 4:]))
    for code in (api_check, image_check):
        assert "http://127.0.0.1:8000/api/v1/health/" in code
        compile(code, "healthcheck", "exec")


def test_the_health_probes_send_a_host_the_settings_allow():
    """Django answers 400 to a Host outside ALLOWED_HOSTS, and the probe would call that unhealthy."""
    assert "127.0.0.1" in env_file()["ALLOWED_HOSTS"].split(",")
    probe = only_container(k8s_object("Deployment", "face-detect-api"))["startupProbe"]["httpGet"]
    assert probe["path"] == "/api/v1/health/"
    (host,) = [header["value"] for header in probe["httpHeaders"] if header["name"] == "Host"]
    assert host in k8s_object("ConfigMap", "face-detect-config")["data"]["ALLOWED_HOSTS"].split(",")


def test_the_python_healthchecks_are_valid_python():
    services = load_compose()["services"]
    for name in ("beat", "flower"):
        compile(python_snippet(services[name]["healthcheck"]["test"]), name, "exec")
    beat = only_container(k8s_object("Deployment", "face-detect-beat"))
    beat_check = python_snippet(services["beat"]["healthcheck"]["test"])
    assert python_snippet(beat["livenessProbe"]["exec"]["command"]) == beat_check


def test_services_wait_for_healthy_dependencies_and_finished_one_shots():
    services = load_compose()["services"]
    for name, service in services.items():
        for dependency, rule in service.get("depends_on", {}).items():
            expected = "service_completed_successfully" if dependency in ONE_SHOT else "service_healthy"
            assert rule["condition"] == expected, f"{name} -> {dependency}"
    everything = {"migrate", "createbucket", "postgres", "rabbitmq", "redis", "minio"}
    for name in ("api", "worker", "callbacks"):
        assert set(services[name]["depends_on"]) == everything, name
    assert set(services["beat"]["depends_on"]) == {"migrate", "rabbitmq"}
    assert set(services["migrate"]["depends_on"]) == {"postgres"}
    assert set(services["createbucket"]["depends_on"]) == {"minio"}


def test_every_compose_variable_has_a_default():
    """Compose fills ${NAME} from the shell, never from env.env: each needs its own default."""
    reference = re.compile(r"(?<!\$)\$(?:\{([^}]*)\}|(\w+))")
    for text in strings_in(load_compose()):
        for match in reference.finditer(text):
            assert match[1] is not None, f"bare ${match[2]} in {text!r}: write ${{{match[2]}:-default}}"
            assert re.fullmatch(r"\w+:?-.*", match[1]), f"${{{match[1]}}} has no default"


def test_container_variables_come_from_env_env_or_the_service():
    """$$NAME is left to the container's shell: the container must have NAME."""
    environment = env_file()
    for name, service in load_compose()["services"].items():
        known = {"HOSTNAME"} | set(service.get("environment", {}))
        if service.get("env_file") == "env.env":
            known |= set(environment)
        for text in strings_in(service):
            for variable in re.findall(r"\$\$\{?(\w+)", text):
                assert variable in known, f"{name} uses $${variable}, which it is not given"


def test_the_app_containers_share_the_image_and_env_env():
    services = load_compose()["services"]
    images = {services[name]["image"] for name in APP_SERVICES}
    assert len(images) == 1
    for name in APP_SERVICES:
        assert services[name]["env_file"] == "env.env", name
        assert services[name]["build"] == ".", name
    assert services["createbucket"]["env_file"] == "env.env"


def test_the_backing_services_use_the_credentials_of_env_env():
    services = load_compose()["services"]
    environment = env_file()

    database = urlsplit(environment["DATABASE_URL"])
    postgres = services["postgres"]["environment"]
    assert (database.hostname, database.port) == ("postgres", 5432)
    assert (postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"]) == (database.username, database.password)
    assert postgres["POSTGRES_DB"] == database.path.lstrip("/")

    broker = urlsplit(environment["CELERY_BROKER_URL"])
    rabbitmq = services["rabbitmq"]["environment"]
    assert (broker.hostname, broker.port) == ("rabbitmq", 5672)
    assert (rabbitmq["RABBITMQ_DEFAULT_USER"], rabbitmq["RABBITMQ_DEFAULT_PASS"]) == (broker.username, broker.password)

    for name in ("CELERY_RESULT_BACKEND", "REDIS_URL"):
        assert urlsplit(environment[name]).hostname == "redis", name

    minio = services["minio"]["environment"]
    assert environment["MINIO_ENDPOINT"] == "minio:9000"
    assert (minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"]) == (
        environment["MINIO_ACCESS_KEY"],
        environment["MINIO_SECRET_KEY"],
    )
    assert "$$MINIO_BUCKET" in services["createbucket"]["command"][0]


def test_presigned_urls_name_an_address_clients_reach_not_the_service_name():
    """Compose: the host:port MinIO's S3 API is published on; Kubernetes: a public host."""
    environment = env_file()
    public = environment["MINIO_PUBLIC_ENDPOINT"]
    assert public != environment["MINIO_ENDPOINT"]
    host, _, port = public.rpartition(":")
    assert host in ("localhost", "127.0.0.1")
    published = load_compose()["services"]["minio"]["ports"]
    assert f"127.0.0.1:${{MINIO_PORT:-{port}}}:9000" in published

    config = k8s_object("ConfigMap", "face-detect-config")["data"]
    assert config["MINIO_PUBLIC_ENDPOINT"].partition(":")[0] not in ("minio", "localhost", "127.0.0.1")
    assert config["MINIO_PUBLIC_SECURE"] == "true"


# --- Dockerfile ------------------------------------------------------------------------------


def test_the_image_is_built_in_stages_from_python_slim():
    instructions = list(dockerfile_instructions())
    bases = [arguments.split()[0] for keyword, arguments in instructions if keyword == "FROM"]
    assert len(bases) >= 2 and set(bases) == {"python:3.11-slim"}
    copies = [arguments for keyword, arguments in instructions if keyword == "COPY"]
    assert copies.index("requirements.txt /tmp/requirements.txt") < copies.index(". .")
    environment = " ".join(arguments for keyword, arguments in instructions if keyword == "ENV").split()
    assert {"PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1"} <= set(environment)
    assert any(keyword == "RUN" and "collectstatic" in arguments for keyword, arguments in instructions)


def test_the_image_runs_as_a_user_and_bakes_in_no_secret():
    instructions = list(dockerfile_instructions())
    users = [arguments for keyword, arguments in instructions if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    for keyword, arguments in instructions:
        if keyword in ("ENV", "ARG"):
            assert not re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", arguments), arguments
        if "SECRET_KEY" in arguments:
            assert keyword == "RUN" and "collectstatic" in arguments, f"{keyword} {arguments}"


def test_the_build_context_leaves_out_checkout_state():
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in (".git", ".venv", "tests", "media", ".secret_key", "env.env", "staticfiles"):
        assert any(fnmatch.fnmatch(path, pattern) for pattern in patterns), f"{path} would enter the image"
    for path in ("api", "workers", "face_detect_api", "manage.py", "requirements.txt"):
        assert not any(fnmatch.fnmatch(path, pattern) for pattern in patterns), f"{path} would be left out"


# --- Kubernetes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "document",
    [doc for _, doc in k8s_documents() if not doc["apiVersion"].startswith("keda.sh/")],
    ids=lambda doc: f"{doc['kind']}/{doc['metadata']['name']}",
)
def test_the_manifests_follow_the_kubernetes_api_schemas(document):
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_the_kubernetes_schema_check_rejects_a_misspelt_key():
    """Proof that the check above can fail: strict schemas forbid keys they do not define."""
    deployment = copy.deepcopy(k8s_object("Deployment", "face-detect-api"))
    only_container(deployment)["imagePullPolice"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_the_deployments_run_the_platform_commands():
    for name, command in COMMANDS.items():
        container = only_container(k8s_object("Deployment", f"face-detect-{name}"))
        assert command_words(container["command"]) == command.split(), name
        assert "args" not in container, name
    migrate = only_container(k8s_object("Job", "face-detect-migrate"))
    assert migrate["command"] == ["python", "manage.py", "migrate", "--no-input"]


def test_every_workload_reads_the_config_map_and_the_secret():
    for _, document in k8s_documents():
        if document["kind"] in ("Deployment", "Job"):
            sources = only_container(document)["envFrom"]
            assert {"configMapRef": {"name": "face-detect-config"}} in sources
            assert {"secretRef": {"name": "face-detect-secrets"}} in sources


def test_the_config_map_and_the_secret_carry_env_env_between_them():
    environment = env_file()
    config = k8s_object("ConfigMap", "face-detect-config")["data"]
    secret = k8s_object("Secret", "face-detect-secrets")["stringData"]
    assert set(secret) == SECRETS
    assert set(config) == set(environment) - SECRETS
    for name in set(config) - CLUSTER_VALUES:
        assert config[name] == environment[name], f"{name}: ConfigMap {config[name]!r}, env.env {environment[name]!r}"


def test_beat_runs_exactly_once_in_kubernetes():
    beat = k8s_object("Deployment", "face-detect-beat")
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"] == {"type": "Recreate"}
    scaled = [doc["spec"]["scaleTargetRef"]["name"] for _, doc in k8s_documents() if doc["kind"] == "ScaledObject"]
    assert "face-detect-beat" not in scaled


@pytest.mark.parametrize(("pool", "queue"), POOLS)
def test_a_scaled_object_scales_each_engine_pool_on_its_own_queue(pool, queue):
    """KEDA's CRD is outside kubernetes-validate's schemas: its required fields are checked here."""
    scaled = k8s_object("ScaledObject", f"face-detect-{pool}")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == f"face-detect-{pool}"
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    worker = k8s_object("Deployment", f"face-detect-{pool}")
    assert "replicas" not in worker["spec"], "KEDA owns the worker count"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    for field in ("pollingInterval", "minReplicaCount", "maxReplicaCount"):
        assert isinstance(spec[field], int), field

    (trigger,) = spec["triggers"]
    assert trigger["type"] == "rabbitmq"
    metadata = trigger["metadata"]
    assert all(isinstance(value, str) for value in metadata.values()), "KEDA trigger metadata are strings"
    assert metadata["mode"] == "QueueLength"
    assert metadata["protocol"] in ("amqp", "auto")
    assert metadata["queueName"] == queue
    assert queue in settings.DETECT_QUEUES.values()
    assert float(metadata["value"]) > 0

    authentication = k8s_object("TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert authentication["apiVersion"] == "keda.sh/v1alpha1"
    (reference,) = authentication["spec"]["secretTargetRef"]
    assert reference == {"parameter": "host", "name": "face-detect-secrets", "key": "CELERY_BROKER_URL"}


@pytest.mark.parametrize("pool", [pool for pool, _ in POOLS])
def test_a_worker_pod_holds_one_detection_process(pool):
    worker = k8s_object("Deployment", f"face-detect-{pool}")
    container = only_container(worker)
    assert {"name": "WORKER_CONCURRENCY", "value": "1"} in container["env"]
    resources = container["resources"]
    assert resources["requests"] == resources["limits"], "Guaranteed QoS"
    assert quantity(resources["limits"]["cpu"]) == 1
    config = k8s_object("ConfigMap", "face-detect-config")["data"]
    child_limit = int(config["WORKER_MAX_MEMORY_PER_CHILD_MB"]) * 2**20
    assert quantity(resources["limits"]["memory"]) > child_limit
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > int(config["TASK_TIME_LIMIT"])


# --- Settings --------------------------------------------------------------------------------


def test_every_env_env_variable_is_read_by_the_settings():
    _, read = settings_reads()
    assert sorted(set(env_file()) - read) == []


def test_every_variable_the_settings_read_is_listed_in_env_env():
    helpers, _ = settings_reads()
    assert helpers, "no env*() call found in the settings"
    assert sorted(helpers - set(env_file())) == []
