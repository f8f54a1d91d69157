"""The shape of the code: dependencies point one way, options have one source, the report's fields are
the ones its readers read, and functions stay short."""

import ast
import dataclasses
import typing
from pathlib import Path

import pytest
import torch
from rich.text import Text

from prunelab import report as reporting
from prunelab.cli import EVAL_FLAGS, FLAGS, apply_flags
from prunelab.config import DEPTH_METRICS, METHODS, RunConfig
from prunelab.criteria import CRITERIA
from prunelab.measure import StageRecord, stage
from prunelab.study import summarise

SRC = Path(__file__).resolve().parents[1] / "src" / "prunelab"

# Each module's floor; a module may import only from its own floor or lower ones. Leaves (0) depend on
# nothing of prunelab's but other leaves: the criteria are pure maths, config names their registry.
FLOORS = {
    "errors": 0, "files": 0, "measure": 0, "precision": 0, "assets": 0, "config": 0, "report": 0, "evaluate": 0,
    "criteria": 0, "distributed": 0, "resume": 0,
    "models": 1, "data": 1,
    "activations": 2, "streaming": 2,
    "prune": 3, "structured": 3,
    "recover": 4,
    "job": 5,
    "api": 6, "study": 6, "cli": 7, "__init__": 8, "__main__": 8,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def floor(module: str) -> int:
    for prefix in sorted(FLOORS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return FLOORS[prefix]
    raise AssertionError(f"module {module} has no floor in FLOORS")


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported prunelab module, whether at module level) for every import in `path`."""
    tree, module = ast.parse(path.read_text()), module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            names = [target] if node.module else [f"{target}.{a.name}".strip(".") for a in node.names]
            for name in names:
                found.append((name or "__init__", id(node) in top_level))
    return found


def test_imports_point_down_the_floors_and_form_no_circle():
    graph = {}
    for path in SRC.rglob("*.py"):
        module = module_name(path)
        graph[module] = set()
        for target, _ in imports(path):
            while target and target not in {module_name(p) for p in SRC.rglob("*.py")}:
                target = target.rpartition(".")[0]  # `from . import CRITERIA` names the package
            if not target or target == module:
                continue
            assert floor(target) <= floor(module), f"{module} (floor {floor(module)}) imports {target} " \
                                                   f"(floor {floor(target)})"
            graph[module].add(target)
    done, active = set(), []

    def visit(node):
        assert node not in active, f"import circle: {' -> '.join(active[active.index(node):] + [node])}"
        if node in done:
            return
        active.append(node)
        for nxt in graph.get(node, ()):
            visit(nxt)
        active.pop()
        done.add(node)

    for node in graph:
        visit(node)


def test_no_module_of_prunelab_is_imported_inside_a_function():
    for path in SRC.rglob("*.py"):
        for target, top in imports(path):
            assert top, f"{module_name(path)} imports {target} inside a function"


def test_no_function_is_longer_than_sixty_lines():
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 60, f"{path.name}:{node.lineno} {node.name} has {length} lines"


def test_every_config_field_is_a_flag_and_every_flag_a_field():
    def leaves(cls, path=()):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from leaves(hints[f.name], (*path, f.name))
            else:
                yield (*path, f.name)

    assert sorted(f.path for f in FLAGS) == sorted(leaves(RunConfig))
    assert all(f.help for f in FLAGS), [f.name for f in FLAGS if not f.help]
    shown = {f.name: f.option().help for f in FLAGS}  # one default each: the literal one, or the help's own words
    assert [n for n, text in shown.items() if text.count("(default:") != 1] == []
    assert shown["lr"].endswith("(default: auto)") and shown["threads"].endswith("(default: torch's choice)")
    # typer prints helps through rich: `N:M:` would show an emoji for `:M:`, `[b]` would vanish as markup
    assert [n for n, text in shown.items() if Text.from_markup(text).plain != text] == []
    assert {f.path[0] for f in EVAL_FLAGS} == {"model", "eval", "eval_seqlen", "eval_windows", "eval_batch",
                                               "eval_bos", "tasks", "task_limit", "task_batch", "model_dtype",
                                               "device", "threads", "max_memory"}
    given = {"reconstruct": "block", "lr_grid": "1e-3, 3e-3", "damp": 0.05, "reconstruct_scope": "all"}
    values = apply_flags({"reconstruct": "attn-mlp", "sparsegpt": {"blocksize": 64}}, given)
    cfg = RunConfig.from_dict(values)
    assert cfg.reconstruct.granularity == "block" and cfg.reconstruct.lr_grid == (1e-3, 3e-3)
    assert cfg.sparsegpt.damp == 0.05 and cfg.sparsegpt.blocksize == 64 and cfg.reconstruct.scope == "all"


def test_vocabularies_come_from_their_registries():
    from prunelab.config import LOSSES
    from prunelab.recover.loop import PER_TOKEN_LOSS

    assert METHODS == (*CRITERIA, "layers", "flap")
    assert tuple(PER_TOKEN_LOSS) == LOSSES
    assert len(set(DEPTH_METRICS)) == 5


def test_a_cuda_stage_reports_its_peak_memory_where_the_report_and_study_read_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3_250_000_000)
    stages = {}
    with stage("prune", stages):
        pass
    assert set(stages["prune"]) <= set(StageRecord.__annotations__)
    assert stages["prune"]["cuda_peak_gb"] == 3.25
    report = {"config": RunConfig(reconstruct="none").to_dict(), "model": {"source": "m"}, "data": {},
              "metrics": {"pruned": {"perplexity": 12.0}}, "sparsity": None, "stages": stages, "layers": [],
              "reconstruction": None, "structure": None, "retraining": None, "versions": {}, "output": None}
    assert set(report) == set(reporting.Report.__annotations__)
    assert ("peak CUDA memory (prune)", "3.25 GB") in reporting.summary_rows(report)
    assert "| prune |" in reporting.to_markdown(report) and "peak CUDA (GB)" in reporting.to_markdown(report)
    assert summarise(report)["cuda_peak_gb"] == 3.25


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_sequential_masks_equal_a_two_pass_reference(method):
    """Each group is pruned on statistics taken after the groups before it were pruned: the same masks as
    running whole forward passes of the half for every group (the reference), with no pass stopped early."""
    import copy

    from tiny import random_ids, tiny_model

    import prunelab
    from prunelab.activations import capture_block_inputs, propagate
    from prunelab.models.adapters import find_adapter

    model, ids = tiny_model("llama"), random_ids(6, 16)
    reference = copy.deepcopy(model)
    prunelab.prune(model, calibration=ids, method=method, forward_batch=4, reconstruct="none", progress=False)

    stats_cls, criterion = CRITERIA[method]
    adapter = find_adapter(reference)
    stream = capture_block_inputs(reference, adapter.blocks, ids, None, 4, torch.float32)
    groups = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    for index, block in enumerate(adapter.blocks):
        modules = dict(block.named_modules())
        for part, half in enumerate(adapter.halves(block)):
            for group in groups[2 * part: 2 * part + 2]:
                first = modules[group[0]]
                stats = stats_cls(first.in_features, "cpu")
                handle = first.register_forward_pre_hook(lambda m, a, s=stats: s.add(a[0].reshape(-1, a[0].shape[-1])))
                for b, rows in stream.batches():  # whole passes
                    half(stream.hidden[rows], stream.block_kwargs[index][b])
                handle.remove()
                pruned, _ = criterion([modules[n].weight.data for n in group], stats, 0.5, None)
                for name, weight in zip(group, pruned):
                    modules[name].weight.data.copy_(weight)
            propagate(half, stream, index)
    for (name, got), (_, want) in zip(find_adapter(model).prunable_weights().items(),
                                      adapter.prunable_weights().items()):
        assert torch.equal(got == 0, want == 0), name
