"""The package's shape: no import circle between its modules (lazy imports included) and a light `import hf_speft`
(`make test` runs ruff besides)."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "hf_speft"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def executed_nodes(node: ast.AST):
    """Every node below `node` except the bodies of `if TYPE_CHECKING:` blocks, which never run."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
            continue
        yield child
        yield from executed_nodes(child)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports anywhere in its body (function-level imports too; type-checking-only ones
    not). Importing `a.b.c` from outside package `a.b` also runs `a.b`'s `__init__`, so it counts as importing
    `a.b`."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in executed_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            while target and target != "hf_speft":  # the root package is the public facade over everything
                if target != name and not name.startswith(target + "."):
                    found.add(target)
                target = target.rpartition(".")[0]
    return found


def test_the_package_has_no_import_circle():
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {name: imported_modules(path, set(paths)) for name, path in paths.items() if name != "hf_speft"}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph.get(name, ())):
            if state.get(target) == "open":
                pytest.fail(f"import circle: {' -> '.join(trail[trail.index(target):] + [target])}")
            if target not in state:
                visit(target, trail + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert "hf_speft.layer" in graph["hf_speft.masks"]  # the graph is really read (a broken reader finds nothing)


def test_import_hf_speft_loads_neither_trainer_nor_trl():
    code = ("import sys, hf_speft; heavy = sorted(m for m in sys.modules if m == 'trl' or m.startswith('trl.') "
            "or m == 'transformers.trainer'); print(heavy); print(hf_speft.SparsePeftConfig.__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split("\n")[:2] == ["[]", "SparsePeftConfig"], result.stdout
    code = "import sys, hf_speft; hf_speft.SpeftTrainer; print('transformers.trainer' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "True"  # the lazy names do load on first access


def test_benchmark_tables_match_the_results():
    """The tables in README.md, benchmarks/README.md and docs/*.md are what benchmarks/tables.py makes of
    benchmarks/results/ (and, for docs/memory.md's estimates, of the code)."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tables.py"), "--check"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def _benchmark_module(name: str, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # tables.py puts benchmarks/ on the path: undone after the test
    spec = importlib.util.spec_from_file_location(f"_benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_generated_table_has_its_block_in_the_docs(monkeypatch):
    """A table tables.py can make but no document shows would leave room for a typed copy; docs/memory.md's counts."""
    tables = _benchmark_module("tables", monkeypatch)
    shown = {match.group(2) for path in tables.DOCUMENTS for match in tables.BLOCK.finditer(path.read_text())}
    assert set(tables.TABLES) <= shown, f"tables without a block: {sorted(set(tables.TABLES) - shown)}"
    assert "<!-- table:memory_plan -->" in (ROOT / "docs" / "memory.md").read_text()


def test_an_unmeasured_speed_table_says_how_to_measure_it(monkeypatch):
    """Without results the real-model speed table keeps the measured table's columns and names the command to run."""
    real_model = _benchmark_module("real_model", monkeypatch)
    row = {"trainable_params": 10, "salience_s": 1.0, **{f"{field}{suffix}": 1.0 for field in real_model.RATIO_FIELDS
                                                          for suffix in ("", "/lora")}}
    measured, unmeasured = real_model.speed_table({"lora": row}).splitlines(), real_model.speed_table({}).splitlines()
    assert unmeasured[:2] == measured[:2] and len(unmeasured) == 3
    assert unmeasured[2].startswith(f"| not yet measured: run `{real_model.SPEED_COMMAND}` |")
    assert unmeasured[2].count("|") == measured[2].count("|")


def test_the_short_run_table_counts_every_step_and_salience(monkeypatch):
    real_model = _benchmark_module("real_model", monkeypatch)
    lora = {"steps": 40, "train_wall_s": 100.0, "train_wall_s/lora": 1.0, "step_time_s": 2.5, "step_time_s/lora": 1.0,
            "salience_s": 0.0}
    speft = {**lora, "train_wall_s": 110.0, "train_wall_s/lora": 1.1, "step_time_s": 2.6, "step_time_s/lora": 1.04,
             "salience_s": 20.0}
    table = real_model.short_run_table({"speft": speft, "lora": lora}).splitlines()
    assert table[2] == "| speft | 40 | 110 | 1.10 | 2.60 | 1.04 | 20.0 | 1.30 |" and table[3].endswith("| 1.00 |")


def test_speed_tables_name_the_machine_their_rows_came_from(monkeypatch):
    """Every harness row records `machine()`; a table names it once, or says it is missing when rows lack it or
    disagree (figures from two machines must not pass as one)."""
    harness, tables = _benchmark_module("harness", monkeypatch), _benchmark_module("tables", monkeypatch)
    where = harness.machine()
    assert where["cores"] >= 1 and isinstance(where["avx512_bf16"], bool) and where["torch_cpu_capability"]
    line = tables._measured_on([{"machine": where}, {"machine": where}])
    assert f"CPU capability {where['torch_cpu_capability']}" in line and where["cpu"] in line
    other = {**where, "avx512_bf16": not where["avx512_bf16"]}
    for rows in ([{"machine": where}, {"machine": other}], [{"machine": where}, {}]):
        assert "not recorded" in tables._measured_on(rows)


def test_speed_tables_give_the_round_by_round_ratios_behind_their_medians(monkeypatch):
    tables = _benchmark_module("tables", monkeypatch)
    rows = [{"method": method, "step_time_s/lora": ratio}
            for method, ratio in [("lora", 1.0), ("speft", 1.234), ("lora", 1.0), ("speft", 0.97)]]
    assert tables._round_ratios(rows).strip() == "Step ÷LoRA by round: speft 1.23, 0.97."
    assert "**hf-speft** 1.23, 0.97" in tables._round_ratios(rows, tables.METHOD_NAMES)


@pytest.mark.parametrize("argv", [["--help"], ["estimate", "--help"], ["estimate"], ["merge", "a", "b", "c", "--dtype",
                                                                                    "int3"]])
def test_the_command_line_parser_imports_neither_torch_nor_transformers(argv):
    """`hf-speft --help` and argument errors answer before any heavy import: the parser lives in `hf_speft_cli`,
    outside `hf_speft` (whose `__init__` loads torch, transformers and peft), and each command imports the library in
    its `run`."""
    code = ("import sys; from hf_speft_cli import main\n"
            "try: main(sys.argv[1:])\nexcept SystemExit as e: code = e.code\n"
            "print(code, sorted(m for m in ('torch', 'transformers', 'peft', 'hf_speft') if m in sys.modules), "
            "file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT)
    assert result.stderr.splitlines()[-1] == f"{0 if '--help' in argv else 2} []", result.stderr
    if "--help" in argv:
        assert "usage: hf-speft" in result.stdout

