"""Who may do what in the web app, against the real server (`rtprop web` on loopback) and real SQLite.

Jobs come from the real pipeline: a synthetic phantom case dropped in the drop-in inbox, stored,
propagated by a worker, and held in `awaiting_review` (review.before_send on).
"""
from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest
import yaml

from pipeline_helpers import synthetic_case
from web_helpers import Client, WebProcess, add_user, rtprop, run_dropped_cases, token

PASSWORDS = {"ada": "admin-pass-1", "rhea": "reviewer-pass-1", "vic": "viewer-pass-1"}
ROLES = {"ada": "admin", "rhea": "reviewer", "vic": "viewer"}


def node_config(root: Path) -> dict:
    return {"storage": {"root": str(root), "fsync": False},
            "node": {"series_quiet_period_s": 0},
            "pipeline": {"poll_interval_s": 0.1, "isolate_jobs": False},
            "review": {"before_send": True}, "dropin": {"stable_s": 0}}


def make_jobs(root: Path, cases: list[Path]) -> None:
    """Drop `cases` in the inbox, store them, run the workers until every job rests (awaiting_review)."""
    from config.load import load_config, resolve_storage

    factory, _ = run_dropped_cases(resolve_storage(load_config(None, overrides=node_config(root))), cases)
    factory.kw["bind"].dispose()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    storage = root / "storage"
    cases = [root / "cases" / f"case{i}" for i in range(3)]
    for i, case in enumerate(cases):
        synthetic_case(case, seed=i)
    make_jobs(storage, cases)
    for name, password in PASSWORDS.items():
        add_user(storage, name, ROLES[name], password)
    config = root / "web.yaml"
    config.write_text(yaml.safe_dump({**node_config(storage), "web": {"login_max_failures": 5,
                                                                      "login_lockout_s": 30}}))
    with WebProcess(root, storage, config) as web:
        yield {"web": web, "storage": storage, "db": storage / "rtprop.sqlite"}


def query(site, sql: str, args: tuple = ()) -> list[tuple]:
    with sqlite3.connect(f"file:{site['db']}?mode=ro", uri=True, timeout=30) as con:
        return con.execute(sql, args).fetchall()


def logged_in(site, name: str) -> Client:
    client = Client(site["web"].url)
    assert client.login(name, PASSWORDS[name]) == 303
    return client


def concrete(path: str) -> str:
    """A request path for a route pattern: {job_id:int} -> 1, {z:int} -> 0, {run} -> x."""
    return re.sub(r"\{[^}:]+:int\}", "1", re.sub(r"\{z:int\}", "0", re.sub(r"\{[^}:]+\}", "x", path)))


def test_jobs_wait_for_review(site):
    assert query(site, "SELECT state FROM jobs") == [("awaiting_review",)] * 3


def test_every_route_but_login_health_metrics_and_static_needs_login(site):
    from starlette.routing import Mount, Route

    from web.app import PUBLIC, routes

    anon = Client(site["web"].url)
    walked = []
    for r in routes():
        if isinstance(r, Mount):
            assert r.path in PUBLIC, f"mount {r.path} is not behind login"
            continue
        assert isinstance(r, Route)
        if r.path in PUBLIC:
            continue
        for method in sorted(set(r.methods) - {"HEAD"}):
            status, headers, _ = anon.request(method, concrete(r.path), form={} if method == "POST" else None)
            walked.append((method, r.path, status))
            if r.path.startswith("/api/"):
                assert status == 401, (method, r.path, status)
            else:
                assert status in (401, 302), (method, r.path, status)
                if status == 302:
                    assert headers["location"].startswith("/login"), headers
    assert PUBLIC == {"/login", "/health", "/metrics", "/static"}
    assert len(walked) >= 18 and {p for _, p, _ in walked} >= {"/", "/jobs", "/api/v1/jobs",
                                                                "/jobs/{job_id:int}/review", "/audit"}
    assert anon.get("/health")[0] in (200, 503) and anon.get("/metrics")[0] == 200


def test_session_cookie_is_signed_httponly_samesite(site):
    client = Client(site["web"].url)
    client.csrf()
    status, headers, _ = client.post("/login", form={"username": "vic", "password": PASSWORDS["vic"],
                                                     "csrf_token": client.csrf(), "next": "/"})
    assert status == 303
    cookie = headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    tampered = Client(site["web"].url)
    value = next(c.value for c in client.jar)
    tampered.opener.addheaders = [("Cookie", f"rtprop_session={value[:-4]}AAAA")]
    assert tampered.get("/jobs")[0] == 302


def test_post_with_a_valid_session_but_no_csrf_token_is_refused(site):
    admin = logged_in(site, "ada")
    job_id = query(site, "SELECT min(id) FROM jobs")[0][0]
    status, _, body = admin.post(f"/jobs/{job_id}/cancel", form={})
    assert status == 403 and b"CSRF" in body
    status, _, _ = admin.post(f"/jobs/{job_id}/cancel", form={"csrf_token": "forged"})
    assert status == 403
    status, _, _ = admin.post(f"/api/v1/jobs/{job_id}/review", body={"roi": None, "decision": "reject"})
    assert status == 403  # the API with the session cookie needs X-CSRF-Token too
    assert query(site, "SELECT state FROM jobs WHERE id=?", (job_id,)) == [("awaiting_review",)]
    assert query(site, "SELECT count(*) FROM reviews")[0][0] == 0


def test_viewer_cannot_accept_reviewer_can_and_accept_sends_once(site):
    job_id = query(site, "SELECT min(id) FROM jobs")[0][0]
    viewer = logged_in(site, "vic")
    status, _, _ = viewer.post(f"/jobs/{job_id}/review", form={"csrf_token": viewer.csrf("/jobs"), "roi": "",
                                                               "decision": "accept"})
    assert status == 403
    vic_token = token(site["storage"], "vic")
    status, _, body = Client(site["web"].url).post(f"/api/v1/jobs/{job_id}/review", body={"decision": "accept"},
                                                  headers={"Authorization": f"Bearer {vic_token}"})
    assert status == 403
    assert query(site, "SELECT state FROM jobs WHERE id=?", (job_id,)) == [("awaiting_review",)]

    api = Client(site["web"].url)
    auth = {"Authorization": f"Bearer {token(site['storage'], 'rhea')}"}
    status, _, body = api.get("/api/v1/jobs?state=awaiting_review", headers=auth)
    assert status == 200 and job_id in [j["id"] for j in json.loads(body)["jobs"]]
    status, _, body = api.post(f"/api/v1/jobs/{job_id}/review", headers=auth,
                               body={"roi": None, "decision": "accept", "rating": 1, "comment": "fine"})
    assert status == 200, body
    assert json.loads(body)["state"] == "sent"  # a drop-in case: delivered to the drop-in outbox
    status, _, body = api.post(f"/api/v1/jobs/{job_id}/review", headers=auth, body={"decision": "reject"})
    assert status == 409 and b"final" in body  # a decision is final
    detail = json.loads(api.get(f"/api/v1/jobs/{job_id}", headers=auth)[2])
    assert detail["state"] == "sent" and detail["reviews"][0]["user"] == "rhea"
    outbox = list((site["storage"] / "dropin-outbox").glob("*.dcm"))
    assert len(outbox) == 1
    users = [json.loads(d).get("user") for (d,) in query(
        site, "SELECT details FROM audit WHERE job_id=? AND event IN ('job.review','job.accepted')", (job_id,))]
    assert users == ["rhea", "rhea"]


def test_admin_cancels_with_csrf_and_the_audit_names_them(site):
    admin = logged_in(site, "ada")
    job_id = query(site, "SELECT max(id) FROM jobs")[0][0]
    status, headers, _ = admin.post(f"/jobs/{job_id}/cancel", form={"csrf_token": admin.csrf(f"/jobs/{job_id}")})
    assert status == 303 and "cancel" in headers["location"]
    assert query(site, "SELECT state FROM jobs WHERE id=?", (job_id,)) == [("cancelled",)]
    (details,) = query(site, "SELECT details FROM audit WHERE event='job.cancelled' AND job_id=?", (job_id,))[0]
    assert json.loads(details)["user"] == "ada"
    reviewer = logged_in(site, "rhea")  # a reviewer is no admin
    status, _, _ = reviewer.post(f"/jobs/{job_id}/retry", form={"csrf_token": reviewer.csrf("/jobs")})
    assert status == 403


def test_patient_name_shown_only_after_login(site):
    job_id = query(site, "SELECT min(id) FROM jobs")[0][0]
    status, _, body = Client(site["web"].url).get(f"/jobs/{job_id}/review")
    assert status == 302 and b"PHANTOM" not in body
    status, _, body = logged_in(site, "vic").get(f"/jobs/{job_id}/review")
    assert status == 200 and b"PHANTOM^TEST" in body  # the phantom's PatientName
    blob = json.dumps(query(site, "SELECT * FROM audit"))
    assert "PHANTOM^TEST" not in blob


def test_users_cli_token_last_line_disable_and_weak_password(site, tmp_path):
    storage = tmp_path / "s"
    add_user(storage, "olga", "reviewer", "orchid-pass-123")
    out = rtprop("users", "token", "olga", "--storage", str(storage)).stdout
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"rtp_[A-Za-z0-9_-]{40,}", last) and last not in out.strip().splitlines()[0]
    with sqlite3.connect(storage / "rtprop.sqlite") as con:
        stored = con.execute("SELECT token_sha256 FROM api_tokens").fetchall()
        pw_hash = con.execute("SELECT password_hash FROM users WHERE name='olga'").fetchone()[0]
    assert stored and last not in json.dumps(stored)  # only the hash is kept
    assert pw_hash.startswith("$argon2id$") and "orchid-pass-123" not in pw_hash
    weak = rtprop("users", "add", "short", "--role", "viewer", "--password-stdin", "--storage", str(storage),
                  stdin="abc\n", check=False)
    assert weak.returncode == 2 and "too short" in weak.stderr
    bad_role = rtprop("users", "add", "x", "--role", "root", "--password-stdin", "--storage", str(storage),
                      stdin="long-enough-1\n", check=False)
    assert bad_role.returncode == 2
    # against the running server: a disabled user's token and login stop working
    add_user(site["storage"], "temp", "reviewer", "tulip-pass-123")
    temp_token = token(site["storage"], "temp")
    api = Client(site["web"].url)
    assert api.get("/api/v1/jobs", headers={"Authorization": f"Bearer {temp_token}"})[0] == 200
    session = logged_in_as(site, "temp", "tulip-pass-123")
    rtprop("users", "disable", "temp", "--storage", str(site["storage"]))
    assert api.get("/api/v1/jobs", headers={"Authorization": f"Bearer {temp_token}"})[0] == 401
    assert session.get("/jobs")[0] == 302
    events = [e for (e,) in query(site, "SELECT event FROM audit WHERE event LIKE 'user.%'")]
    assert {"user.added", "user.token", "user.disabled"} <= set(events)


def logged_in_as(site, name: str, password: str) -> Client:
    client = Client(site["web"].url)
    assert client.login(name, password) == 303
    return client


def test_five_bad_passwords_then_the_sixth_try_is_refused(site):
    limited = Client(site["web"].url)
    for _ in range(5):
        assert limited.post("/login", form={"username": "rhea", "password": "wrong-password",
                                            "csrf_token": limited.csrf()})[0] == 401
    status, headers, body = limited.post("/login", form={"username": "rhea", "password": PASSWORDS["rhea"],
                                                         "csrf_token": limited.csrf()})
    assert status == 429 and int(headers["retry-after"]) > 0 and b"Too many" in body
    failed = query(site, "SELECT count(*) FROM audit WHERE event='web.login_failed'")[0][0]
    assert failed >= 5


def test_every_page_renders_for_a_logged_in_viewer(site):
    viewer = logged_in(site, "vic")
    job_id = query(site, "SELECT min(id) FROM jobs")[0][0]
    for path in ("/", "/dashboard/panel", "/jobs", "/jobs?state=awaiting_review&roi=tum", "/jobs/table",
                 f"/jobs/{job_id}", f"/jobs/{job_id}/review", "/quarantine", "/batch",
                 "/audit?user=rhea", "/audit?verify=1", f"/jobs/{job_id}/slices/3.png?window=lung"):
        status, headers, body = viewer.get(path)
        assert status == 200, (path, status, body[:500])
    assert b"Chain intact" in viewer.get("/audit?verify=1")[2]
    assert b"job.review" in viewer.get("/audit?user=rhea")[2]
    assert viewer.get(f"/jobs/{job_id}/slices/999.png")[0] == 404


def test_the_job_list_shows_each_structure_s_confidence_and_names_the_file_check(site):
    # Issue 19: a contour's quality is its confidence (per structure, from the result's review.json); the
    # written file read back against its masks is a file check, not "self-check Dice" read as quality.
    client = logged_in(site, "vic")
    status, _, body = client.get("/jobs/table")
    text = body.decode()
    assert status == 200 and "file check Dice" in text and "self-check" not in text
    shown = re.findall(r'data-structure="Tumour"[^>]*>Tumour (\d\.\d\d)</span>', text)
    assert len(shown) == 3 and all(0.5 < float(c) <= 1.0 for c in shown), shown  # clear phantoms, boxed tight
    status, _, body = client.get("/api/v1/jobs")
    jobs = json.loads(body)["jobs"]
    assert all("file_check_dice" in j and "self_check_dice" not in j for j in jobs)
