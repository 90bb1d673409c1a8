"""The job config: TOML parsing, --set overrides, and a clear error for every bad key or value."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from rollout.config import Config, ConfigError, from_dict, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_without_a_file():
    c = load_config(None)
    assert c == Config()
    assert c.task.name == "arith_tool" and c.workers.num_workers >= 1
    assert c.reward_spec() is None  # the task's default reward


def test_file_sections_and_types(tmp_path):
    path = write(
        tmp_path,
        """
        [run]
        name = "eval-1"
        seed = 7

        [policy]
        preset = "tiny"
        kv_dtype = "bfloat16"

        [engine]
        max_batch = 4
        max_context = 1024

        [task]
        name = "arith_tool"
        split = "test"
        num_prompts = 3
        group_size = 2

        [task.options]
        add = true
        max_digits = 3

        [sampling]
        temperature = 1     # an integer is accepted for a number
        max_new_tokens = 64

        [workers]
        num_workers = 1
        num_cpus = 0.5

        [reward]
        functions = ["exact_match", "format"]
        weights = [1.0, 0.1]
        """,
    )
    c = load_config(path)
    assert (c.run.name, c.run.seed) == ("eval-1", 7)
    assert (c.policy.preset, c.policy.kv_dtype) == ("tiny", "bfloat16")
    assert (c.engine.max_batch, c.engine.max_context) == (4, 1024)
    assert c.task.split == "test" and c.task.num_prompts == 3 and c.task.group_size == 2
    assert c.task.options == {"add": True, "max_digits": 3}
    assert c.sampling.temperature == 1.0 and isinstance(c.sampling.temperature, float)
    assert c.workers.num_cpus == 0.5
    assert c.reward_spec() == {"exact_match": 1.0, "format": 0.1}
    # untouched sections keep their defaults
    assert c.limits == Config().limits


def test_overrides_parse_toml_literals_else_strings():
    assert parse_overrides(
        ["task.num_prompts=4", "sampling.top_p = 0.5", "task.options.add=true", "run.name=abc"]
    ) == [
        (["task", "num_prompts"], 4),
        (["sampling", "top_p"], 0.5),
        (["task", "options", "add"], True),
        (["run", "name"], "abc"),
    ]
    assert parse_overrides(['reward.functions=["format"]']) == [
        (["reward", "functions"], ["format"])
    ]
    assert parse_overrides(['run.name="7"']) == [(["run", "name"], "7")]


def test_overrides_beat_the_file(tmp_path):
    path = write(tmp_path, '[task]\nnum_prompts = 3\n[run]\nname = "a"\n')
    c = load_config(
        path, ["task.num_prompts=5", "task.options.min_digits=2", "workers.concurrency=3"]
    )
    assert c.task.num_prompts == 5 and c.run.name == "a"
    assert c.task.options == {"min_digits": 2}
    assert c.workers.concurrency == 3


def test_round_trip_through_the_stored_dict():
    c = load_config(None, ["task.options.add=true", "reward.functions=['exact_match']"])
    stored = json.loads(json.dumps(c.to_dict()))
    assert from_dict(stored) == c


@pytest.mark.parametrize("name", ["eval.toml", "demo.toml"])
def test_shipped_configs_are_valid(name):
    c = load_config(ROOT / "configs" / name)
    assert c.task.name == "arith_tool"


BAD_FILES = [
    ("[runn]\nname = 'x'\n", r"job\.toml: unknown section \[runn\] \(did you mean 'run'\?\)"),
    ("[task]\nnum_prompt = 3\n", r"job\.toml: unknown key task\.num_prompt \(did you mean"),
    ("run = 3\n", r"\[run\] must be a table"),
    ("[task]\nnum_prompts = '3'\n", r"job\.toml: task\.num_prompts must be an integer, got '3'"),
    ("[task]\nnum_prompts = 0\n", r"task\.num_prompts must be >= 1, got 0"),
    ("[task]\ngroup_size = 1.5\n", r"task\.group_size must be an integer, got 1\.5"),
    ("[task]\ngroup_size = true\n", r"task\.group_size must be an integer, got True"),
    ("[task]\noptions = 3\n", r"task\.options must be a table"),
    ("[sampling]\ntemperature = -0.1\n", r"sampling\.temperature must be >= 0, got -0\.1"),
    ("[sampling]\ntemperature = nan\n", r"sampling\.temperature must be a finite number"),
    ("[sampling]\ntop_p = 0\n", r"sampling\.top_p must be > 0, got 0\.0"),
    ("[sampling]\ntop_p = 1.5\n", r"sampling\.top_p must be <= 1, got 1\.5"),
    (
        "[sampling]\nthinking_mode = 'loud'\n",
        r"thinking_mode must be one of \['thinking', 'chat'\]",
    ),
    ("[policy]\nkv_dtype = 'fp4'\n", r"policy\.kv_dtype must be one of \['fp8', 'bfloat16'"),
    (
        "[policy]\nnumerics = 'offical'\n",
        r"policy\.numerics must be one of \['reference', 'official'\], got 'offical'",
    ),
    ("[policy]\npreset = 'huge'\n", r"policy\.preset: unknown preset 'huge'"),
    ("[policy]\ncheckpoint = 'no/such/file.safetensors'\n", r"policy\.checkpoint: no file"),
    ("[policy]\ntokenizer = 'no/tokenizer.json'\n", r"policy\.tokenizer: no file"),
    ("[run]\nname = 'a/b'\n", r"run\.name must be letters, digits"),
    ("[run]\nname = ''\n", r"run\.name must be letters, digits"),
    ("[run]\nout_dir = ''\n", r"run\.out_dir must not be empty"),
    ("[run]\nseed = -1\n", r"run\.seed must be >= 0, got -1"),
    ("[engine]\nmax_context = 2000000\n", r"engine\.max_context must be <= 16384 \(the 'demo'"),
    ("[engine]\nkv_budget_bytes = -1\n", r"engine\.kv_budget_bytes must be >= 0"),
    ("[limits]\ntool_timeout = 0\n", r"limits\.tool_timeout must be > 0, got 0\.0"),
    ("[limits]\ntool_timeout = 601\n", r"limits\.tool_timeout must be <= 600"),
    ("[limits]\ndeadline = -5\n", r"limits\.deadline must be > 0"),
    ("[limits]\nmax_tool_output_chars = 10\n", r"max_tool_output_chars must be >= 100"),
    (
        "[engine]\nmax_context = 1024\n[limits]\nmax_context_tokens = 4096\n",
        r"limits\.max_context_tokens \(4096\) must be <=",
    ),
    ("[sampling]\nmax_new_tokens = 2048\n", r"sampling\.max_new_tokens \(2048\) must be <"),
    ("[sandbox]\nmemory_mb = 1\n", r"sandbox\.memory_mb must be >= 16, got 1"),
    ("[sandbox]\ncommand_log = 'yes'\n", r"sandbox\.command_log must be a boolean, got 'yes'"),
    ("[workers]\nnum_workers = 0\n", r"workers\.num_workers must be >= 1, got 0"),
    ("[workers]\nnum_gpus = -1\n", r"workers\.num_gpus must be >= 0"),
    ("[workers]\nconcurrency = 'many'\n", r"workers\.concurrency must be an integer"),
    ("[task]\nname = 'nope'\n", r"task: unknown task 'nope'; known tasks: arith_tool"),
    ("[task]\nsplit = 'dev'\n", r"task\.split must be one of \['train', 'test'\], got 'dev'"),
    ("[task.options]\ndigits = 3\n", r"task: task 'arith_tool' has no option 'digits'"),
    ("[task.options]\nmax_digits = 12\n", r"task: arith_tool: max_digits must be an int in"),
    ("[reward]\nfunctions = ['nope']\n", r"reward\.functions: unknown reward 'nope'"),
    ("[reward]\nfunctions = 'format'\n", r"reward\.functions must be a list of strings"),
    ("[reward]\nfunctions = ['format', 'format']\n", r"lists a function twice"),
    ("[reward]\nweights = [1.0]\n", r"reward\.weights is given without reward\.functions"),
    ("[reward]\nfunctions = ['format']\nweights = ['x']\n", r"weights\[0\] must be a number"),
    (
        "[reward]\nfunctions = ['format', 'exact_match']\nweights = [1.0]\n",
        r"reward\.weights has 1 entries but reward\.functions has 2",
    ),
    ("[task\nname = 1\n", r"job\.toml is not valid TOML"),
    ("[sft]\ncall_fraction = 1.0\n", r"sft\.call_fraction = 1\.0 leaves no direct answer"),
    ("[sft]\ncall_fraction = 1.5\n", r"sft\.call_fraction must be <= 1"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES, ids=[m for _, m in BAD_FILES])
def test_bad_file_values_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


BAD_OVERRIDES = [
    ("task.num_prompts", r"override 'task\.num_prompts' is not of the form section\.key=value"),
    ("=3", r"is not of the form section\.key=value"),
    ("num_prompts=3", r"override key 'num_prompts' must be dotted"),
    ("tsk.name=x", r"--set tsk\.name: unknown section 'tsk' \(did you mean 'task'\?\)"),
    ("task.nme=x", r"--set: unknown key task\.nme \(did you mean 'name'\?\)"),
    ("run.seed.x=1", r"--set run\.seed\.x: too many dots"),
    ("workers.num_cpus=true", r"--set: workers\.num_cpus must be a number, got True"),
    ("task.group_size=two", r"--set: task\.group_size must be an integer, got 'two'"),
    ("sampling.top_p=2", r"--set: sampling\.top_p must be <= 1, got 2\.0"),
    ("task.options.add=yes", r"arith_tool: add must be a bool, got 'yes'"),
    ("sandbox.command_log=1", r"--set: sandbox\.command_log must be a boolean, got 1"),
]


@pytest.mark.parametrize(("item", "message"), BAD_OVERRIDES, ids=[i for i, _ in BAD_OVERRIDES])
def test_bad_overrides_name_the_key(item, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [item])


def test_missing_file():
    with pytest.raises(ConfigError, match=r"config file .*nowhere\.toml does not exist"):
        load_config("nowhere.toml")


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_checkpoint_is_a_file_or_a_learner_checkpoint_directory(tmp_path):
    ckpt = tmp_path / "step-000003"
    ckpt.mkdir()
    with pytest.raises(ConfigError, match=r"policy\.checkpoint: no file .*step-000003"):
        load_config(None, [f"policy.checkpoint={ckpt}"])
    (ckpt / "model.safetensors").write_bytes(b"")
    assert load_config(None, [f"policy.checkpoint={ckpt}"]).policy.checkpoint == str(ckpt)
    assert load_config(None, [f"policy.checkpoint={ckpt / 'model.safetensors'}"])


def test_policy_numerics_reaches_the_engine_and_the_learner(tmp_path):
    """[policy] numerics is the numerics of both models: a rollout worker's engine and the
    learner (the rollout-vs-learner logprob gap needs the same rounding on both sides)."""
    from rollout.learner import Learner
    from rollout.workers import RolloutWorker

    assert load_config(None).policy.numerics == "reference"
    c = load_config(write(tmp_path, '[policy]\npreset = "tiny"\nnumerics = "official"\n'))
    worker = RolloutWorker(c.to_dict())
    worker._make_backend()  # what the actor builds on its first call
    try:
        assert worker._engine.model.cfg.numerics == "official"
    finally:
        worker._engine.shutdown_sync()
    assert Learner(c, device="cpu").model.cfg.numerics == "official"
