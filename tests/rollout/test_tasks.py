"""Tasks: deterministic disjoint splits, instance contents, the registry and the JSONL loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import dsec
from policy.chat import encode
from rollout.tasks import (
    Instance,
    Task,
    get_task,
    list_tasks,
    place_files,
    register_task,
    split_of,
    tool_schemas,
)
from rollout.tasks.base import _REGISTRY

GENERATED = ["arith_tool", "code_tests", "workspace_qa"]


@pytest.mark.parametrize("name", GENERATED)
def test_splits_are_deterministic_and_disjoint(name: str) -> None:
    task = get_task(name)
    train = task.instances("train", 60, seed=0)
    assert [i.id for i in train] == [i.id for i in get_task(name).instances("train", 60, seed=0)]
    assert len({i.id for i in train}) == 60
    other_seed = task.instances("train", 60, seed=1)
    assert [i.id for i in other_seed] != [i.id for i in train]
    test_ids = {i.id for seed in range(3) for i in task.instances("test", 30, seed=seed)}
    train_ids = {i.id for seed in range(3) for i in task.instances("train", 60, seed=seed)}
    assert not test_ids & train_ids
    assert all(i.task == name and i.messages[0]["role"] == "user" for i in train)


def test_split_of_is_stable_and_near_its_fraction() -> None:
    assert split_of("arith_tool:123*456") == split_of("arith_tool:123*456")
    share = sum(split_of(f"k{i}") == "test" for i in range(4000)) / 4000
    assert 0.17 < share < 0.23


def test_arith_tool_instances() -> None:
    for inst in get_task("arith_tool").instances("train", 20, seed=0):
        a, b = inst.verifier["expression"].split("*")
        assert 100 <= int(a) <= 9999 and 100 <= int(b) <= 9999
        assert inst.verifier["answer"] == str(int(a) * int(b))
        assert inst.tool_names == ["python"]
        assert inst.verifier["expression"] in inst.messages[0]["content"]
        assert len(inst.messages[0]["content"]) < 80  # every byte is a token for the demo policy
    for inst in get_task("arith_tool", add=True, min_digits=3, max_digits=3).instances("test", 10):
        prod, c = inst.verifier["expression"].split("+")
        a, b = prod.split("*")
        assert len(a) == len(b) == 3
        assert inst.verifier["answer"] == str(int(a) * int(b) + int(c))


def test_instances_encode_with_the_v4_template() -> None:
    for name in GENERATED:
        [inst] = get_task(name).instances("train", 1)
        prompt = encode(inst.messages, tools=inst.tools)
        assert inst.messages[0]["content"] in prompt
        assert all(f'"name": "{t}"' in prompt for t in inst.tool_names)


def test_workspace_qa_files_hold_the_answer(tmp_path: Path) -> None:
    task = get_task("workspace_qa", people=4)
    for inst in task.instances("train", 5, seed=2):
        assert len(inst.files) == 5
        assert all(p.startswith("/workspace/") for p in inst.files)
        city, name = inst.verifier["city"], inst.verifier["name"]
        assert inst.files[f"/workspace/people/{name}.txt"] == f"{name.title()} lives in {city}.\n"
        assert f"{name.title()}: {inst.verifier['answer']}\n" in inst.files["/workspace/ages.txt"]
        assert city in inst.messages[0]["content"]


def test_place_files_in_a_real_sandbox() -> None:
    [inst] = get_task("workspace_qa").instances("test", 1, seed=5)
    with dsec.Sandbox(timeout=10.0) as sb:
        place_files(sb, inst.files)
        out = sb.exec("cat /workspace/people/*.txt /workspace/ages.txt").stdout.decode()
    assert inst.verifier["city"] in out and inst.verifier["answer"] in out


def test_code_tests_hidden_tests_check_the_reference() -> None:
    insts = get_task("code_tests").instances("train", 30, seed=0)
    assert len({i.verifier["function"] for i in insts}) >= 5
    for inst in insts:
        assert inst.verifier["tests"] not in inst.messages[0]["content"]
        assert inst.verifier["path"] in inst.messages[0]["content"]
        compile(inst.verifier["tests"], inst.id, "exec")
    with pytest.raises(ValueError, match=r"unknown families \['sort'\]"):
        get_task("code_tests", families=["sort"])


def test_registry_errors() -> None:
    assert {"arith_tool", "code_tests", "workspace_qa", "jsonl"} <= set(list_tasks())
    with pytest.raises(ValueError, match="unknown task 'arith'; known tasks: arith_tool"):
        get_task("arith")
    with pytest.raises(
        ValueError,
        match="task 'arith_tool' has no option 'digits'; options: min_digits, max_digits, add",
    ):
        get_task("arith_tool", digits=3)
    with pytest.raises(ValueError, match="task 'jsonl': missing a required argument: 'path'"):
        get_task("jsonl")
    with pytest.raises(ValueError, match="max_digits must be an int in"):
        get_task("arith_tool", max_digits=12)
    with pytest.raises(ValueError, match=r"min_digits \(4\) must be <= max_digits \(3\)"):
        get_task("arith_tool", min_digits=4, max_digits=3)
    with pytest.raises(ValueError, match="split must be one of"):
        get_task("arith_tool").instances("valid", 1)
    with pytest.raises(ValueError, match="n must be a positive int, got 0"):
        get_task("arith_tool").instances("train", 0)
    with pytest.raises(ValueError, match="'arith_tool' is already registered"):
        register_task("arith_tool", get_task)


def test_register_custom_task_and_lazy_reference() -> None:
    class Echo(Task):
        name = "echo"

        def __init__(self, word: str = "hi") -> None:
            self.word = word

        def instances(self, split, n, seed=0):
            return [
                Instance(
                    f"echo/{split}/{i}",
                    "echo",
                    [{"role": "user", "content": self.word}],
                    verifier={"answer": self.word},
                )
                for i in range(n)
            ]

    try:
        register_task("echo", Echo)
        register_task("lazy_arith", "rollout.tasks.arith:ArithTool")
        [inst] = get_task("echo", word="yo").instances("train", 1)
        assert inst.verifier == {"answer": "yo"} and inst.tools == []
        assert get_task("lazy_arith", add=True).add
        register_task("lazy_missing", "rollout.tasks.arith:Nope")
        with pytest.raises(ValueError, match="task 'lazy_missing': cannot load"):
            get_task("lazy_missing")
    finally:
        for name in ("echo", "lazy_arith", "lazy_missing"):
            _REGISTRY.pop(name, None)


def test_instance_validation() -> None:
    with pytest.raises(ValueError, match="unknown tool 'shell'; standard tools: bash, python"):
        Instance("a", "t", [{"role": "user", "content": "x"}], tools=["shell"])
    with pytest.raises(ValueError, match=r"file path '\.\./etc/passwd' is not inside /workspace"):
        Instance("a", "t", [{"role": "user", "content": "x"}], files={"../etc/passwd": "x"})
    with pytest.raises(ValueError, match="messages must be a non-empty list"):
        Instance("a", "t", [])
    inst = Instance(
        "a",
        "t",
        [{"role": "user", "content": "x"}],
        tools=tool_schemas(["bash"]),
        files={"/workspace/a/b.txt": b"\x00"},
    )
    assert inst.files == {"/workspace/a/b.txt": b"\x00"} and inst.tool_names == ["bash"]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _row(i: int, **extra) -> dict:
    return {
        "id": f"q{i}",
        "messages": [{"role": "user", "content": f"q {i}?"}],
        "verifier": {"answer": str(i)},
        **extra,
    }


def test_jsonl_loader(tmp_path: Path) -> None:
    rows = [_row(i) for i in range(40)]
    rows[0] = _row(0, split="test", tools=["python"], files={"data.txt": "zero"}, task="mine")
    rows[1] = _row(1, split="train")
    path = _write_jsonl(tmp_path / "tasks.jsonl", [*rows[:20], "", *rows[20:]])
    task = get_task("jsonl", path=str(path))
    train, test = task.instances("train"), task.instances("test")
    assert len(train) + len(test) == 40
    assert not {i.id for i in train} & {i.id for i in test}
    assert test[0].id == "q0" and test[0].task == "mine" and test[0].tool_names == ["python"]
    assert test[0].files == {"/workspace/data.txt": "zero"}
    assert "q1" in {i.id for i in train}
    assert train[1].task == "jsonl"
    some = task.instances("train", 5, seed=1)
    assert [i.id for i in some] == [i.id for i in task.instances("train", 5, seed=1)]
    assert [i.id for i in some] != [i.id for i in task.instances("train", 5, seed=2)]
    with pytest.raises(
        ValueError, match=rf"asked for 1000 train instances, {path} has {len(train)}"
    ):
        task.instances("train", 1000)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"tasks.jsonl:2: not valid JSON"),
        ("[1, 2]", r"tasks.jsonl:2: expected a JSON object, got list"),
        (
            json.dumps({"id": "x", "messages": []}),
            r"tasks.jsonl:2: missing required key\(s\) \['verifier'\]",
        ),
        (json.dumps({**_row(5), "answer": "5"}), r"tasks.jsonl:2: unknown key\(s\) \['answer'\]"),
        (json.dumps({**_row(5), "id": 5}), r"tasks.jsonl:2: id must be a non-empty string, got 5"),
        (json.dumps(_row(0)), r"tasks.jsonl:2: duplicate id 'q0' \(first on line 1\)"),
        (json.dumps({**_row(5), "tools": ["shell"]}), r"tasks.jsonl:2: unknown tool 'shell'"),
        (json.dumps({**_row(5), "split": "dev"}), r"tasks.jsonl:2: split must be one of"),
        (
            json.dumps({**_row(5), "messages": [{"content": "hi"}]}),
            r"tasks.jsonl:2: instance 'q5': message 0 has no role",
        ),
        (
            json.dumps({**_row(5), "files": {"/etc/x": "y"}}),
            r"tasks.jsonl:2: .*'/etc/x' is not inside /workspace",
        ),
        (json.dumps({**_row(5), "verifier": "5"}), r"tasks.jsonl:2: verifier must be an object"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = _write_jsonl(tmp_path / "tasks.jsonl", [_row(0), line])
    with pytest.raises(ValueError, match=message):
        get_task("jsonl", path=str(path))


def test_jsonl_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        get_task("jsonl", path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="has no instances"):
        get_task("jsonl", path=str(_write_jsonl(tmp_path / "empty.jsonl", [""])))
    with pytest.raises(ValueError, match=r"test_fraction must be in \[0, 1\), got 1.5"):
        get_task(
            "jsonl", path=str(_write_jsonl(tmp_path / "a.jsonl", [_row(0)])), test_fraction=1.5
        )
