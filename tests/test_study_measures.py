"""A study knows what it measures: a command with another dataset, epochs or network never adds
trials to it; the same command resumes it as before; `search status` shows what it measures."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT

ADAMW = str(ROOT / "spaces" / "adamw.yaml")


@pytest.mark.slow
def test_a_command_that_measures_something_else_never_adds_trials(cli, tmp_path):
    (tmp_path / "nets.py").write_text("from torch import nn\n\n\ndef tiny(num_classes):\n"
                                      "    return nn.Sequential(nn.Flatten(), nn.Linear(3072, num_classes))\n")
    first = cli("run", "--space", ADAMW, "--dataset", "digits", "--epochs", "1", "--n-trials", "2")
    assert first.returncode == 0, first.stderr[-2000:]
    # a quiet first run: no MLflow database chatter; the local store's view and how to open it
    assert "INFO" not in first.stderr, first.stderr
    assert "run `mlflow ui`, then open http://127.0.0.1:5000/#/experiments/" in first.stderr
    for flags, says in ((["--dataset", "digit-pairs"], "dataset 'digits' in the study, "
                         "'digit-pairs' in this command"),
                        (["--dataset", "digits", "--epochs", "2"], "epochs 1 in the study, 2 in "
                         "this command"),
                        (["--dataset", "digits", "--epochs", "1", "--model", "nets.py:tiny"],
                         "model 'lenet5' in the study, '" + str(tmp_path / "nets.py") + ":tiny' "
                         "in this command")):
        r = cli("run", "--space", ADAMW, *flags, "--n-trials", "3")
        assert r.returncode == 2, r.stderr[-2000:]
        lines = [line for line in r.stderr.splitlines() if "measures something else" in line]
        assert len(lines) == 1 and says in lines[0] and "--study adamw-" in lines[0], r.stderr
        assert "Traceback" not in r.stderr
    status = cli("status", "--json")
    [row] = json.loads(status.stdout)
    assert sum(row["counts"].values()) == 2  # nothing was added by the refused commands
    assert row["measures"] == {"dataset": "digits", "epochs": 1, "model": "lenet5",
                               "model_args": {}, "constraints": []}
    assert "dataset digits, 1 epochs, network lenet5" in cli("status").stdout
    # the same command resumes the study as before, and a new name starts another
    again = cli("run", "--space", ADAMW, "--dataset", "digits", "--epochs", "1", "--n-trials", "3")
    assert again.returncode == 0, again.stderr[-2000:]
    other = cli("run", "--space", ADAMW, "--study", "adamw-digit-pairs", "--dataset",
                "digit-pairs", "--epochs", "1", "--n-trials", "1")
    assert other.returncode == 0, other.stderr[-2000:]
    rows = {r["study"]: r for r in json.loads(cli("status", "--json").stdout)}
    assert sum(rows["adamw"]["counts"].values()) == 3
    assert rows["adamw-digit-pairs"]["measures"]["dataset"] == "digit-pairs"
