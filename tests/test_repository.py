"""The repository's own promises: notebooks stay thin, dependencies agree, nothing unsafe is loaded."""

import ast
import json
import re
import tomllib

import pytest
import yaml

from posae.paths import NOTEBOOKS_DIR, REPO_ROOT

NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def test_there_are_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS][:3] == ["00", "01", "02"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_thin_parameterised_and_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "parameters" in code[0].get("metadata", {}).get("tags", []), "first code cell must be tagged parameters"
    assert "config" in "".join(code[0]["source"])
    for cell in code:
        assert not cell.get("outputs") and not cell.get("execution_count"), "strip outputs before committing"
        tree = ast.parse("".join(cell["source"]))
        defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))]
        assert not defs, f"{path.name}: logic belongs in src/posae/, not in a notebook cell"


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip_list = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert {_name(r) for r in pip_list} == wanted


def test_torch_is_pinned_exactly_everywhere():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert "torch==2.13.0" in project["dependencies"]
    assert "torch==2.13.0" in (REPO_ROOT / "Makefile").read_text()
    assert re.search(r"^torch==2\.13\.0", (REPO_ROOT / "constraints.txt").read_text(), re.M)


def test_every_dependency_is_locked():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    locked = {_name(line) for line in (REPO_ROOT / "constraints.txt").read_text().splitlines() if "==" in line}
    missing = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]} - locked
    assert not missing, f"not in constraints.txt: {missing}; run `make lock`"


# Calls that can run code hidden in a file: unpickling in any of its guises, torch.load without
# weights_only=True, YAML's unsafe loaders, numpy's pickle switch, and remote code as a literal (it
# may only come from a config that asks for it).
FORBIDDEN = [r"\b(c?pickle|dill|cloudpickle|joblib|marshal|shelve)\.(load|open)", r"\bread_pickle\(",
             r"torch\.load\((?![^)]*weights_only=True)", r"yaml\.(load|load_all|full_load|unsafe_load)\(",
             r"yaml\.(Unsafe|Full)?Loader\b", r"allow_pickle=True", r"trust_remote_code=True"]
UNSAFE = ["pickle.load(f)", "pickle.loads(b)", "cloudpickle.loads(b)", "joblib.load(p)", "pd.read_pickle(p)",
          "torch.load(p)", "torch.load(p, map_location='cpu')", "torch.load(p, weights_only=False)", "yaml.load(s)",
          "yaml.load(s, Loader=yaml.Loader)", "yaml.unsafe_load(s)", "yaml.full_load(s)",
          "np.load(p, allow_pickle=True)", "AutoModel.from_pretrained(n, trust_remote_code=True)"]
SAFE = ["torch.load(p, weights_only=True)", "yaml.safe_load(s)", "np.load(p, mmap_mode='r', allow_pickle=False)",
        "load_file(str(path))", "AutoModel.from_pretrained(n, trust_remote_code=cfg.trust_remote_code)", "json.loads(s)"]


def _code_files():
    """The package, the benchmarks and the notebooks' code cells: everything `make reproduce` runs."""
    for path in sorted((REPO_ROOT / "src" / "posae").rglob("*.py")) + sorted((REPO_ROOT / "benchmarks").rglob("*.py")):
        yield path, path.read_text()
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        yield path, "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


@pytest.mark.parametrize("code", UNSAFE)
def test_the_unsafe_patterns_catch_each_unsafe_call(code):
    assert any(re.search(p, code) for p in FORBIDDEN), code


@pytest.mark.parametrize("code", SAFE)
def test_the_unsafe_patterns_pass_the_safe_calls(code):
    assert not [p for p in FORBIDDEN if re.search(p, code)], code


def test_no_unsafe_loading_in_the_package():
    found = [(str(path.relative_to(REPO_ROOT)), pattern) for path, text in _code_files() for pattern in FORBIDDEN
             if re.search(pattern, text)]
    assert not found, f"unsafe loading: {found}"


def _table_rows(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("|---")]


def test_the_readme_results_are_the_committed_run():
    """The README's Table 1 and claims are copies of figures/default/, and it names the run's commit and CPU."""
    readme = (REPO_ROOT / "README.md").read_text()
    figures = REPO_ROOT / "figures" / "default"
    for name in ("table1.md", "claims.md"):
        missing = [row[:80] for row in _table_rows((figures / name).read_text()) if row not in readme]
        assert not missing, f"README.md lacks these rows of figures/default/{name} (copy the table again): {missing}"
    machine = json.loads((figures / "run_info.json").read_text())["machine"]
    made = re.search(r"Made by `make reproduce` on a fresh clone of commit `([0-9a-f]{7,40})`[^\n]*\n[^\n]*", readme)
    assert made, "README.md: no 'Made by `make reproduce` on a fresh clone of commit `...`' line"
    assert machine["git_commit"].startswith(made.group(1)), (made.group(1), machine["git_commit"])
    assert machine["cpu_model"] in made.group(0), (machine["cpu_model"], made.group(0))


def test_the_readme_check_sees_a_changed_row(tmp_path):
    """The control: one changed digit in a table row is a row the README lacks."""
    readme = (REPO_ROOT / "README.md").read_text()
    row = _table_rows((REPO_ROOT / "figures" / "default" / "table1.md").read_text())[2]
    changed = re.sub(r"\d", lambda m: str((int(m.group()) + 1) % 10), row, count=1)
    assert row in readme and changed not in readme
