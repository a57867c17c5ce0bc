"""Generate Python code from protos/ into gen/ (ignored, never edited by hand).

The google/api and google/rpc protos come from googleapis-common-protos and are
copied into build/third_party so protoc and buf resolve them locally.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
THIRD_PARTY = ROOT / "build" / "third_party"
OUT = ROOT / "gen"


def copy_google_protos() -> None:
    import google.api  # from googleapis-common-protos

    site = Path(google.api.__path__[0]).parent.parent
    for sub in ("google/api", "google/rpc"):
        dest = THIRD_PARTY / sub
        dest.mkdir(parents=True, exist_ok=True)
        for proto in (site / sub).glob("*.proto"):
            shutil.copy2(proto, dest / proto.name)


def main() -> int:
    copy_google_protos()
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{THIRD_PARTY}",
        f"-I{well_known}",
        f"--python_out={OUT}",
        f"--pyi_out={OUT}",
        f"--grpc_python_out={OUT}",
        *sources,
    ]
    rc = protoc.main(args)
    if rc != 0:
        print("protoc failed", file=sys.stderr)
        return rc
    print(f"generated {len(sources)} protos into {OUT.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
