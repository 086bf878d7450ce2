"""The live Label Studio loop, through its maintained client (``label-studio-sdk``, the ``labelstudio`` extra).

``push_batch`` finds the project by its exact title (or creates it with a labeling config over the pool's classes),
uploads the batch's PNGs through the import API (no local-files serving needed) and adds one task per sample, in
selection order, with the model's top guess as a prediction. Tasks are matched by ``data.sample_id`` and
``data.query_sha256``, so pushing a query again adds nothing. ``pull_answers`` reads the annotations of one
query's tasks with the rules of ``fmask label --answers`` (:func:`fmask.label.answers.label_studio_answers`).

The token comes only from the ``LABEL_STUDIO_API_KEY`` environment variable (a personal access token or a legacy
token; the client tells them apart). It is never returned, and every error message is built here, without
request headers, and scrubbed of it.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence
from urllib.parse import urlparse

from fmask.core.errors import FmaskError
from fmask.label.answers import label_studio_answers
from fmask.core.progress import ProgressFn

TOKEN_ENV = "LABEL_STUDIO_API_KEY"
URL_ENV = "LABEL_STUDIO_URL"
INSTALL = "pip install 'fmask[labelstudio]'"
LS_CONTROL, LS_OBJECT = "label", "image"  # names in the labeling config; predictions and answers use the same
UPLOADS_PER_REQUEST = 50  # images per upload request (Label Studio caps the size of one request)
TIMEOUT_S = 60.0
UPLOAD_URL_PREFIX = "data/"  # Label Studio serves an upload named upload/<project>/<file> at <base URL>/data/...


def resolve_url(url: Optional[str]) -> str:
    """``--label-studio URL``, else ``LABEL_STUDIO_URL``; an http(s) URL without the trailing slash."""
    url = url or os.environ.get(URL_ENV)
    if not url:
        raise FmaskError(f"--project needs Label Studio's address: pass --label-studio URL or set {URL_ENV} "
                         "(e.g. http://localhost:8080)")
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise FmaskError(f"--label-studio {url} is not an http(s) URL; give the address Label Studio runs at, e.g. "
                         "http://localhost:8080")
    return url.rstrip("/")


def _sdk() -> Any:
    try:
        import label_studio_sdk
    except ImportError as exc:
        raise FmaskError(f"the Label Studio options need its client, which is not installed; run {INSTALL}") from exc
    return label_studio_sdk


def _detail(body: Any) -> str:
    """A short reason from an error response body (Label Studio answers JSON with 'detail' or field errors)."""
    if isinstance(body, dict):
        for key in ("detail", "validation_errors", "message"):
            if body.get(key):
                return json.dumps(body[key]) if not isinstance(body[key], str) else body[key]
    return " ".join(str(body).split())[:200]


@dataclass
class ProjectRef:
    id: int
    title: str
    label_config: str


class LabelStudioConnection:
    """One server, one token (from the environment); every call maps transport and API errors to FmaskError."""

    def __init__(self, url: str):
        sdk = _sdk()
        self.url = resolve_url(url)
        self._token = os.environ.get(TOKEN_ENV, "").strip()
        if not self._token:
            raise FmaskError(f"set {TOKEN_ENV} to your Label Studio access token (Account & Settings in Label "
                             "Studio); fmask reads the token from the environment only")
        with self.errors("checking the token"):
            self.client = sdk.LabelStudio(base_url=self.url, api_key=self._token, timeout=TIMEOUT_S)
            self.client.users.whoami()  # fails fast on an unreachable server or a refused token

    @contextmanager
    def errors(self, doing: str) -> Iterator[None]:
        """Turn what the client raises while ``doing`` into one line that names the fix and never the token."""
        import httpx
        from label_studio_sdk.core.api_error import ApiError

        try:
            yield
        except FmaskError:
            raise
        except httpx.TransportError as exc:
            raise self._error(f"cannot reach Label Studio at {self.url} while {doing} ({type(exc).__name__}: {exc}); "
                              "start it (`label-studio start`) or fix --label-studio / " + URL_ENV) from None
        except ApiError as exc:
            if exc.status_code == 401:
                raise self._error(f"Label Studio at {self.url} refused the token in {TOKEN_ENV} (HTTP 401: "
                                  f"{_detail(exc.body)}); copy a current token from Account & Settings") from None
            raise self._error(f"Label Studio at {self.url} answered HTTP {exc.status_code} while {doing}: "
                              f"{_detail(exc.body)}; check the server's log and the project's settings") from None
        except ValueError as exc:  # a reply that is not Label Studio's JSON (another web server at that address)
            raise self._error(f"{self.url} did not answer like Label Studio while {doing} ({type(exc).__name__}); "
                              "check --label-studio / " + URL_ENV) from None

    def _error(self, message: str) -> FmaskError:
        return FmaskError(message.replace(self._token, "***") if self._token else message)

    def find_project(self, title: str) -> Optional[ProjectRef]:
        """The project titled exactly ``title``; None if there is none; refused if several share the title."""
        with self.errors(f"looking up project {title!r}"):
            found = [p for p in self.client.projects.list(title=title) if p.title == title]
        if len(found) > 1:
            raise FmaskError(f"Label Studio at {self.url} has {len(found)} projects titled {title!r} (ids "
                             f"{sorted(p.id for p in found)}); rename all but one, or choose another --project")
        if not found:
            return None
        with self.errors(f"reading project {title!r}"):
            project = self.client.projects.get(found[0].id)
        return ProjectRef(project.id, title, project.label_config or "")

    def check_classes(self, project: ProjectRef, classes: Sequence[str]) -> None:
        """Refuse a project whose labeling config is not one class choice per image over exactly ``classes``."""
        from label_studio_sdk.label_interface import LabelInterface

        where = f"Label Studio project {project.title!r} (id {project.id}) at {self.url}"
        fix = "use the labeling config `fmask export` writes (label_studio_config.xml), or another --project name"
        try:
            interface = LabelInterface(project.label_config)
            control = interface.get_control(LS_CONTROL)
        except Exception as exc:  # the parser raises several kinds for configs it cannot use
            raise FmaskError(f"{where} has no Choices named {LS_CONTROL!r} in its labeling config "
                             f"({type(exc).__name__}); {fix}") from None
        if control.tag != "Choices" or LS_OBJECT not in (control.to_name or []):
            raise FmaskError(f"{where}: {LS_CONTROL!r} in its labeling config is a {control.tag} over "
                             f"{control.to_name}, not Choices over {LS_OBJECT!r}; {fix}")
        labels = list(control.labels or [])
        if sorted(labels) != sorted(classes):
            raise FmaskError(f"{where} labels the classes {labels}, but the pool has {list(classes)}; {fix}")

    def create_project(self, title: str, label_config: str) -> ProjectRef:
        with self.errors(f"creating project {title!r}"):
            created = self.client.projects.create(title=title, label_config=label_config)
        return ProjectRef(created.id, title, label_config)

    def tasks(self, project: ProjectRef, *, annotations: bool) -> list[dict]:
        """Every task of the project as a dict (with annotations and predictions when ``annotations``)."""
        with self.errors(f"listing the tasks of project {project.title!r}"):
            pages = self.client.tasks.list(project=project.id, fields="all" if annotations else "task_only",
                                           page_size=100)
            return [task.model_dump() if hasattr(task, "model_dump") else dict(task) for task in pages]

    def upload_images(self, project: ProjectRef, files: Sequence[tuple[str, bytes]],
                      progress: Optional[ProgressFn] = None) -> list[str]:
        """Upload PNGs into the project's storage (no tasks made from them); their URLs, in the order given."""
        base_path = urlparse(self.url).path.rstrip("/")  # a server behind a path prefix serves its uploads there
        urls: list[str] = []
        for start in range(0, len(files), UPLOADS_PER_REQUEST):
            chunk = files[start:start + UPLOADS_PER_REQUEST]
            with self.errors(f"uploading images to project {project.title!r}"):
                # The client has no call for a multipart upload; its own authenticated HTTP layer sends one.
                reply = self.client._client_wrapper.httpx_client.request(
                    f"api/projects/{project.id}/import", method="POST", params={"commit_to_project": "false"},
                    files={f"file{start + i}": (name, data, "image/png") for i, (name, data) in enumerate(chunk)})
                if reply.status_code >= 300:
                    from label_studio_sdk.core.api_error import ApiError

                    raise ApiError(status_code=reply.status_code, body=_json_or_text(reply))
                upload_ids = [int(i) for i in reply.json()["file_upload_ids"]]
                uploads = {u.id: u.file for u in self.client.files.list(id=project.id, ids=json.dumps(upload_ids))}
            if set(uploads) != set(upload_ids):
                raise FmaskError(f"Label Studio at {self.url} stored {len(uploads)} of {len(upload_ids)} uploaded "
                                 "images; check the server's disk and log, then export again")
            urls += [f"{base_path}/{UPLOAD_URL_PREFIX}{uploads[i]}" for i in upload_ids]
            if progress is not None:
                progress("uploading images", len(urls), len(files))
        return urls

    def import_tasks(self, project: ProjectRef, tasks: list[dict]) -> list[int]:
        """Add ``tasks`` (data and predictions) in one request; their new ids, in order."""
        with self.errors(f"adding tasks to project {project.title!r}"):
            reply = self.client.projects.import_tasks(id=project.id, request=tasks, return_task_ids=True)
        task_ids = list(reply.task_ids or [])
        if len(task_ids) != len(tasks):
            raise FmaskError(f"Label Studio at {self.url} made {len(task_ids)} of {len(tasks)} tasks in project "
                             f"{project.title!r}; check the server's log, then export again (made tasks are kept)")
        return task_ids


def _json_or_text(reply: Any) -> Any:
    try:
        return reply.json()
    except ValueError:
        return reply.text


@dataclass
class PushResult:
    url: str
    project: str
    project_id: int
    created: bool  # the project was made by this push
    task_ids: list[int]  # per sample, in selection order
    added: int  # tasks made by this push (the rest were there from an earlier push of the same query)


def _task_key(task: dict) -> Optional[tuple[int, str]]:
    data = task.get("data") or {}
    sample_id, query_sha256 = data.get("sample_id"), data.get("query_sha256")
    if isinstance(sample_id, int) and isinstance(query_sha256, str):
        return sample_id, query_sha256
    return None


def open_project(url: str, title: str, classes: Sequence[str]) -> tuple[LabelStudioConnection, Optional[ProjectRef]]:
    """Connect and find the project (None if missing), refusing one whose classes differ. Changes nothing."""
    connection = LabelStudioConnection(url)
    project = connection.find_project(title)
    if project is not None:
        connection.check_classes(project, classes)
    return connection, project


def push_batch(*, connection: LabelStudioConnection, project: Optional[ProjectRef], title: str, label_config: str,
               tasks: Sequence[dict], images: Sequence[tuple[str, bytes]],
               progress: Optional[ProgressFn] = None) -> PushResult:
    """Add the tasks (``data`` without ``image``, with ``sample_id`` and ``query_sha256``; predictions) that the
    project lacks, uploading their images (``images[i]`` is (file name, PNG bytes) of ``tasks[i]``) first."""
    created = project is None
    if project is None:
        project = connection.create_project(title, label_config)
    existing = {}
    for task in connection.tasks(project, annotations=False):
        key = _task_key(task)
        if key is not None:
            existing.setdefault(key, task["id"])
    missing = [i for i, task in enumerate(tasks) if _task_key(task) not in existing]
    if missing:
        urls = connection.upload_images(project, [images[i] for i in missing], progress)
        new_tasks = [{**tasks[i], "data": {**tasks[i]["data"], "image": url}} for i, url in zip(missing, urls)]
        for i, task_id in zip(missing, connection.import_tasks(project, new_tasks)):
            existing[_task_key(tasks[i])] = task_id
    return PushResult(connection.url, title, project.id, created, [existing[_task_key(t)] for t in tasks],
                      len(missing))


@dataclass
class PullResult:
    url: str
    project: str
    project_id: int
    answers: dict[int, int]  # sample id -> class index
    task_ids: dict[int, list[int]]  # sample id -> the tasks whose annotations answered it
    tasks_found: int  # tasks of the query in the project

    def fingerprint(self) -> dict:
        """What this pull read, for the labeled set's step key: a rerun with the same answers is skipped."""
        return {"label_studio": self.url, "project_id": self.project_id,
                "answers": {str(i): [self.answers[i], self.task_ids.get(i, [])] for i in sorted(self.answers)}}


def pull_answers(*, url: str, title: str, classes: list[str], query_sha256: str, allowed_ids: set[int],
                 query_name: str) -> PullResult:
    """The annotations of the tasks of one query (``data.query_sha256``) in the project titled ``title``."""
    connection = LabelStudioConnection(url)
    project = connection.find_project(title)
    if project is None:
        raise FmaskError(f"Label Studio at {connection.url} has no project titled {title!r}; push the batch first "
                         f"with `fmask export --query {query_name} --project {title!r}`, or check the title")
    connection.check_classes(project, classes)
    tasks = [t for t in connection.tasks(project, annotations=True)
             if (t.get("data") or {}).get("query_sha256") == query_sha256]
    if not tasks:
        raise FmaskError(f"Label Studio project {title!r} at {connection.url} holds no task of query {query_name}; "
                         f"push them with `fmask export --query {query_name} --project {title!r}`")
    answers, task_ids = label_studio_answers(tasks, classes, allowed_ids, f"Label Studio project {title!r}")
    if not answers:
        raise FmaskError(f"Label Studio project {title!r} at {connection.url} has no answer yet for the "
                         f"{len(tasks)} tasks of query {query_name}; label at least one image first")
    return PullResult(connection.url, title, project.id, answers, task_ids, len(tasks))
