"""The live Label Studio loop against a real server: `fmask export --project` pushes a query's batch (images,
tasks, predictions), annotators answer through the API with their own tokens, `fmask label --project` pulls the
answers with the rules of `--answers`; unreachable servers, refused tokens and mismatched projects get one line.

The server (`label-studio` from the registry) lives in a virtual environment of its own: `.ci/run` makes it and
points FMASK_LABEL_STUDIO at its `label-studio`; otherwise `.venv-ls/bin/label-studio` is used. Without it these
tests are skipped, except on CI, where a missing server is a failure.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fmask import load_model, load_pool
from fmask.core import paths
from fmask.core.hashing import seal_json
from fmask.label.export import label_studio_config
from tests.conftest import invoke, refused_line, snapshot
from tests.test_human_loop import make_query

SERVER_ENV = "FMASK_LABEL_STUDIO"  # path of the server's `label-studio` executable
CONVENTIONAL_SERVER = Path(__file__).resolve().parents[1] / ".venv-ls" / "bin" / "label-studio"
STARTUP_TIMEOUT_S = 420  # 45-125 s on a busy 2-core machine (database migrations on first start)
ADMIN_EMAIL, ANNOTATOR_EMAIL = "admin@fmask.test", "annotator@fmask.test"


@dataclass
class Server:
    url: str
    token: str  # the admin's legacy token (LABEL_STUDIO_USER_TOKEN)
    password: str

    def client(self, token: str | None = None):
        from label_studio_sdk import LabelStudio

        return LabelStudio(base_url=self.url, api_key=token or self.token)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_health(url: str, process: subprocess.Popen, log: Path) -> float:
    """Seconds until GET /health answers 200; fails with the log's tail if the server dies or never answers."""
    start = time.monotonic()
    while time.monotonic() - start < STARTUP_TIMEOUT_S:
        if process.poll() is not None:
            pytest.fail(f"Label Studio exited with {process.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as reply:
                if reply.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"Label Studio did not answer /health within {STARTUP_TIMEOUT_S} s:\n"
                f"{log.read_text(errors='replace')[-3000:]}")


@pytest.fixture(scope="session")
def label_studio_server(tmp_path_factory):
    """A real Label Studio on 127.0.0.1, a fresh data directory, an admin with a legacy token; stopped at the end."""
    if importlib.util.find_spec("label_studio_sdk") is None:  # the lowest-versions job of .ci/run leaves it out
        pytest.skip("needs the Label Studio client: pip install 'fmask[labelstudio]'")
    binary = Path(os.environ.get(SERVER_ENV) or CONVENTIONAL_SERVER)
    if not binary.is_file():
        reason = (f"no Label Studio server at {binary}: make it with `python3 -m venv .venv-ls && "
                  f".venv-ls/bin/pip install label-studio` (as .ci/run does) or set {SERVER_ENV}")
        if os.environ.get("CI"):
            pytest.fail(reason)  # CI installs the server, so these tests must run there
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("label-studio-server")
    port = free_port()
    server = Server(f"http://127.0.0.1:{port}", "fmask-test-" + secrets.token_hex(16), secrets.token_hex(12))
    env = {key: value for key, value in os.environ.items() if key not in ("LABEL_STUDIO_API_KEY", "LABEL_STUDIO_URL")}
    env.update(LABEL_STUDIO_BASE_DATA_DIR=str(root / "data"), LABEL_STUDIO_USERNAME=ADMIN_EMAIL,
               LABEL_STUDIO_PASSWORD=server.password, LABEL_STUDIO_USER_TOKEN=server.token,
               LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",  # legacy tokens are off by default in new versions
               LATEST_VERSION_CHECK="false", COLLECT_ANALYTICS="false", SENTRY_DSN="", FRONTEND_SENTRY_DSN="")
    log = root / "server.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen([str(binary), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port",
                                    str(port)], env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        seconds = wait_for_health(server.url, process, log)
        sys.stderr.write(f"\nLabel Studio answered /health after {seconds:.0f} s\n")
        yield server
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server's own process group, started above
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def sign_up_annotator(server: Server, email: str) -> str:
    """A second annotator joins as people do (the organization's invite link, the sign-up form) and reads their
    own API token; returns it."""
    import httpx  # the Label Studio client's HTTP library

    invite = server.client().organizations.invites.get_invite_link()
    with httpx.Client(base_url=server.url, follow_redirects=True) as browser:
        browser.get(invite.invite_url)
        reply = browser.post(invite.invite_url, data={"email": email, "password": secrets.token_hex(12),
                                                      "csrfmiddlewaretoken": browser.cookies.get("csrftoken")},
                             headers={"Referer": server.url + invite.invite_url})
        assert reply.status_code == 200, reply.text[:500]
        token = browser.get("/api/current-user/token")
        assert token.status_code == 200, token.text[:500]
        return token.json()["token"]


def choice(name: str) -> list[dict]:
    return [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [name]}}]


def project_named(client, title: str):
    found = [p for p in client.projects.list() if p.title == title]
    assert len(found) == 1, [p.title for p in found]
    return found[0]


def project_tasks(client, project_id: int) -> list[dict]:
    return sorted((task.model_dump() for task in client.tasks.list(project=project_id, fields="all")),
                  key=lambda task: task["id"])


def every_file_holding(root: Path, secret: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.fixture
def live_env(label_studio_server, monkeypatch):
    """The admin's token in LABEL_STUDIO_API_KEY, no LABEL_STUDIO_URL: tests pass --label-studio."""
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio_server.token)
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    return label_studio_server


def test_push_annotate_pull_train_round_trip(run_dir, tiny_run, live_env, monkeypatch):
    server, admin = live_env, live_env.client()
    title = "digits round trip"
    outputs = []

    def run(*args):
        result = invoke(*args)
        outputs.append(result.output)
        result.text = " ".join(result.output.split())  # rich wraps long lines
        return result

    query, ids = make_query(run_dir, batch=6)
    pool = load_pool(run_dir / "pool")
    classes = pool.classes
    pushed = run("export", "--query", query, "--label-studio", server.url, "--project", title, "--out",
                 run_dir / "batch", "--device", "cpu")
    assert pushed.exit_code == 0, pushed.output

    # What the server holds, read through its API: the project, one task per sample in selection order,
    # the uploaded images (the pool's pixels), the model's top guess as a prediction.
    project = admin.projects.get(project_named(admin, title).id)
    assert project.get_label_interface().get_control("label").labels == classes
    tasks = project_tasks(admin, project.id)
    query_sha256 = hashlib.sha256(query.read_bytes()).hexdigest()
    assert [t["data"]["sample_id"] for t in tasks] == ids
    assert all(t["data"]["query_sha256"] == query_sha256 for t in tasks)
    with torch.no_grad():
        probs = torch.softmax(load_model(run_dir / "round0.pt")(pool.inputs(ids)), dim=1)
    import httpx  # the Label Studio client's HTTP library

    with httpx.Client(base_url=server.url, headers={"Authorization": f"Token {server.token}"}) as http:
        for task, sample_id, p in zip(tasks, ids, probs):
            reply = http.get(task["data"]["image"])
            assert reply.status_code == 200 and reply.content[:8] == b"\x89PNG\r\n\x1a\n"
            with Image.open(io.BytesIO(reply.content)) as image:
                assert torch.equal(torch.from_numpy(np.array(image)), pool.images([sample_id])[0, 0])
            (prediction,) = task["predictions"]
            assert prediction["result"][0]["value"]["choices"] == [classes[int(p.argmax())]]
            assert prediction["score"] == pytest.approx(float(p.max()), abs=1e-5)
    info = json.loads((run_dir / "batch" / paths.EXPORT_INFO).read_text())
    assert info["label_studio"]["project_id"] == project.id
    assert info["label_studio"]["task_ids"] == [t["id"] for t in tasks]

    # Pushing the same query again adds nothing.
    again = run("export", "--query", query, "--label-studio", server.url, "--project", title, "--device", "cpu")
    assert again.exit_code == 0 and "0 new tasks, 6 already there" in again.text, again.output
    assert len(project_tasks(admin, project.id)) == 6

    # Annotators answer: the admin labels four images (never the model's guess, so predictions read as answers
    # would show) and skips one; a second annotator disagrees on the first; the sixth stays unanswered.
    annotator = server.client(sign_up_annotator(server, ANNOTATOR_EMAIL))
    wanted = {t["data"]["sample_id"]: (int(p.argmax()) + 1) % len(classes) for t, p in zip(tasks, probs)}
    for task in tasks[:4]:
        admin.annotations.create(id=task["id"], result=choice(classes[wanted[task["data"]["sample_id"]]]))
    admin.annotations.create(id=tasks[4]["id"], result=[], was_cancelled=True)
    other = classes[(wanted[ids[0]] + 1) % len(classes)]
    disagreement = annotator.annotations.create(id=tasks[0]["id"], result=choice(other))

    before, shared_before = snapshot(run_dir), snapshot(tiny_run)
    refused = run("label", "--query", query, "--label-studio", server.url, "--project", title, "--out",
                  run_dir / "l1.json")
    assert "conflicting" in refused_line(refused) and str(ids[0]) in refused.stderr
    assert snapshot(run_dir) == before and snapshot(tiny_run) == shared_before

    annotator.annotations.update(id=disagreement.id, result=choice(classes[wanted[ids[0]]]))  # now they agree
    pulled = run("label", "--query", query, "--label-studio", server.url, "--project", title, "--out",
                 run_dir / "l1.json")
    assert pulled.exit_code == 0, pulled.output
    labeled = json.loads((run_dir / "l1.json").read_text())
    assert labeled["ids"][-4:] == ids[:4] and labeled["labels"][-4:] == [wanted[i] for i in ids[:4]]
    assert labeled["sources"] == ["initial"] * 20 + ["human"] * 4
    assert labeled["label_studio_tasks"] == {
        str(t["data"]["sample_id"]): {"url": server.url, "project": title, "project_id": project.id,
                                      "task_ids": [t["id"]]} for t in tasks[:4]}
    assert "stay unlabeled" in pulled.output and str(ids[4]) in pulled.output and str(ids[5]) in pulled.output
    unchanged = run("label", "--query", query, "--label-studio", server.url, "--project", title, "--out",
                    run_dir / "l1.json")
    assert unchanged.exit_code == 0 and "skipped" in unchanged.output, unchanged.output

    trained = run("train", "--pool", run_dir / "pool", "--labeled", run_dir / "l1.json", "--model", "cnn",
                  "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--out", run_dir / "round1.pt")
    assert trained.exit_code == 0, trained.output

    # The next round, pushed with a personal access token (a JWT the client refreshes) instead of the legacy
    # token: only the new query's tasks are added.
    access_token = admin.tokens.create().token
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", access_token)
    query2, ids2 = make_query(run_dir, "q2.json", batch=3, labeled=run_dir / "l1.json")
    second = run("export", "--query", query2, "--label-studio", server.url, "--project", title, "--device", "cpu")
    assert second.exit_code == 0 and "3 new tasks, 0 already there" in second.text, second.output
    all_tasks = project_tasks(admin, project.id)
    assert [t["data"]["sample_id"] for t in all_tasks] == ids + ids2
    assert {t["data"]["query_sha256"] for t in all_tasks[6:]} == {hashlib.sha256(query2.read_bytes()).hexdigest()}

    # Neither token is in any file fmask wrote, nor in anything it printed.
    for token in (server.token, access_token):
        assert every_file_holding(run_dir, token) == [] and every_file_holding(tiny_run, token) == []
        assert not [output for output in outputs if token in output]


def other_classes_project(server: Server, title: str) -> None:
    server.client().projects.create(title=title, label_config=label_studio_config(["cat", "dog"]))


def two_projects(server: Server, title: str) -> None:
    for _ in range(2):
        server.client().projects.create(title=title, label_config=label_studio_config([str(d) for d in range(10)]))


# Each case: (id, command, setup(server, title), argv after the query and --project TITLE, environment changes,
# a word the one-line error must contain). A closed port stands for an unreachable server.
LIVE_ERRORS = [
    ("unreachable-export", "export", None, ["--label-studio", "http://127.0.0.1:{closed}"], {}, "cannot reach"),
    ("unreachable-label", "label", None, ["--label-studio", "http://127.0.0.1:{closed}"], {}, "cannot reach"),
    ("bad-token-export", "export", None, ["--label-studio", "{url}"], {"LABEL_STUDIO_API_KEY": "not-a-token"},
     "refused the token"),
    ("bad-token-label", "label", None, ["--label-studio", "{url}"], {"LABEL_STUDIO_API_KEY": "not-a-token"},
     "refused the token"),
    ("no-token", "export", None, ["--label-studio", "{url}"], {"LABEL_STUDIO_API_KEY": None}, "LABEL_STUDIO_API_KEY"),
    ("other-classes-export", "export", other_classes_project, ["--label-studio", "{url}"], {}, "classes"),
    ("other-classes-label", "label", other_classes_project, ["--label-studio", "{url}"], {}, "classes"),
    ("project-missing-on-label", "label", None, ["--label-studio", "{url}"], {}, "no project titled"),
    ("no-task-of-the-query-on-label", "label", lambda s, t: s.client().projects.create(
        title=t, label_config=label_studio_config([str(d) for d in range(10)])), ["--label-studio", "{url}"], {},
     "no task of query"),
    ("two-projects-one-title", "export", two_projects, ["--label-studio", "{url}"], {}, "2 projects titled"),
    ("url-from-environment-missing", "export", None, [], {"LABEL_STUDIO_URL": None}, "LABEL_STUDIO_URL"),
    ("not-a-url", "export", None, ["--label-studio", "localhost:8080"], {}, "not an http"),
    ("answers-and-project", "label", None, ["--label-studio", "{url}", "--answers", "{run}/answers.csv"], {},
     "not both"),
]


@pytest.mark.parametrize("case", LIVE_ERRORS, ids=[c[0] for c in LIVE_ERRORS])
def test_live_errors_one_line_exit_2_nothing_written(case, run_dir, tiny_run, live_env, monkeypatch):
    name, command, setup, extra, env, expected = case
    server, title = live_env, f"errors {name}"
    query, ids = make_query(run_dir, batch=3)
    (run_dir / "answers.csv").write_text(f"sample_id,label\n{ids[0]},3\n")
    if setup is not None:
        setup(server, title)
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    projects_before = sorted((p.id, p.task_number) for p in server.client().projects.list())
    before, shared_before = snapshot(run_dir), snapshot(tiny_run)
    out = ["--out", run_dir / ("batch" if command == "export" else "l1.json")]
    argv = [a.format(url=server.url, closed=free_port(), run=run_dir) if isinstance(a, str) else a for a in extra]
    result = invoke(command, "--query", query, "--project", title, *out, *argv,
                    *(["--device", "cpu"] if command == "export" else []))
    line = refused_line(result)
    assert expected.lower() in line.lower(), line
    assert server.token not in result.output and "not-a-token" not in result.output
    assert snapshot(run_dir) == before and snapshot(tiny_run) == shared_before
    assert not (run_dir / "batch").exists()
    assert sorted((p.id, p.task_number) for p in server.client().projects.list()) == projects_before


def test_label_studio_options_without_the_client_name_the_install_line(run_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "label_studio_sdk", None)  # `import label_studio_sdk` now fails
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "some-token")
    query, _ = make_query(run_dir, batch=3)
    before = snapshot(run_dir)
    for command in ("export", "label"):
        line = refused_line(invoke(command, "--query", query, "--project", "p", "--label-studio",
                                   "http://127.0.0.1:9", *(["--out", run_dir / "l1.json"] if command == "label" else [])))
        assert "pip install 'fmask[labelstudio]'" in line, line
    assert snapshot(run_dir) == before


def test_tasks_carry_the_sample_path_when_the_query_records_it(run_dir):
    query, ids = make_query(run_dir, batch=3)
    data = json.loads(query.read_text())
    data["selected_paths"] = [f"photos/cat/{i:04d}.jpg" for i in ids]  # as a query on an image-folder pool has
    query.write_text(json.dumps(seal_json(data)))
    result = invoke("export", "--query", query, "--out", run_dir / "batch", "--device", "cpu")
    assert result.exit_code == 0, result.output
    tasks = json.loads((run_dir / "batch" / paths.LABEL_STUDIO_TASKS).read_text())
    assert [t["data"]["path"] for t in tasks] == [f"photos/cat/{i:04d}.jpg" for i in ids]
    assert {t["data"]["query_sha256"] for t in tasks} == {hashlib.sha256(query.read_bytes()).hexdigest()}
    data["selected_paths"] = data["selected_paths"][:2]  # one path short: refused
    query.write_text(json.dumps(seal_json(data)))
    line = refused_line(invoke("export", "--query", query, "--out", run_dir / "batch2", "--device", "cpu"))
    assert "selected_paths" in line, line
