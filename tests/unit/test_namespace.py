"""One import namespace: every project module is `llmesh.*` and resolves to the
project's own file, from the repository root and from anywhere else; no bare
`kernels` (or `services`, `mesh`, ...) of the project's shadows an installed
distribution: transformers, which depends on the Hugging Face `kernels`, loads a
model from the repository root."""
import ast
import importlib.metadata
import json
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ["kernels", "services", "mesh", "observability", "benchmarks"]

# Run in a fresh interpreter from `cwd`: where each module, and each bare folder
# name, resolves. find_spec imports a module's parent packages, never the module.
_PROBE = """
import importlib.util, json, sys
names, bare = json.loads(sys.argv[1]), json.loads(sys.argv[2])
def where(name):
    spec = importlib.util.find_spec(name)
    if spec is None:
        return None
    return {"origin": spec.origin, "locations": list(spec.submodule_search_locations or [])}
print(json.dumps({"modules": {n: where(n) for n in names}, "bare": {n: where(n) for n in bare}}))
"""


def project_modules() -> dict[str, Path]:
    """llmesh.<folder>.<...> -> the file it must resolve to, for every Python file."""
    out = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(["llmesh", *parts])] = path
    return out


def probe(cwd: Path) -> dict:
    modules = project_modules()
    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(sorted(modules)),
                          json.dumps(FOLDERS)], cwd=cwd, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _assert_project_files(found: dict):
    for name, path in project_modules().items():
        spec = found["modules"][name]
        assert spec is not None and spec["origin"], f"{name} does not resolve"
        assert Path(spec["origin"]).resolve() == path, (name, spec["origin"])


def _in_folder(spec: dict, folder: Path) -> bool:
    paths = [Path(p).resolve() for p in [spec["origin"], *spec["locations"]]
             if p and p != "namespace"]
    return any(p == folder or folder in p.parents for p in paths)


def test_the_kernels_distribution_is_installed_beside_the_project():
    """The premise of the checks below: the name llmesh once shadowed is taken."""
    dist = importlib.metadata.distribution("kernels")
    assert "kernels" in (dist.read_text("top_level.txt") or "kernels").split()


def test_every_module_resolves_to_the_project_file_from_the_repo_root():
    found = probe(ROOT)
    _assert_project_files(found)
    hf = Path(importlib.metadata.distribution("kernels").locate_file("kernels")).resolve()
    assert Path(found["bare"]["kernels"]["origin"]).resolve().parent == hf
    for name in FOLDERS:  # a bare folder here is at most an empty namespace
        spec = found["bare"][name]
        assert spec is None or name == "kernels" or spec["origin"] in (None, "namespace"), spec


def test_every_module_resolves_to_the_project_file_from_elsewhere(tmp_path):
    found = probe(tmp_path)
    _assert_project_files(found)
    for name in FOLDERS:
        spec = found["bare"][name]
        assert spec is None or not _in_folder(spec, ROOT / name), (name, spec)


def test_no_source_imports_a_bare_project_folder():
    offenders = []
    for path in [p for top in [*FOLDERS, "tests", "compose"] for p in (ROOT / top).rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                          if n and n.split(".")[0] in FOLDERS]
    assert not offenders, offenders


def test_transformers_loads_a_model_from_the_repo_root(tiny_model_dir):
    code = ("import sys; from transformers import AutoModelForCausalLM; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
            "print(type(m).__name__, sum(p.numel() for p in m.parameters()))")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_model_dir)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    name, num_params = out.stdout.split()
    assert name == "LlamaForCausalLM" and int(num_params) > 0


def test_the_wheel_holds_one_top_level_package_with_its_data(tmp_path):
    """What the container image installs: llmesh only, kernel sources and mesh data in."""
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                          "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("llmesh-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"llmesh"}, tops
    for must in ["llmesh/kernels/ops.py", "llmesh/kernels/paged_attention.cu",
                 "llmesh/mesh/mesh.yaml", "llmesh/services/router/servicer.py",
                 "llmesh/mesh/data/corpus.txt"]:
        assert must in names, must
    assert not [n for n in names if "__pycache__" in n or n.startswith("llmesh/benchmarks/results")]
