"""Generate the contract code in ``common/contracts`` from ``proto/`` (``make proto``).

betterproto2's plugin is run with async grpclib clients and server bases. The plugin formats
its output by running ``ruff``, so the virtual environment's ``bin`` is put on ``PATH``.
A test regenerates into a temporary folder and fails when the committed code differs.
"""

from __future__ import annotations

import os
import shutil
import subprocess  # nosec B404
import sys
import tempfile
from pathlib import Path

__all__ = ["CONTRACTS_DIR", "DESCRIPTOR_SET", "PROTO_DIR", "generate", "main", "proto_files"]

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
CONTRACTS_DIR = ROOT / "common" / "contracts"
DESCRIPTOR_SET = "descriptors.binpb"
_HEADER = '"""Generated from proto/ by `make proto` (betterproto2). Do not edit."""\n'


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def generate(out_dir: Path) -> None:
    """Generate every contract into ``out_dir`` (created; must be empty or absent)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        # The same contracts as a descriptor set, for protobuf's C (upb) codec on hot paths.
        "--include_imports",
        f"--descriptor_set_out={out_dir / DESCRIPTOR_SET}",
        f"--python_betterproto2_out={out_dir}",
        "--python_betterproto2_opt=client_generation=async,server_generation=async",
        *[str(p.relative_to(PROTO_DIR)) for p in proto_files()],
    ]
    result = subprocess.run(  # noqa: S603 - argv built from repository paths
        cmd, cwd=PROTO_DIR, env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"protoc failed ({result.returncode}):\n{result.stderr}")
    (out_dir / "__init__.py").write_text(_HEADER + (out_dir / "__init__.py").read_text())


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "contracts"
        generate(fresh)
        if CONTRACTS_DIR.exists():
            shutil.rmtree(CONTRACTS_DIR)
        shutil.copytree(fresh, CONTRACTS_DIR)
    print(f"generated {len(proto_files())} proto files into {CONTRACTS_DIR.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
