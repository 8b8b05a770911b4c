"""Pack what a CUDA host without package-registry access needs to run rayft's GPU checks
(benchmarks/gpu_check.sh): two Python site folders as .tar.xz and SmolLM2's config and tokenizer.

    .venv/bin/python benchmarks/gpu_bundle.py            # writes .device/ (git-ignored), ~59 MiB

The host is expected to hold Python 3.12 with a CUDA torch, numpy, pandas, pyarrow, scipy,
tokenizers, safetensors and the other packages of the image this was written for (the lent
H200's, whose list the workplace publishes); the bundle holds the rest, pinned to what rayft
is tested with here:

- rayft-site: Ray (Train/Tune and the dashboard's needs; its Java jars, RLlib and LLM library left out), DeepSpeed,
  mlflow-skinny with SQLAlchemy, transformers/peft/accelerate at rayft's tested versions,
  bitsandbytes with only its CUDA 13 libraries (the host's torch is a CUDA 13 build), pydantic ...
- lf-site: LLaMA-Factory 0.9.5 with its own pins (peft 0.18.1, trl 0.24, datasets 4.0), for the
  LLaMA-Factory baseline, which runs in its own process; and benchmarks/flash_attn_shim, a
  stand-in for the flash-attn package (which the host cannot build) over torch's own
  FlashAttention-2 kernel, so that LLaMA-Factory runs neat packing through FlashAttention-2 there.
  transformers is 5.5.4, not the 5.6.0 that LLaMA-Factory's own environment here has (its newest
  allowed): 5.6.0's FlashAttention-2 forward fails on every model without attention sinks, Llama
  included (`s_aux.to(...)` on None: transformers#45588, fixed after 5.6.0), so LLaMA-Factory
  0.9.5 runs FlashAttention-2 only with an older transformers.
- smollm2.tar.xz: SmolLM2-135M-Instruct's config, tokenizer and chat template. Its weights (the
  package's 93 MB GGUF) exceed what travels, so the check builds a model of the same shape with
  random weights: the same FLOPs and the same code path, but no meaningful loss values.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".device"
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"] + [
    arg for tag in ("manylinux_2_35_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64", "manylinux_2_28_x86_64",
                    "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                    "manylinux1_x86_64", "manylinux_2_5_x86_64") for arg in ("--platform", tag)]

# rayft's closure (pyproject's dependencies, ray[default,train,tune]) less what the host image has
RAYFT_SITE = [
    "ray==2.60.0", "transformers==5.25.0", "huggingface-hub==2.4.0", "peft==0.21.2", "accelerate==1.16.0",
    "kernels==0.19.1", "bitsandbytes==0.50.2", "mlflow-skinny==3.17.2", "sqlalchemy==2.1.9", "alembic==1.20.1",
    "mako==1.4.3", "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0",
    "typing-inspection==0.4.5", "hjson==3.1.0", "jsonschema==4.26.0", "jsonschema-specifications==2025.9.1",
    "referencing==0.37.0", "rpds-py==2026.9.1", "tensorboardx==2.6.5", "cachetools==7.3.3", "cffi==2.1.1",
    "pycparser==3.12", "cryptography==50.0.2", "databricks-sdk==0.167.0", "google-auth==2.63.0",
    "pyasn1==0.6.5", "pyasn1-modules==0.4.2", "gitpython==3.2.1", "gitdb==4.0.12", "smmap==5.0.3",
    "importlib-metadata==9.1.0", "opentelemetry-api==1.45.2", "opentelemetry-proto==1.45.2",
    "opentelemetry-sdk==1.45.2", "opentelemetry-semantic-conventions==0.66b2", "python-dotenv==1.2.4",
    "sqlparse==0.6.1", "starlette==1.10.0", "fastapi==0.165.0", "uvicorn==0.55.0", "httpx2==2.16.2",
    "httpcore2==2.16.2", "truststore==0.10.5", "tomlkit==0.15.3", "tzdata==2026.6", "colorlog==6.12.0",
    "optuna==5.1.0", "datasketch==2.0.0", "gguf==0.19.0",
    # ray[default]: rayft starts a local Ray with its dashboard (the state API Ray Train polls)
    "aiohttp-cors==0.8.1", "colorful==0.5.8", "google-api-core==2.44.0", "googleapis-common-protos==1.76.0",
    "opencensus==0.11.4", "opencensus-context==0.1.3", "opentelemetry-exporter-prometheus==0.66b2",
    "platformdirs==4.14.9", "proto-plus==1.29.0", "smart-open==9.0.4",
]
# Left out to fit what travels, as nothing the checks run imports them: ray[default]'s virtualenv
# and py-spy (runtime-env virtual environments, profiling).
# LLaMA-Factory's training path (the modules lf_worker.py loads), less what the host image has
LF_SITE = [
    "llamafactory==0.9.5", "transformers==5.5.4", "peft==0.18.1", "trl==0.24.0", "accelerate==1.11.0",
    "datasets==4.0.0", "tokenizers==0.22.2", "huggingface-hub==1.33.0", "fsspec==2025.3.0", "dill==0.3.8",
    "multiprocess==0.70.16", "omegaconf==2.4.0", "opentelemetry-api==1.45.2", "pytz==2026.6", "torchdata==0.11.0",
]
# too large to travel and never used by the checks
PRUNE = ["ray/jars", "ray/rllib", "ray/llm", "ray/dashboard/client/build/static/*"]  # the dashboard's UI: its
# server needs the build folder to exist, the checks never open the page
KEEP_BNB = ("libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so", "libbitsandbytes_cpu.so")
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def deepspeed_wheel(folder: Path) -> Path:
    """DeepSpeed has no wheel on PyPI: build the pure-Python one (its ops compile on first use)."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(folder), "deepspeed==0.19.8"], check=True, env={**os.environ, "DS_BUILD_OPS": "0"})
    return next(folder.glob("deepspeed-*.whl"))


def flash_attn_shim_wheel(folder: Path) -> Path:
    source = shutil.copytree(ROOT / "benchmarks" / "flash_attn_shim", folder / "flash_attn_shim")  # builds leave files
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(folder), str(source)], check=True)
    return next(folder.glob("flash_attn-*.whl"))


def site(name: str, requirements: list[str], extra: list[Path]) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "site"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target",
                        str(target), *PLATFORM, *requirements, *map(str, extra)], check=True)
        for pattern in PRUNE:
            for path in target.glob(pattern):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        for lib in (target / "bitsandbytes").glob("libbitsandbytes_*.so"):
            if lib.name not in KEEP_BNB:
                lib.unlink()
        shutil.rmtree(target / "bin", ignore_errors=True)  # console scripts with this machine's python
        archive = OUT / f"{name}.tar.xz"
        partial = archive.with_suffix(".partial")
        subprocess.run(f"tar -C {target} -cf - . | xz -T2 -9 > {partial}", shell=True, check=True)
        partial.rename(archive)
    print(f"{archive}: {archive.stat().st_size / 2**20:.1f} MiB")
    return archive


def main() -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from rayft.models import resolve_model_path

    OUT.mkdir(exist_ok=True)
    if "--model-only" not in sys.argv:
        with tempfile.TemporaryDirectory() as tmp:
            site("rayft-site", RAYFT_SITE, [deepspeed_wheel(Path(tmp))])
            site("lf-site", LF_SITE, [flash_attn_shim_wheel(Path(tmp))])
    model_dir = resolve_model_path("smollm2-135m-instruct")
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODEL_FILES:
            shutil.copy(model_dir / name, Path(tmp) / name)
        subprocess.run(f"tar -C {tmp} -cf - . | xz -9 > {OUT / 'smollm2.tar.xz'}", shell=True, check=True)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"{OUT}: {total / 2**20:.1f} MiB in all")


if __name__ == "__main__":
    main()
