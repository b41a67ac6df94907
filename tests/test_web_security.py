"""What issue 22 asked of the web app, against the real server (`rtprop web`, or `rtprop serve --http-port`)
on loopback, real SQLite, the real CLI and a real browser: sessions that end, login limits that count
first and lock per (user, address), a password rule, no open redirect, security headers, /health that
writes nothing, audited reads and logouts, failed-login names kept off the audit page, typed API input.

Jobs come from the real pipeline: synthetic phantom cases dropped in the inbox, held for review.
Another client machine is 127.0.0.2 / 127.0.0.3 (Linux routes 127/8 to loopback).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import yaml

from node_helpers import NodeProcess, free_port, wait_for
from pipeline_helpers import synthetic_case
from web_helpers import (Client, WebProcess, add_user, browser, have_playwright, rtprop, run_dropped_cases, token)

PASSWORDS = {"ada": "admin-pass-1", "rhea": "reviewer-pass-1", "vic": "viewer-pass-1", "lola": "locked-out-pass-1"}
ROLES = {"ada": "admin", "rhea": "reviewer", "vic": "viewer", "lola": "reviewer"}
PATIENT_ID = "SYN000"  # synthetic_case(seed=0)


def node_config(root: Path) -> dict:
    return {"storage": {"root": str(root), "fsync": False}, "node": {"series_quiet_period_s": 0},
            "pipeline": {"poll_interval_s": 0.1, "isolate_jobs": False},
            "review": {"before_send": True}, "dropin": {"stable_s": 0}}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from config.load import load_config, resolve_storage

    root = tmp_path_factory.mktemp("site")
    storage = root / "storage"
    cases = [root / "cases" / f"case{i}" for i in range(2)]
    for i, case in enumerate(cases):
        synthetic_case(case, seed=i)
    factory, _ = run_dropped_cases(resolve_storage(load_config(None, overrides=node_config(storage))), cases)
    factory.kw["bind"].dispose()
    for name, password in PASSWORDS.items():
        add_user(storage, name, ROLES[name], password)
    config = root / "web.yaml"
    config.write_text(yaml.safe_dump({**node_config(storage), "web": {"login_max_failures": 5,
                                                                      "login_lockout_s": 60}}))
    with WebProcess(root, storage, config) as web:
        yield {"web": web, "storage": storage, "db": storage / "rtprop.sqlite", "config": config, "root": root}


def query(site, sql: str, args: tuple = ()) -> list[tuple]:
    with sqlite3.connect(f"file:{site['db']}?mode=ro", uri=True, timeout=30) as con:
        return con.execute(sql, args).fetchall()


def logged_in(site, name: str, source: str | None = None) -> Client:
    client = Client(site["web"].url, source=source)
    assert client.login(name, PASSWORDS[name]) == 303
    return client


def first_job(site) -> int:
    return query(site, "SELECT min(id) FROM jobs")[0][0]


# ---------------------------------------------------------------- 3. sessions end on the server
def test_a_cookie_copied_before_logout_opens_nothing_afterwards(site):
    """Fails on the code before issue 22: the copied cookie still opened the review page for 12 h."""
    job = first_job(site)
    vic = logged_in(site, "vic")
    cookie = next(c.value for c in vic.jar if c.name == "rtprop_session")
    assert vic.get(f"/jobs/{job}/review")[0] == 200
    status, _, _ = vic.post("/logout", form={"csrf_token": vic.csrf("/jobs")})
    assert status == 302
    thief = Client(site["web"].url)
    thief.opener.addheaders = [("Cookie", f"rtprop_session={cookie}")]
    status, headers, body = thief.get(f"/jobs/{job}/review")
    assert status == 302 and headers["location"].startswith("/login") and b"PHANTOM" not in body
    assert thief.get(f"/api/v1/jobs/{job}")[0] == 401


def test_users_disable_and_a_new_password_end_open_sessions(site):
    """Fails on the code before issue 22: there was no `rtprop users password`, and a password change (none
    could be made) would not have ended anything."""
    add_user(site["storage"], "dora", "viewer", "ochre-lantern-77")
    add_user(site["storage"], "gus", "viewer", "quiet-harbour-12")
    dora, gus = Client(site["web"].url), Client(site["web"].url)
    assert dora.login("dora", "ochre-lantern-77") == 303 and gus.login("gus", "quiet-harbour-12") == 303
    out = rtprop("users", "password", "dora", "--password-stdin", "--storage", str(site["storage"]),
                 stdin="teal-compass-of-9\n").stdout
    assert "1 session(s) ended" in out
    assert dora.get("/jobs")[0] == 302
    assert Client(site["web"].url).login("dora", "ochre-lantern-77") == 401
    assert Client(site["web"].url).login("dora", "teal-compass-of-9") == 303
    rtprop("users", "disable", "gus", "--storage", str(site["storage"]))
    assert gus.get("/jobs")[0] == 302
    ended = dict(query(site, "SELECT end_reason, count(*) FROM web_sessions WHERE end_reason != '' GROUP BY 1"))
    assert ended.get("password", 0) >= 1 and ended.get("disabled", 0) >= 1


def test_an_unused_session_ends_after_the_idle_timeout_but_not_while_in_use(site, tmp_path):
    """Fails on the code before issue 22 (no web.session_idle_timeout_s: a session lasted 12 h unused)."""
    config = tmp_path / "idle.yaml"
    config.write_text(yaml.safe_dump({**node_config(site["storage"]), "web": {"session_idle_timeout_s": 4}}))
    with WebProcess(tmp_path, site["storage"], config) as web:
        busy, idle = Client(web.url), Client(web.url)
        assert busy.login("vic", PASSWORDS["vic"]) == 303 and idle.login("vic", PASSWORDS["vic"]) == 303
        for _ in range(6):  # 6 s of use, a request a second
            assert busy.get("/jobs")[0] == 200
            time.sleep(1)
        assert idle.get("/jobs", headers={"HX-Request": "true"})[0] == 401  # a page's own refresh is not use
        assert busy.get("/jobs")[0] == 200
        assert idle.get("/jobs")[0] == 302


# ---------------------------------------------------------------- 4 + 11. login limits
def test_thirty_wrong_passwords_sent_at_once_hit_the_limit(site):
    """Fails on the code before issue 22: all 30 were checked (30 x 401, no 429)."""
    clients = [Client(site["web"].url, source="127.0.0.4") for _ in range(30)]
    forms = [{"username": "rhea", "password": f"wrong-password-{i}", "csrf_token": c.csrf()}
             for i, c in enumerate(clients)]
    barrier = threading.Barrier(30)
    statuses: list[int] = []

    def attempt(client: Client, form: dict) -> None:
        barrier.wait()
        statuses.append(client.post("/login", form=form)[0])

    threads = [threading.Thread(target=attempt, args=pair) for pair in zip(clients, forms)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(statuses) == [401] * 5 + [429] * 25, statuses
    assert Client(site["web"].url, source="127.0.0.4").login("rhea", PASSWORDS["rhea"]) == 429


def test_a_user_locked_out_from_one_address_still_logs_in_from_another_and_an_admin_clears_the_lock(site):
    """Fails on the code before issue 22: five wrong tries from anywhere locked the user out everywhere, and no
    admin could see or clear the lock."""
    attacker = Client(site["web"].url, source="127.0.0.5")
    for i in range(5):
        assert attacker.post("/login", form={"username": "lola", "password": f"guess-number-{i}",
                                             "csrf_token": attacker.csrf()})[0] == 401
    assert attacker.login("lola", PASSWORDS["lola"]) == 429
    assert Client(site["web"].url, source="127.0.0.6").login("lola", PASSWORDS["lola"]) == 303

    admin = logged_in(site, "ada", source="127.0.0.7")
    status, _, page = admin.get("/logins")
    assert status == 200 and b"127.0.0.5" in page and b"lola" in page
    assert logged_in(site, "vic", source="127.0.0.7").get("/logins")[0] == 403  # admins only
    status, headers, _ = admin.post("/logins/clear", form={"csrf_token": admin.csrf("/logins"),
                                                           "address": "127.0.0.5", "user": "lola"})
    assert status == 303 and "cleared" in headers["location"]
    assert b"127.0.0.5" not in admin.get("/logins")[2]
    assert Client(site["web"].url, source="127.0.0.5").login("lola", PASSWORDS["lola"]) == 303
    (details,) = query(site, "SELECT details FROM audit WHERE event='web.login_lock_cleared'")[-1]
    assert json.loads(details).items() >= {"user": "ada", "locked_address": "127.0.0.5", "locked_user": "lola"}.items()


@pytest.mark.parametrize("password", ["12345678", "password", "Password2024!", "P@ssw0rd1234", "qwertyuiop12",
                                      "abcabcabcabc", "zora-is-my-name"])
def test_short_and_common_passwords_are_refused(tmp_path, password):
    """Fails on the code before issue 22 for 12345678 and password (8 characters were enough)."""
    r = rtprop("users", "add", "zora", "--role", "viewer", "--password-stdin", "--storage", str(tmp_path),
               stdin=password + "\n", check=False)
    assert r.returncode == 2 and "password" in r.stderr, r.stderr


def test_a_long_phrase_of_ones_own_is_accepted(tmp_path):
    rtprop("users", "add", "zora", "--role", "viewer", "--password-stdin", "--storage", str(tmp_path),
           stdin="plan the second arc at 6 MV\n")


# ---------------------------------------------------------------- 6. no open redirect
@pytest.mark.parametrize("target", ["///evil.example/phish", "//evil.example", "/\\evil.example", "/\t/evil.example",
                                    "https://evil.example/", "javascript:alert(1)", "evil.example"])
def test_login_redirects_only_to_paths_of_this_site(site, target):
    """Fails on the code before issue 22 for ///evil.example/phish and /\\evil.example."""
    client = Client(site["web"].url, source="127.0.0.8")
    status, headers, _ = client.post("/login", form={"username": "vic", "password": PASSWORDS["vic"],
                                                     "csrf_token": client.csrf(), "next": target})
    assert status == 303 and headers["location"] == "/", headers["location"]


def test_login_keeps_a_same_site_next_path(site):
    client = Client(site["web"].url, source="127.0.0.8")
    job = first_job(site)
    status, headers, _ = client.post("/login", form={"username": "vic", "password": PASSWORDS["vic"],
                                                     "csrf_token": client.csrf(), "next": f"/jobs/{job}?z=3"})
    assert status == 303 and headers["location"] == f"/jobs/{job}?z=3"


# ---------------------------------------------------------------- 7. headers
def test_every_answer_carries_the_security_headers_and_patient_data_is_not_cached(site):
    """Fails on the code before issue 22: none of these headers; slice PNGs were max-age=300."""
    job = first_job(site)
    vic = logged_in(site, "vic")
    answers = {path: vic.get(path) for path in ("/login", "/", f"/jobs/{job}/review", f"/jobs/{job}/slices/3.png",
                                                 f"/api/v1/jobs/{job}", "/health", "/static/style.css")}
    answers["anonymous"] = Client(site["web"].url).get(f"/jobs/{job}/review")
    for path, (status, headers, _) in answers.items():
        h = {k.lower(): v for k, v in headers.items()}
        csp = h.get("content-security-policy", "")
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "style-src 'self'" in csp, path
        assert "unsafe-inline" not in csp and h.get("x-content-type-options") == "nosniff", path
        assert h.get("referrer-policy") == "no-referrer" and h.get("x-frame-options") == "DENY", path
        if path != "/static/style.css":
            assert h.get("cache-control") == "no-store", (path, h.get("cache-control"))


@pytest.mark.skipif(not have_playwright(), reason="playwright or DCMTK missing")
def test_the_pages_work_under_the_content_security_policy_in_a_browser(site):
    """The inline script and styles moved to /static: the browser reports no CSP violation, the review page
    still draws its colour swatches and lays out its slider and image, the batch run picker still submits itself."""
    job = first_job(site)
    pw, chromium = browser()
    try:
        page = chromium.new_page()
        problems: list[str] = []
        page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
        page.goto(site["web"].url + f"/login?next=/jobs/{job}/review")
        page.fill("input[name=username]", "vic")
        page.fill("input[name=password]", PASSWORDS["vic"])
        page.click("button[type=submit]")
        page.wait_for_url(f"**/jobs/{job}/review")
        wait_for(lambda: page.evaluate("document.getElementById('slice-img').naturalWidth > 0"), 20,
                 what="the slice image")  # not wait_for_function: Playwright polls it with eval, which CSP forbids
        swatch = page.eval_on_selector("section.roi .sw rect", "e => getComputedStyle(e).fill")
        width = page.eval_on_selector("#slider", "e => e.getBoundingClientRect().width")
        image_width = page.eval_on_selector("#slice-img", "e => e.getBoundingClientRect().width")
        page.keyboard.press("ArrowUp")
        page.wait_for_timeout(300)
        for path in ("/", "/jobs", "/batch", "/audit"):
            page.goto(site["web"].url + path)
        page.goto(site["web"].url + "/")
        page.wait_for_timeout(6000)  # one htmx refresh of the dashboard panel
    finally:
        chromium.close()
        pw.stop()
    assert not problems, problems
    assert swatch not in ("", "none", "rgba(0, 0, 0, 0)")  # the ROI's colour swatch is drawn
    assert width > 200 and image_width > 200  # laid out by the stylesheet, no inline style needed


# ---------------------------------------------------------------- 9 + 10. the audit
def test_reads_of_patient_data_and_logouts_are_audited(site):
    """Fails on the code before issue 22: no audit row for any of these."""
    job = first_job(site)
    before = query(site, "SELECT max(id) FROM audit")[0][0]
    rhea = logged_in(site, "rhea", source="127.0.0.9")
    assert rhea.get(f"/jobs/{job}/review")[0] == 200
    for z in range(5):
        assert rhea.get(f"/jobs/{job}/slices/{z}.png")[0] == 200
    api = Client(site["web"].url)
    auth = {"Authorization": f"Bearer {token(site['storage'], 'vic')}"}
    assert api.get(f"/api/v1/jobs/{job}", headers=auth)[0] == 200
    rhea.post("/logout", form={"csrf_token": rhea.csrf("/jobs")})
    rows = [(e, j, json.loads(d), p) for e, j, d, p in query(
        site, "SELECT event, job_id, details, patient_id_hash FROM audit WHERE id > ? AND event IN "
              "('web.read', 'web.logout') ORDER BY id", (before,))]
    reads = [(d["user"], d["what"], j) for e, j, d, _ in rows if e == "web.read"]
    assert reads == [("rhea", "review_page", job), ("rhea", "slice_images", job), ("vic", "api_job", job)]
    (job_hash,) = query(site, "SELECT patient_id_hash FROM jobs WHERE id=?", (job,))[0]
    assert job_hash and all(p == job_hash for e, _, _, p in rows if e == "web.read")
    assert [(d["user"], d["client"]) for e, _, d, _ in rows if e == "web.logout"] == [("rhea", "127.0.0.9")]


def test_a_password_typed_into_the_name_field_is_never_on_the_audit_page(site):
    """Fails on the code before issue 22: the typed name was stored and shown to every viewer."""
    typed = "Secret-Typed-In-Name-Field"
    client = Client(site["web"].url, source="127.0.0.10")
    assert client.post("/login", form={"username": typed, "password": "x" * 12, "csrf_token": client.csrf()})[0] == 401
    assert client.post("/login", form={"username": "vic", "password": "not-vics-pass",
                                       "csrf_token": client.csrf()})[0] == 401
    page = logged_in(site, "vic").get("/audit?event=web.login_failed")[2]
    assert typed.encode() not in page and b"vic" in page
    blob = json.dumps(query(site, "SELECT * FROM audit"))
    assert typed not in blob and typed.lower() not in blob


# ---------------------------------------------------------------- 13. typed API input
def test_the_api_refuses_true_where_a_rating_number_is_expected(site):
    """Fails on the code before issue 22: `"rating": true` was taken as 1 and the decision recorded."""
    job = query(site, "SELECT max(id) FROM jobs")[0][0]
    auth = {"Authorization": f"Bearer {token(site['storage'], 'rhea')}"}
    status, _, body = Client(site["web"].url).post(f"/api/v1/jobs/{job}/review", headers=auth,
                                                   body={"roi": None, "decision": "accept", "rating": True})
    assert status == 400 and b"rating" in body
    assert query(site, "SELECT count(*) FROM reviews WHERE job_id=?", (job,))[0][0] == 0
    assert query(site, "SELECT state FROM jobs WHERE id=?", (job,)) == [("awaiting_review",)]


# ---------------------------------------------------------------- 5. /health reads only
def test_health_writes_nothing_and_opens_no_association(tmp_path):
    """Fails on the code before issue 22: each call wrote a heartbeat row and C-ECHOed the SCP as RTPROP-HEALTH,
    which the allow-list refused and the audit recorded (100 calls: 100 audit rows)."""
    http = free_port()
    node = NodeProcess(tmp_path / "node", config={"storage": {"fsync": False}, "web": {"heartbeat_interval_s": 1}},
                       allow=["TPS"])
    node.args += ["--workers", "0", "--http-port", str(http)]
    with node:
        client = Client(f"http://127.0.0.1:{http}")
        wait_for(lambda: client.get("/health")[0] in (200, 503), 30, what="the web app")
        audit_before = node.query("SELECT count(*) FROM audit")[0][0]
        started = time.monotonic()
        answers = [client.get("/health") for _ in range(100)]
        took = time.monotonic() - started
        audit_after = node.query("SELECT count(*) FROM audit")[0][0]
        kinds = {k for (k,) in node.query("SELECT kind FROM heartbeats")}
        log = node.log()
    body = json.loads(answers[-1][2])
    assert audit_after == audit_before, node.query("SELECT event, details FROM audit ORDER BY id DESC LIMIT 5")
    assert kinds == {"node"} and "RTPROP-HEALTH" not in log
    assert body["checks"]["scp"]["ok"] and body["checks"]["database"]["ok"]
    print(f"100 /health calls: {took:.2f} s")


# ---------------------------------------------------------------- 8. keyed patient pseudonym
def test_the_patient_id_is_stored_as_a_keyed_hash_with_the_site_key_kept_outside_the_database(site):
    """Fails on the code before issue 22: an unsalted SHA-256 (a 7-digit MRN is found by trying them all)."""
    key_file = site["db"].with_name(site["db"].name + ".key")
    key = key_file.read_bytes()
    (stored,) = query(site, "SELECT patient_id_hash FROM jobs WHERE id=?", (first_job(site),))[0]
    assert stored == hmac.new(key, PATIENT_ID.encode(), hashlib.sha256).hexdigest()
    assert stored != hashlib.sha256(PATIENT_ID.encode()).hexdigest()
    assert key_file.stat().st_mode & 0o777 == 0o600 and len(key) == 32
    assert key.hex() not in json.dumps(query(site, "SELECT * FROM site_settings"))
    out = rtprop("audit", "export", "--storage", str(site["storage"]), "--patient-id", PATIENT_ID).stdout
    assert out.count("\n") > 3 and all(json.loads(line)["patient_id_hash"] == stored for line in out.splitlines())
