"""Config composition, overrides and every error path, through the public loader."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from strato_peft.config import ConfigError, load_config, resolved_yaml
from strato_peft.config.loader import parse_override
from tests.conftest import CONFIGS, PART_FOLDERS, entry_configs


def write(path: Path, data: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A small config tree: base + model + an experiment composing them."""
    write(tmp_path / "base" / "default.yaml", {"peft": {"rank": 16, "alpha": 32}, "seed": 1})
    write(
        tmp_path / "models" / "tiny.yaml",
        {
            "model": {
                "name": "tiny",
                "source": "tiny",
                "architecture": {
                    "hidden_size": 64,
                    "intermediate_size": 128,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "vocab_size": 100,
                },
            }
        },
    )
    write(
        tmp_path / "experiments" / "exp.yaml",
        {"defaults": ["base/default", "models/tiny"], "peft": {"rank": 8}},
    )
    return tmp_path


def test_parts_compose_in_order_and_experiment_wins(tree: Path) -> None:
    cfg = load_config(tree / "experiments" / "exp.yaml")
    assert cfg.peft.rank == 8  # experiment over base
    assert cfg.peft.alpha == 32  # from base
    assert cfg.seed == 1
    assert cfg.model.architecture is not None and cfg.model.architecture.hidden_size == 64


def test_overrides_are_yaml_and_last_wins(tree: Path) -> None:
    cfg = load_config(
        tree / "experiments" / "exp.yaml",
        [
            "peft.rank=4",
            "peft.target_modules=[q_proj, k_proj]",
            "peft.rank=2",
            "training.learning_rate=3e-4",
            "device_info.mixed_precision=false",
        ],
        seed=44,
    )
    assert cfg.peft.rank == 2
    assert cfg.peft.target_modules == ["q_proj", "k_proj"]
    assert cfg.training.learning_rate == pytest.approx(3e-4)
    assert cfg.device_info.mixed_precision is False
    assert cfg.seed == 44


def test_override_can_replace_a_whole_section(tree: Path) -> None:
    cfg = load_config(
        tree / "experiments" / "exp.yaml", ["peft.strato.budget={params: 0.5, flops: 0.8}"]
    )
    assert cfg.peft.strato.budget.params == 0.5
    assert cfg.peft.strato.budget.flops == 0.8


@pytest.mark.parametrize(
    "text",
    ["peft.rank", "=3", "peft..rank=3", "peft.rank=[1, 2"],
)
def test_bad_override_syntax(tree: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="--override"):
        load_config(tree / "experiments" / "exp.yaml", [text])


def test_parse_override_values() -> None:
    assert parse_override("a.b=8") == (["a", "b"], 8)
    assert parse_override("a=[x, y]") == (["a"], ["x", "y"])
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=hello=world") == (["a"], "hello=world")


def test_unknown_key_names_key_file_and_suggestion(tree: Path) -> None:
    exp = tree / "experiments" / "exp.yaml"
    write(exp, {"defaults": ["base/default", "models/tiny"], "peft": {"rnak": 8}})
    with pytest.raises(ConfigError) as err:
        load_config(exp)
    msg = str(err.value)
    assert "'peft.rnak'" in msg and "did you mean 'peft.rank'" in msg
    assert str(exp.resolve()) in msg
    assert "\n" not in msg


def test_unknown_key_in_a_part_names_the_part(tree: Path) -> None:
    part = tree / "models" / "tiny.yaml"
    data = yaml.safe_load(part.read_text())
    data["model"]["architecture"]["hiden_size"] = data["model"]["architecture"].pop("hidden_size")
    write(part, data)
    with pytest.raises(ConfigError) as err:
        load_config(tree / "experiments" / "exp.yaml")
    msg = str(err.value)
    assert str(part.resolve()) in msg
    assert "'model.architecture.hiden_size'" in msg
    assert "did you mean 'model.architecture.hidden_size'" in msg


def test_unknown_key_from_override_names_override(tree: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"^--override: unknown key 'training.batchsize'; did you mean 'training.batch_size'",
    ):
        load_config(tree / "experiments" / "exp.yaml", ["training.batchsize=2"])


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        ("peft.rank=abc", "peft.rank", "valid integer"),
        ("peft.rank=0", "peft.rank", "greater than 0"),
        ("peft.dropout=1.5", "peft.dropout", "less than 1"),
        ("training.batch_size=[1]", "training.batch_size", "valid integer"),
        ("device_info.device_type=tpu", "device_info.device_type", "'auto', 'cuda'"),
        ("peft.method=lroa", "peft.method", "did you mean 'lora'"),
        ("task.name=gsm9k", "task.name", "did you mean 'gsm8k'"),
    ],
)
def test_invalid_values_name_the_key(tree: Path, override: str, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(tree / "experiments" / "exp.yaml", [override])
    msg = str(err.value)
    assert f"'{key}'" in msg and fragment in msg and msg.startswith("--override")


def test_missing_required_key(tree: Path) -> None:
    write(tree / "experiments" / "nomodel.yaml", {"defaults": ["base/default"]})
    with pytest.raises(ConfigError, match="missing required key 'model'"):
        load_config(tree / "experiments" / "nomodel.yaml")


def test_missing_file_and_missing_part(tree: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tree / "nope.yaml")
    write(tree / "experiments" / "bad.yaml", {"defaults": ["models/absent"]})
    with pytest.raises(ConfigError, match=r"part 'models/absent' listed in 'defaults' not found"):
        load_config(tree / "experiments" / "bad.yaml")


def test_invalid_yaml_names_line(tree: Path) -> None:
    write(tree / "experiments" / "broken.yaml", "peft:\n  rank: [1,\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml:\d+:\d+: invalid YAML"):
        load_config(tree / "experiments" / "broken.yaml")


def test_circular_defaults(tree: Path) -> None:
    write(tree / "a.yaml", {"defaults": ["b"]})
    write(tree / "b.yaml", {"defaults": ["a"]})
    with pytest.raises(ConfigError, match="circular 'defaults'"):
        load_config(tree / "a.yaml")


def test_resolved_config_round_trips(tree: Path, tmp_path: Path) -> None:
    cfg = load_config(tree / "experiments" / "exp.yaml", ["peft.strato.lambda=0.25"])
    again = write(tmp_path / "resolved.yaml", resolved_yaml(cfg))
    assert load_config(again) == cfg
    assert "lambda: 0.25" in again.read_text()


@pytest.mark.parametrize("path", entry_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.model.name and cfg.output.dir == "results"


def _leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        if key == "defaults" and not prefix:
            continue
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(value, dict):
            keys += _leaf_keys(value, f"{dotted}.")
    return keys


def _typo(key: str) -> str:
    return key[0] + key[2] + key[1] + key[3:] if len(key) > 3 and key[1] != key[2] else key + "x"


def _rename(tree: dict, dotted: str, new_last: str) -> None:
    *parents, last = dotted.split(".")
    node = tree
    for part in parents:
        node = node[part]
    node[new_last] = node.pop(last)


def _entry_using(part: Path, copy_root: Path) -> Path:
    rel = part.relative_to(copy_root)
    if rel.parts[0] not in PART_FOLDERS:
        return part
    name = str(rel.with_suffix(""))
    for entry in sorted(copy_root.rglob("*.yaml")):
        data = yaml.safe_load(entry.read_text()) or {}
        if name in data.get("defaults", []):
            return entry
    raise AssertionError(f"no shipped config uses {rel}")


def test_a_typo_in_any_key_of_any_shipped_config_is_caught(tmp_path: Path) -> None:
    copy_root = tmp_path / "configs"
    shutil.copytree(CONFIGS, copy_root)
    checked = 0
    for file in sorted(copy_root.rglob("*.yaml")):
        original = file.read_text()
        data = yaml.safe_load(original)
        entry = _entry_using(file, copy_root)
        for dotted in _leaf_keys(data):
            last = dotted.rsplit(".", 1)[-1]
            typo = _typo(last)
            mutated = yaml.safe_load(original)
            _rename(mutated, dotted, typo)
            file.write_text(yaml.safe_dump(mutated))
            with pytest.raises(ConfigError) as err:
                load_config(entry)
            msg = str(err.value)
            typo_dotted = dotted.rsplit(".", 1)[0] + "." + typo if "." in dotted else typo
            assert f"unknown key '{typo_dotted}'" in msg, msg
            assert f"did you mean '{dotted}'" in msg, msg
            assert str(file.resolve()) in msg, msg
            checked += 1
        file.write_text(original)
    assert checked > 100


@pytest.mark.parametrize("path", entry_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_names_a_known_task_subset(path: Path) -> None:
    from strato_peft.tasks import load_task

    cfg = load_config(path)
    assert load_task(cfg.task).name == cfg.task.name  # the constructor checks the subset
