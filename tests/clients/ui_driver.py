"""Drives the web view (/ui/) of a running `metalgraph serve --demo` in Debian's headless
Chromium through Playwright, from one browser for every check.

    ui_driver.py check --base https://127.0.0.1:PORT --token-file DATA/admin.token --ca DATA/tls/ca.pem
        Runs every check of tests/ui.rs in order and prints `ok: ...` per check; the
        first failure prints `FAIL: ...` (with the page's console errors) and exits 1.
    ui_driver.py screenshots --base https://127.0.0.1:PORT --token-file F [--ca F] --out docs/img
        Sets up a fleet in various states and writes ui-nodes.png and ui-workflow.png.

The browser is the system's (`--chromium`, default /usr/bin/chromium): Playwright
downloads nothing. Only the given base URL (loopback) is contacted.
"""
import argparse
import json
import os
import ssl
import re
import sys
import time
import urllib.error
import urllib.request

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import expect, sync_playwright

XSS_NAME = "<img src=x onerror=alert(1)>"
XSS_ERROR = "<img src=x onerror=alert(2)><script>alert(3)</script>"

NAP_GRAPH = {
    "injectableName": "UI.Check.Nap",
    "tasks": [
        {"label": "first", "taskName": "Task.Noop"},
        {"label": "nap", "taskName": "Task.Wait", "optionOverrides": {"duration": "8s"},
         "waitOn": {"first": "succeeded"}},
        {"label": "after", "taskName": "Task.Noop", "waitOn": {"nap": "succeeded"}},
        {"label": "cleanup", "taskName": "Task.Noop", "waitOn": {"nap": "finished"}},
    ],
}

QUICK_GRAPH = {
    "injectableName": "UI.Check.Quick",
    "tasks": [{"label": "quick", "taskName": "Task.Noop"}],
}

FAIL_GRAPH = {
    "injectableName": "UI.Check.Fail",
    "tasks": [
        {"label": "boom", "taskName": "Task.Fail", "optionOverrides": {"message": XSS_ERROR}},
    ],
}


class Failure(Exception):
    pass


class Api:
    """The management API, without any proxy: the tests talk to loopback only."""

    def __init__(self, base, token, ca):
        self.base = base.rstrip("/")
        self.token = token
        handlers = [urllib.request.ProxyHandler({})]
        if ca:
            handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=ca)))
        self.opener = urllib.request.build_opener(*handlers)

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with self.opener.open(req, timeout=30) as res:
                raw = res.read()
                return res.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")
        except OSError as e:
            raise Failure(f"{method} {self.base}{path}: {e}") from None

    def must(self, method, path, body=None, want=(200, 201)):
        status, got = self.call(method, path, body)
        if status not in want:
            raise Failure(f"{method} {path} answered {status}: {got}")
        return got

    def run(self, graph, node, options=None):
        view = self.must("POST", f"/api/2.0/nodes/{node}/workflows",
                         {"name": graph, "options": options or {}})
        return view["instanceId"]

    def wait(self, wf, done, limit=30):
        deadline = time.monotonic() + limit
        while True:
            view = self.must("GET", f"/api/2.0/workflows/{wf}")
            if done(view):
                return view
            if time.monotonic() > deadline:
                raise Failure(f"workflow {wf} did not get there in {limit} s: {view}")
            time.sleep(0.1)


def ended(view):
    return view["status"] in ("succeeded", "failed", "cancelled")


class Browser:
    """One Chromium; pages that record their errors, dialogs and navigations."""

    def __init__(self, pw, chromium):
        self.browser = pw.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-proxy-server"])
        # The server's certificate is signed by its own CA, which this throwaway profile does
        # not hold; the API client above verifies it against that CA.
        self.context = self.browser.new_context(viewport={"width": 1360, "height": 860},
                                                ignore_https_errors=True)
        self.errors = []
        self.dialogs = []

    def page(self, url):
        page = self.context.new_page()
        page.navigations = 0

        def navigated(frame):
            if frame == page.main_frame:
                page.navigations += 1

        page.on("framenavigated", navigated)
        page.on("pageerror", lambda e: self.errors.append(f"{page.url}: {e}"))
        page.on("console", lambda m: m.type == "error" and self.errors.append(f"{page.url}: {m.text}"))

        def dialog(d):
            self.dialogs.append(f"{page.url}: {d.type} {d.message!r}")
            d.dismiss()

        page.on("dialog", dialog)
        page.goto(url)
        # A marker that only survives if the page is never reloaded or left.
        page.evaluate("window.__mgMarker = 'kept'")
        return page

    def remember(self, token):
        """Every page opened from now on starts signed in, as a tab that already was."""
        self.context.add_init_script(
            f"sessionStorage.setItem('metalgraph.token', {json.dumps(token)})")

    def close(self):
        self.context.close()
        self.browser.close()


def step(name):
    print(f"ok: {name}", flush=True)


def no_reload(page, what):
    marker = page.evaluate("window.__mgMarker")
    if marker != "kept" or page.navigations != 1:
        raise Failure(f"{what}: the page was reloaded or left (marker {marker!r}, "
                      f"{page.navigations} navigations); updates must come without a reload")


def box(page, label):
    return page.locator(f'#dag g.task[data-label="{label}"]')


def field(page, name):
    return page.locator(f'#details [data-field="{name}"]')


def expect_state(page, label, state, timeout, why):
    try:
        expect(box(page, label)).to_have_attribute("data-state", state, timeout=timeout)
    except AssertionError:
        got = box(page, label).get_attribute("data-state") if box(page, label).count() else None
        raise Failure(f"task box '{label}' did not turn {state} within {timeout} ms "
                      f"({why}); it is {got!r}") from None


def check(api, b, base):
    for g in (NAP_GRAPH, FAIL_GRAPH, QUICK_GRAPH):
        api.must("PUT", "/api/2.0/workflows/graphs", g)
    api.call("POST", "/api/2.0/nodes", {"id": "ui-xss", "name": XSS_NAME})
    # More nodes than a page of the node list holds by default (100).
    for i in range(120):
        api.call("POST", "/api/2.0/nodes", {"id": f"ui-bulk-{i:03}", "name": f"ui-bulk-{i:03}"})
    # More workflows than the workflows page shows at once (200); the ones created below
    # are newer, so they stay on its first page.
    for _ in range(205):
        api.must("POST", "/api/2.0/workflows", {"name": "UI.Check.Quick"})
    failed = api.run("UI.Check.Fail", "ui-xss")
    api.wait(failed, ended)

    # The nodes page: reached from `/`. The tab holds no token yet, so it asks for one; a
    # wrong one is refused (asked again, saying why), the right one lets the page load.
    nodes = b.page(base + "/")
    sign_in = nodes.locator("dialog#signin")
    expect(sign_in).to_be_visible(timeout=10_000)
    nodes.fill("#token", "mgt_not-a-real-token")
    nodes.click("dialog#signin button")
    expect(nodes.locator("dialog#signin")).to_contain_text("not valid", timeout=10_000)
    nodes.fill("#token", api.token)
    nodes.click("dialog#signin button")
    expect(nodes.locator("dialog#signin")).to_have_count(0, timeout=10_000)
    b.remember(api.token)
    # The browser logs each refused call of the signed-out tab; those were expected, and
    # nothing else may have been logged.
    refused = [e for e in b.errors if "status of 401" in e]
    if not refused or len(refused) != len(b.errors):
        raise Failure(f"signing in: expected only refused calls in the console, got {b.errors}")
    b.errors.clear()
    if not nodes.url.endswith("/ui/"):
        raise Failure(f"/ should redirect to /ui/, the browser ended at {nodes.url}")
    for i in range(1, 9):
        name = f"demo-node-{i:02}"
        try:
            expect(nodes.locator(f'tr[data-node="{name}"] .name')).to_have_text(name, timeout=10_000)
        except AssertionError:
            shown = nodes.locator("#nodes tbody .name").all_text_contents()
            raise Failure(f"the nodes page does not show {name}; it shows {shown}") from None
    try:
        expect(nodes.locator('tr[data-node="ui-bulk-119"]')).to_have_count(1, timeout=10_000)
    except AssertionError:
        raise Failure("the nodes page should show every node, past the node list's first "
                      f"page: {nodes.locator('#nodes tbody tr').count()} rows") from None
    step("the nodes page lists all 8 demo nodes, and 120 more")
    xss = nodes.locator('tr[data-node="ui-xss"]')
    expect(xss).to_have_attribute("data-status", "failed", timeout=10_000)
    shown = xss.locator(".name").text_content()
    if shown != XSS_NAME:
        raise Failure(f"node name {XSS_NAME!r} should show as that text, shows {shown!r}")
    if XSS_ERROR not in xss.text_content():
        raise Failure(f"the failed task's error should show as text in the node's row: {xss.text_content()!r}")
    if nodes.locator("img, script:not([src])").count():
        raise Failure("a node name or error became markup on the nodes page: "
                      + nodes.locator("#nodes").inner_html()[:2000])
    step("a node named <img src=x onerror=alert(1)> and its error show as text")

    # A workflow with a task that sleeps for 8 s: long enough for a loaded machine to open
    # its page while it runs (2.5 s was not, once).
    wf = api.run("UI.Check.Nap", "demo-node-03")
    row = nodes.locator('tr[data-node="demo-node-03"]')
    try:
        expect(row).to_have_attribute("data-status", "running", timeout=10_000)
    except AssertionError:
        raise Failure(f"the nodes page did not show demo-node-03's workflow running: "
                      f"{row.text_content()!r}") from None
    step("the nodes page shows the new workflow running, live")

    page = b.page(f"{base}/ui/workflows/{wf}")
    expect_state(page, "nap", "running", 10_000, "while it sleeps")
    step("the workflow page shows the sleeping task running")
    edge = page.locator('#dag path.edge[data-from="nap"][data-to="cleanup"]')
    if edge.count() != 1:
        raise Failure("the edge nap → cleanup (waitOn) is missing")
    labels = page.locator("#dag .edge-label").all_text_contents()
    if labels != ["finished"]:
        raise Failure(f"edges not awaiting 'succeeded' are labelled with their state: want "
                      f"['finished'], got {labels}")
    ranks = {t: box(page, t).get_attribute("transform") for t in ("first", "nap", "after", "cleanup")}
    ys = {t: float(re.search(r",\s*([\d.]+)\)", v).group(1)) for t, v in ranks.items()}
    if not ys["first"] < ys["nap"] < ys["after"] == ys["cleanup"]:
        raise Failure(f"tasks should be layered by their longest waitOn path: {ranks}")
    step("the graph has its waitOn edges, the 'finished' one labelled, in layers")

    expect_state(page, "nap", "succeeded", 20_000, "after its 8 s")
    expect_state(page, "cleanup", "succeeded", 5_000, "after nap")
    no_reload(page, "the workflow page")
    expect(page.locator("#status .badge")).to_have_text("succeeded", timeout=5_000)
    step("the task turned succeeded without a reload")

    box(page, "nap").click()
    expect(field(page, "label")).to_have_text("nap")
    expect(field(page, "state")).to_have_text("succeeded")
    expect(field(page, "attempts")).to_have_text("1")
    expect(field(page, "output")).to_contain_text('"slept_ms": 8000', timeout=5_000)
    took = field(page, "duration").text_content()
    m = re.fullmatch(r"([\d.]+) s", took or "")
    if not m or not 7.5 <= float(m.group(1)) <= 11.0:
        raise Failure(f"nap slept 8 s; its details say the duration is {took!r}")
    for name in ("started", "finished"):
        if not field(page, name).text_content().strip():
            raise Failure(f"the task's details have no {name} time")
    shown = page.locator("#details").text_content()
    if re.search(r"\bnull\b|undefined|NaN", shown):
        raise Failure(f"the task's details show a missing value: {shown!r}")
    waits = field(page, "waits").text_content()
    if "first succeeded" not in waits:
        raise Failure(f"the details should list what nap waits on: {waits!r}")
    step(f"clicking the task shows its state, attempts, timing ({took}) and output")

    expect(row).to_have_attribute("data-status", "succeeded", timeout=10_000)
    no_reload(nodes, "the nodes page")
    step("the nodes page shows the workflow succeeded, without a reload")

    # The workflows page: filters, and links to each workflow.
    lst = b.page(f"{base}/ui/workflows")
    for w in (wf, failed):
        expect(lst.locator(f'tr[data-id="{w}"]')).to_have_count(1, timeout=10_000)
    lst.select_option('select[name="node"]', "ui-xss")
    try:
        expect(lst.locator("#workflows tbody tr[data-id]")).to_have_count(1, timeout=10_000)
    except AssertionError:
        raise Failure("filtering by node ui-xss should leave its one workflow: "
                      + str(lst.locator("#workflows tbody tr").all_text_contents())) from None
    if "node=ui-xss" not in lst.url:
        raise Failure(f"the filter should be kept in the URL: {lst.url}")
    lst.select_option('select[name="node"]', "")
    lst.select_option('select[name="status"]', "succeeded")
    expect(lst.locator(f'tr[data-id="{failed}"]')).to_have_count(0, timeout=10_000)
    expect(lst.locator(f'tr[data-id="{wf}"]')).to_have_count(1)
    lst.select_option('select[name="status"]', "")
    lst.select_option('select[name="graph"]', "UI.Check.Fail")
    expect(lst.locator(f'tr[data-id="{wf}"]')).to_have_count(0, timeout=10_000)
    row = lst.locator(f'tr[data-id="{failed}"]')
    expect(row).to_have_count(1)
    if XSS_ERROR not in row.text_content():
        raise Failure(f"the failed workflow's error should show as text: {row.text_content()!r}")
    step("the workflows page filters by node, status and graph")

    quick = b.page(f"{base}/ui/workflows?graph=UI.Check.Quick")
    rows = quick.locator("#workflows tbody tr[data-id]")
    try:
        expect(rows).to_have_count(200, timeout=10_000)
        expect(quick.locator("#more")).to_be_visible()
        quick.click("#more")
        expect(rows).to_have_count(205, timeout=10_000)
        expect(quick.locator("#more")).to_be_hidden()
    except AssertionError:
        raise Failure(f"205 workflows of UI.Check.Quick should show 200, then all 205 after "
                      f"'Show older'; the page shows {rows.count()} "
                      f"({quick.locator('#count').text_content()!r})") from None
    quick.close()
    step("the workflows page shows 200 at a time and follows the list's next page")

    row.locator("a").first.click()
    lst.wait_for_url(f"**/ui/workflows/{failed}")
    expect_state(lst, "boom", "failed", 10_000, "Task.Fail failed")
    box(lst, "boom").click()
    expect(field(lst, "error")).to_have_text(XSS_ERROR)
    for p in (nodes, page, lst):
        if p.locator("img, script:not([src])").count():
            raise Failure(f"markup from an error or a name was inserted into {p.url}")
    if b.dialogs:
        raise Failure(f"a script from a node name or an error ran: {b.dialogs}")
    step("a workflow links to its page; an error with markup shows as text")

    rerun = api.must("PUT", f"/api/2.0/workflows/{failed}/action", {"command": "rerun"})
    api.wait(rerun["instanceId"], ended)
    again = b.page(f"{base}/ui/workflows/{rerun['instanceId']}")
    link = again.locator('#facts [data-field="rerun-of"] a')
    try:
        expect(link).to_have_text(failed, timeout=10_000)
    except AssertionError:
        raise Failure("a rerun's page should link the workflow it reruns under 'Rerun of': "
                      + again.locator("#facts").inner_text()) from None
    link.click()
    again.wait_for_url(f"**/ui/workflows/{failed}")
    step("a rerun's page links to the workflow it reruns")

    if b.errors:
        raise Failure("the pages logged errors: " + "; ".join(b.errors))
    step("no page logged an error")


INSTALL_GRAPH = {
    "injectableName": "Graph.Demo.Provision",
    "friendlyName": "Power on, inventory, install from virtual media",
    "options": {"defaults": {"imageUrl": None}},
    "tasks": [
        {"label": "power-on", "taskName": "Task.Obm.Node.PowerOn"},
        {"label": "catalog", "taskName": "Task.Catalog.Redfish", "waitOn": {"power-on": "succeeded"}},
        {"label": "insert-media", "taskName": "Task.VirtualMedia.Insert",
         "optionOverrides": {"image": "{{ options.imageUrl }}"}, "waitOn": {"power-on": "succeeded"}},
        {"label": "boot-cd", "taskName": "Task.Obm.Node.SetBootCd",
         "waitOn": {"insert-media": "succeeded", "catalog": "succeeded"}},
        {"label": "reboot", "taskName": "Task.Obm.Node.Reboot", "waitOn": {"boot-cd": "succeeded"}},
        {"label": "wait-installed", "taskName": "Task.Wait.Notification",
         "waitOn": {"reboot": "succeeded"}},
        {"label": "eject-media", "taskName": "Task.VirtualMedia.Eject",
         "waitOn": {"wait-installed": "finished"}},
        {"label": "report-failure", "taskName": "Task.Noop",
         "waitOn": {"wait-installed": ["failed", "timeout"]}},
    ],
}

FIRMWARE_GRAPH = {
    "injectableName": "Graph.Demo.Firmware",
    "tasks": [
        {"label": "stage", "taskName": "Task.Noop"},
        {"label": "flash-bios", "taskName": "Task.Fail", "waitOn": {"stage": "succeeded"},
         "optionOverrides": {"message": "BMC answered 503 Service Unavailable: the update "
                                        "service is busy (UpdateService.SimpleUpdate)"}},
    ],
}


def screenshots(api, b, base, out):
    os.makedirs(out, exist_ok=True)
    for g in (INSTALL_GRAPH, FIRMWARE_GRAPH):
        api.must("PUT", "/api/2.0/workflows/graphs", g)
    image = {"defaults": {"imageUrl": "http://10.0.0.1:8090/files/rocky9.iso"}}
    for n in (7, 8):
        api.wait(api.run("Graph.Reboot.Node", f"demo-node-0{n}"), ended)
    api.wait(api.run("Graph.Demo.Firmware", "demo-node-06"), ended)
    installs = [api.run("Graph.Demo.Provision", f"demo-node-0{n}", image) for n in (1, 2, 3, 4)]
    for wf in installs:
        api.wait(wf, lambda v: any(t["label"] == "wait-installed" and t["state"] == "running"
                                   for t in v["tasks"]))
    api.run("Graph.Reboot.Node", "demo-node-05")

    nodes = b.page(base + "/ui/")
    expect(nodes.locator('tr[data-node="demo-node-08"] .name')).to_have_text("demo-node-08")
    expect(nodes.locator('tr[data-node="demo-node-06"]')).to_have_attribute("data-status", "failed")
    time.sleep(0.5)
    nodes.screenshot(path=os.path.join(out, "ui-nodes.png"), full_page=True)
    print(f"wrote {out}/ui-nodes.png")

    page = b.page(f"{base}/ui/workflows/{installs[0]}")
    expect(box(page, "wait-installed")).to_have_attribute("data-state", "running")
    box(page, "insert-media").click()
    expect(field(page, "label")).to_have_text("insert-media")
    time.sleep(0.5)
    page.screenshot(path=os.path.join(out, "ui-workflow.png"), full_page=True)
    print(f"wrote {out}/ui-workflow.png")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["check", "screenshots"])
    ap.add_argument("--base", required=True)
    ap.add_argument("--token-file", required=True, help="the server's admin.token")
    ap.add_argument("--ca", help="the CA the server's certificate is signed by (https)")
    ap.add_argument("--out", default="docs/img")
    ap.add_argument("--chromium", default=os.environ.get("METALGRAPH_CHROMIUM", "/usr/bin/chromium"))
    args = ap.parse_args()
    base = args.base.rstrip("/")
    if not re.match(r"^https?://(127\.\d+\.\d+\.\d+|localhost|\[::1\])(:\d+)?$", base):
        sys.exit(f"--base must be a loopback URL, got {base}")
    if not os.access(args.chromium, os.X_OK):
        sys.exit(f"no Chromium at {args.chromium}: apt-get install chromium "
                 "(scripts/install-peers.sh does)")
    with open(args.token_file) as f:
        token = f.read().strip()
    api = Api(base, token, args.ca)
    with sync_playwright() as pw:
        b = Browser(pw, args.chromium)
        try:
            if args.mode == "check":
                check(api, b, base)
            else:
                b.remember(token)
                screenshots(api, b, base, args.out)
        except (Failure, PlaywrightError, AssertionError) as e:
            print(f"FAIL: {e}", flush=True)
            if b.errors:
                print("page errors: " + "; ".join(b.errors), flush=True)
            sys.exit(1)
        finally:
            b.close()


if __name__ == "__main__":
    main()
