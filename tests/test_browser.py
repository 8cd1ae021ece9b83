"""What a user sees, in a real browser (Debian's headless `chromium`): the HTML report, the
optuna-dashboard study and trial pages, and the MLflow experiment and trial-run pages of a small
study tracked on a real MLflow server. Screenshots land in artifacts/browser/ (CI keeps them)."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import optuna
import pytest

from tests.conftest import IN_CI, ROOT, free_port

SHOTS = ROOT / "artifacts" / "browser"
SPACE = """
fixed: {optimizer: sgdm, epochs: 3, dataset: digits, augment: none}
params:
  lr: {type: float, low: 1.0e-3, high: 0.1, log: true}
  batch_size: {type: categorical, choices: [32, 64]}
"""


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if IN_CI:
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium")
        pytest.skip("chromium not found (apt-get install chromium)")
    return found


def render(url: str, name: str) -> str:
    """The page's DOM after its scripts ran, and a screenshot of it as SHOTS/NAME.png."""
    SHOTS.mkdir(parents=True, exist_ok=True)

    def chromium(*args: str) -> subprocess.CompletedProcess:
        # a fresh profile each time: one Chromium's lingering helpers can hold a shared
        # profile's lock while the next starts (it then exits at once, printing nothing)
        with tempfile.TemporaryDirectory(prefix="search-chromium-") as profile:
            return subprocess.run(
                [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                 "--window-size=1500,1000", "--virtual-time-budget=20000", f"--user-data-dir={profile}",
                 *args, url], capture_output=True, text=True, timeout=180)

    chromium(f"--screenshot={SHOTS / name}.png")
    dom = chromium("--dump-dom")
    (SHOTS / f"{name}.html").write_text(dom.stdout or dom.stderr[-3000:])
    return dom.stdout


# a constrained trade-off whose three trials end three ways: diverged (failed), on the front,
# and infeasible (lr 1e-4 cannot reach 50 % in 2 epochs)
CONSTRAINED = """
fixed: {optimizer: sgdm, epochs: 2, dataset: digits, augment: none, batch_size: 32}
params:
  lr: {type: categorical, choices: [1.0, 0.05, 0.0001]}
objectives: [val_acc, seconds]
"""
LINKS: dict[str, str] = {}  # study -> the MLflow link `search run` printed


def _search(work, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "search", *args], cwd=work, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def tracked_study(mlflow_server, tmp_path_factory):
    """A 4-trial study on digits tracked on the MLflow server with its best trial retrained, a
    constrained two-objective study beside it, and optuna-dashboard serving both."""
    _chromium()
    work = tmp_path_factory.mktemp("browser")
    (work / "b.yaml").write_text(SPACE)
    (work / "c.yaml").write_text(CONSTRAINED)
    r = _search(work, "run", "--space", "b.yaml", "--mlflow-uri", mlflow_server, "--n-trials",
                "4", "--seed", "0", "--pruner-startup-trials", "1")
    LINKS["b"] = re.search(r"MLflow experiment (\S+)", r.stderr).group(1)
    _search(work, "retrain", "--study", "b", "--mlflow-uri", mlflow_server)
    r = _search(work, "run", "--space", "c.yaml", "--mlflow-uri", mlflow_server, "--sampler",
                "grid", "--n-trials", "3", "--constraint", "val_acc>=0.5")
    LINKS["c"] = re.search(r"MLflow experiment (\S+)", r.stderr).group(1)
    port = free_port()
    dash = subprocess.Popen([sys.executable, "-m", "search", "dashboard", "--port", str(port)],
                            cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/api/studies", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(work / "search-journal.log")))
    yield work, url, optuna.load_study(study_name="b", storage=storage)
    dash.terminate()
    dash.wait(timeout=30)


def test_the_report_renders_its_tables_and_plots(tracked_study):
    work, _, study = tracked_study
    r = subprocess.run([sys.executable, "-m", "search", "report", "--study", "b", "-o",
                        "report.html"], cwd=work, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    dom = render((work / "report.html").as_uri(), "report")
    assert "<table>" in dom and "| Test #" not in dom  # an HTML table, not Markdown in a box
    for t in study.trials:
        assert f">#{t.number}</a>" in dom  # each row links to its MLflow run
    assert dom.count('class="main-svg"') >= 3  # plotly drew the figures
    assert "<em>Measured on digits, not CIFAR-100.</em>" in dom


def test_the_dashboard_shows_val_acc_and_links_each_trial_to_mlflow(tracked_study):
    _, url, study = tracked_study
    dom = render(f"{url}/dashboard/studies/{study._study_id}", "dashboard-study")
    assert "val_acc" in dom and "Objective 0" not in dom
    dom = render(f"{url}/dashboard/studies/{study._study_id}/trials", "dashboard-trials")
    first = study.trials[0].user_attrs["mlflow_run_id"]
    assert f"/runs/{first}?workflowType=machine_learning" in dom  # the trial note's link


def test_mlflow_opens_on_the_runs_table_with_nested_trials_and_datasets(tracked_study,
                                                                        mlflow_server):
    _, _, study = tracked_study
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(mlflow_server).get_experiment_by_name("b")
    dom = render(f"{mlflow_server}/#/experiments/{exp.experiment_id}"
                 "?workflowType=machine_learning", "mlflow-experiment")
    assert "Token Usage" not in dom  # not the GenAI overview
    # the study run, its trials and the retrain run
    assert "Run Name" in dom and f"{len(study.trials) + 2}</strong> matching runs" in dom
    child = study.trials[0].user_attrs["mlflow_run_id"]
    dom = render(f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs/{child}"
                 "?workflowType=machine_learning", "mlflow-trial-run")
    assert "trial-0" in dom and "digits" in dom  # its name and its dataset input
    assert "Parent run" in dom and ">b<" in dom  # nested under the study's run
    # a pruned trial's run says so first thing in its name (both end "Finished")
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, "seed 0 prunes some of these 3-epoch trials"
    t = pruned[0]
    dom = render(f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs/"
                 f"{t.user_attrs['mlflow_run_id']}?workflowType=machine_learning",
                 "mlflow-pruned-run")
    name = f"pruned@{max(t.intermediate_values)} · trial-{t.number}"
    assert name in dom or name.replace("·", "&middot;") in dom


def _text(dom: str) -> str:
    return dom.replace("&middot;", "·")


def test_the_mlflow_link_opens_the_trials_ranked_with_their_states(tracked_study):
    """The link `search run` prints opens the trials flat, best first, with their state and
    objective as columns: complete, best, pruned, retrain; infeasible, Pareto, failed."""
    _, _, study = tracked_study
    dom = _text(render(LINKS["b"], "mlflow-study-view"))
    assert "shared view" in dom and "search: trials by val_acc" in dom  # the study's view
    assert ">state<" in dom and ">objective<" in dom and ">lr<" in dom  # its columns
    best = study.best_trial
    assert "complete · best" in dom and "pruned at epoch" in dom
    assert "retrain (test split)" in dom
    # ranked: the best trial's row comes before every other trial's
    rows = re.findall(r">((?:pruned@\d+ · )?trial-\d+)<", dom)
    assert rows and rows[0] == f"trial-{best.number}", rows
    dom = _text(render(LINKS["c"], "mlflow-constrained-view"))
    for state in ("complete · Pareto", "infeasible", "failed"):
        assert f">{state}<" in dom, state


def test_the_dashboard_calls_only_feasible_trials_best(tracked_study):
    work, url, _ = tracked_study
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(work / "search-journal.log")))
    c = optuna.load_study(study_name="c", storage=storage)
    front = {t.number for t in c.best_trials}
    assert len(front) == 1  # lr 0.05: the one feasible trial
    dom = render(f"{url}/dashboard/studies/{c._study_id}/trials", "dashboard-constrained-trials")
    assert dom.count(">Best Trial<") == len(front)
    infeasible = next(t for t in c.trials if t.state.name == "COMPLETE" and t.number not in front)
    dom = render(f"{url}/dashboard/studies/{c._study_id}/trials?numbers={infeasible.number}",
                 "dashboard-infeasible-trial")
    assert "Infeasible" in dom
