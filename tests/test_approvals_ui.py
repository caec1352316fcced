"""The approvals page (/ui/approvals) in headless Chromium, against the gateway on real uvicorn.

Chromium is Debian's (`apt-get install chromium`), driven by Playwright with
`executable_path`; `playwright install` is never run.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.envelopes import mint_envelope
from gateway.keys import generate_dev_keys, load_private_key
from tests.conftest import REPO, gateway_config, role_token
from tests.servers import free_port, run_server

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# The screenshots in docs/ are refreshed only on request, so a test run leaves the tree clean:
#   AGW_UPDATE_SCREENSHOTS=1 pytest tests/test_approvals_ui.py
SCREENSHOTS_ENV = "AGW_UPDATE_SCREENSHOTS"
TRANSFER = {
    "from_account": "acme-operating",
    "to_account": "supplier-4711",
    "amount": 2500,
    "currency": "EUR",
}
HOSTILE = '</pre><script>window.__pwned = 1; alert("xss")</script><img src=x onerror="window.__pwned = 2">'


class Site:
    """The gateway on loopback plus the helpers to put approvals in front of it."""

    def __init__(self, url: str, keys_dir: Path, upstream: tuple[str, Any]) -> None:
        self.url, self.keys_dir = url, keys_dir
        self.upstream_url, self.effects = upstream
        self.http = httpx.Client(base_url=url, timeout=30)

    def headers(self, role: str, task: str, key: str | None = None) -> dict[str, str]:
        envelope = mint_envelope(
            load_private_key(self.keys_dir / "agents" / "planner.key.pem"),
            iss="planner",
            sub=f"{role}-1",
            task_id=task,
            audience="agent-gateway",
            deadline_seconds=3600,
        )
        headers = {"Authorization": f"Bearer {role_token(self.keys_dir, role)}", "Agent-Handoff": envelope}
        if key:
            headers["Idempotency-Key"] = f'"{key}"'
        return headers

    def pending(self, arguments: dict[str, Any]) -> str:
        task = f"task-{uuid.uuid4().hex[:10]}"
        proposal = {"task_id": task, "tool": "payments.transfer", "arguments": arguments}
        proposed = self.http.post("/intents", json=proposal, headers=self.headers("planner", task))
        assert proposed.status_code == 201, proposed.text
        intent_id = proposed.json()["intent_id"]
        verdict = {"verdict": "accept", "reason": "matches the invoice"}
        verified = self.http.post(
            f"/intents/{intent_id}/verify", json=verdict, headers=self.headers("verifier", task)
        )
        assert verified.status_code == 200, verified.text
        committed = self.http.post(
            f"/intents/{intent_id}/commit", headers=self.headers("committer", task, key=task)
        )
        assert committed.status_code == 202, committed.text
        return str(committed.json()["approval_id"])

    def approval(self, approval_id: str) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {role_token(self.keys_dir, 'approver', 'auditor')}"}
        return self.http.get(f"/approvals/{approval_id}", headers=headers).json()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, upstream: tuple[str, Any]) -> Iterator[Site]:
    from gateway.app import create_app

    tmp = tmp_path_factory.mktemp("ui")
    keys_dir = tmp / "keys"
    generate_dev_keys(keys_dir)
    config = gateway_config(tmp, f"sqlite+aiosqlite:///{tmp}/gateway.db", upstream[0], keys_dir=keys_dir)
    with run_server(create_app(config)) as url:
        yield Site(url, keys_dir, upstream)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        pytest.fail("Debian's chromium is required: apt-get install -y chromium chromium-driver")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1100, "height": 900}, device_scale_factor=1)
    page = context.new_page()
    yield page
    context.close()


def sign_in(page: Any, site: Site, sub: str = "alice", path: str = "/ui/approvals") -> None:
    page.goto(site.url + path)
    assert page.locator("h1").inner_text() == "Sign in to approve"
    page.fill("#token", role_token(site.keys_dir, "approver", sub))
    page.click("button[type=submit]")
    page.wait_for_load_state()


def test_an_approver_signs_in_and_approves_a_pending_commit(site: Site, page: Any, tmp_path: Path) -> None:
    shots = REPO / "docs" if os.environ.get(SCREENSHOTS_ENV) == "1" else tmp_path
    site.effects.reset()
    approval_id = site.pending(TRANSFER)
    sign_in(page, site)

    cookies = {cookie["name"]: cookie for cookie in page.context.cookies()}
    session = cookies["agw_session"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    card = page.locator(f"a[href='/ui/approvals/{approval_id}']")
    assert card.count() == 1
    assert "payments.transfer" in page.locator("main").inner_text()
    page.screenshot(path=str(shots / "approvals-list.png"), full_page=True)

    card.click()
    page.wait_for_url(f"**/ui/approvals/{approval_id}")
    main = page.locator("main").inner_text().lower()  # headings are upper-cased by CSS
    for expected in ("supplier-4711", "is high risk", "planner-1 (planner)", "verifier-1 (verifier)"):
        assert expected in main, main
    assert "committer-1 (committer)" in main and "causal chain" in main and "approval requested" in main
    page.fill("#reason", "Invoice 2024-117 checked against the contract.")
    page.screenshot(path=str(shots / "approvals-detail.png"), full_page=True)

    response = page.request.get(site.url + f"/ui/approvals/{approval_id}")
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "script-src" not in csp

    page.click("button[value=approve]")
    page.wait_for_url(f"**/ui/approvals/{approval_id}?done=approve")
    assert "Your approval was recorded." in page.locator("main").inner_text()
    assert page.locator(".heading .badge").inner_text() == "approved"
    assert site.effects.calls["payments.transfer"] == 1
    assert site.approval(approval_id)["intent_status"] == "committed"
    assert site.approval(approval_id)["decisions"][0]["approver"] == "alice"


def test_agent_supplied_markup_renders_inert(site: Site, page: Any) -> None:
    site.effects.reset()
    approval_id = site.pending({**TRANSFER, "memo": HOSTILE, "to_account": "<b>bold</b>"})
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    sign_in(page, site, path=f"/ui/approvals/{approval_id}")
    page.wait_for_url(f"**/ui/approvals/{approval_id}")
    for path in (f"/ui/approvals/{approval_id}", "/ui/approvals"):
        page.goto(site.url + path)
        page.wait_for_timeout(200)
        assert page.evaluate("window.__pwned") is None
        assert page.locator("script").count() == 0 and page.locator("img").count() == 0
        assert page.locator("b").count() == 0
        assert "<script>" in page.locator("pre.args").first.inner_text()
    assert dialogs == []
    assert site.effects.calls["payments.transfer"] == 0


def test_a_cross_site_post_is_refused(site: Site, page: Any) -> None:
    site.effects.reset()
    approval_id = site.pending({**TRANSFER, "amount": 99_999})
    sign_in(page, site)
    # Another site (a different host name: localhost is cross-site to 127.0.0.1) auto-submits a form.
    target = f"{site.url}/ui/approvals/{approval_id}/decision"
    attacker = (
        f'<form id="f" method="post" action="{target}"><input name="decision" value="approve">'
        '<input name="reason" value="sure"><input name="csrf" value="guess"></form>'
        "<script>document.getElementById('f').submit()</script>"
    )
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse
    from starlette.routing import Route

    async def evil(request: Any) -> HTMLResponse:
        return HTMLResponse(attacker)

    port = free_port()
    with run_server(Starlette(routes=[Route("/", evil)]), port=port):
        with page.expect_navigation(url=target):
            page.goto(f"http://localhost:{port}/")
        assert "Cross-site request refused" in page.locator("main").inner_text()
    assert site.approval(approval_id)["status"] == "pending"
    assert site.effects.calls["payments.transfer"] == 0

    # Without a browser's help: a foreign Origin, or a missing form token, is refused too.
    cookie = next(c for c in page.context.cookies() if c["name"] == "agw_session")
    jar = {"agw_session": cookie["value"]}
    form = {"decision": "approve", "reason": "x", "csrf": "guess"}
    with httpx.Client(base_url=site.url, cookies=jar) as raw:
        foreign = raw.post(
            f"/ui/approvals/{approval_id}/decision", data=form, headers={"Origin": "https://evil.test"}
        )
        assert foreign.status_code == 403 and "Cross-site request refused" in foreign.text
        tokenless = raw.post(f"/ui/approvals/{approval_id}/decision", data=form)
        assert tokenless.status_code == 403 and "The form expired" in tokenless.text
    assert site.approval(approval_id)["status"] == "pending"
