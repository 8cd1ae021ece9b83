"""Space files: the shipped ones validate, and each malformed one gives one line naming the
file, the key path and what was expected, with exit 2 and no traceback."""

import optuna
import pytest

from search.cli import main
from search.inputs.space import SPACES_DIR, load_space, parse_space

GOOD = """
fixed: {optimizer: sgdm, epochs: 3, dataset: digits, schedule: cosine}
params:
  lr: {type: float, low: 1e-3, high: 0.1, log: true}
  batch_size: {type: categorical, choices: [32, 64]}
  t_max: {type: int, low: 2, high: 6, step: 2, when: {schedule: cosine}}
  warmup_epochs: {type: int, low: 0, high: 2, when: {batch_size: 64}}
"""

MALFORMED = [
    ("fixed: {optimizer: sgdm\nparams: [", "malformed YAML"),
    ("- a\n- b\n", "expected a mapping"),
    ("fixed: {optimizer: adam}\nparams: {lr: {type: float, low: 0.1, high: 1}}",
     "fixed.optimizer"),
    ("params: {lr: {type: float, low: 0.5, high: 0.1}}", "params.lr: low 0.5 > high 0.1"),
    ("params: {lrr: {type: float, low: 0.1, high: 1}}", "params.lrr: unknown setting"),
    ("params: {lr: {type: normal, low: 0.1, high: 1}}", "params.lr.type"),
    ("params: {lr: {type: float, low: 0.1}}", "params.lr.high: missing"),
    ("params: {lr: {type: float, low: 0.0, high: 1, log: true}}", "params.lr.low"),
    ("params: {batch_size: {type: float, low: 32, high: 128}}", "params.batch_size"),
    ("params: {augment: {type: categorical, choices: [final, fancy]}}",
     "params.augment.choices[1]"),
    ("params: {momentum: {type: categorical, choices: []}}", "params.momentum.choices"),
    ("params: {t_max: {type: int, low: 10, high: 20, when: {schedule: cosine}}}",
     "params.t_max.when.schedule"),
    ("fixed: {schedule: cosine}\nparams: {t_max: {type: int, low: 1, high: 5, when: {schedule: step}}}",
     "never taken"),
    ("fixed: {lr: 0.1}\nparams: {lr: {type: float, low: 0.1, high: 1}}", "also set under fixed"),
    ("params: {lr: {type: float, low: 0.1, high: 1, step: 0.1, log: true}}", "step and log"),
    ("fixed: {epochs: many}\nparams: {lr: {type: float, low: 0.1, high: 1}}", "fixed.epochs"),
    ("params: {}", "params"),
    ("fixed: {}\nparams: {lr: {type: float, low: 0.1, high: 1}}\nsampler: tpe", "sampler"),
    ("params: {momentum: {type: float, low: 0.5, high: 1.5}}", "params.momentum.high"),
]


@pytest.mark.parametrize("shipped", sorted(p.name for p in SPACES_DIR.glob("*.yaml")))
def test_shipped_spaces_validate(shipped):
    space = load_space(shipped)
    assert space.params and space.name == shipped.removesuffix(".yaml")


@pytest.mark.parametrize("text, needle", MALFORMED)
def test_malformed_space_is_one_line_exit_2(text, needle, tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    assert main(["validate", str(f)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"{f}: ") and needle in lines[0]


def test_validate_and_run_commands_on_files(cli, tmp_path):
    for i, (text, _) in enumerate(MALFORMED[:4]):
        (tmp_path / f"bad{i}.yaml").write_text(text)
    r = cli("validate", *(str(tmp_path / f"bad{i}.yaml") for i in range(4)))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 4
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    r = cli("validate", str(good))
    assert r.returncode == 0 and "ok" in r.stdout
    r = cli("run", "--space", str(tmp_path / "bad3.yaml"), "--n-trials", "1")
    assert r.returncode == 2 and "low 0.5 > high 0.1" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_conditions_decide_which_parameters_exist():
    space = parse_space(GOOD, "good.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {32: set(), 64: set()}
    for _ in range(20):
        trial = study.ask()
        values = space.sample(trial)
        seen[values["batch_size"]].add("warmup_epochs" in trial.params)
        assert values["t_max"] in (2, 4, 6) and 1e-3 <= values["lr"] <= 0.1
        study.tell(trial, 0.0)
    assert seen == {32: {False}, 64: {True}}


def test_hash_ignores_comments_but_not_values():
    a = parse_space(GOOD, "a.yaml")
    b = parse_space("# a comment\n" + GOOD, "b.yaml")
    c = parse_space(GOOD.replace("high: 0.1", "high: 0.2"), "c.yaml")
    assert a.hash == b.hash != c.hash
