"""The native job API: FIFO order under concurrent clients (none lost, none duplicated), the bounded queue,
cancelling queued and running jobs, the event stream, and a killed server that finds its images again."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from serving import MODEL, SMALL, needs_model, request, running

from diffusekit.pipelines.recipe import read_png_metadata


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running(tmp_path_factory.mktemp("serve-queue"), preview_every=None) as s:
        yield s


def test_the_queue_keeps_order_under_8_concurrent_clients(server):
    accepted: list[dict] = []
    lock, errors = threading.Lock(), []

    def client(c: int) -> None:
        for k in range(3):
            r = server.request("POST", "/api/jobs", {"prompt": f"client {c} request {k}", "seed": 100 * c + k,
                                                     "steps": 2, "width": 16, "height": 16})  # fmt: skip
            if r.status != 202:
                errors.append(r.body)
                continue
            with lock:
                accepted.append(r.json())

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(accepted) == 24
    done = [server.wait(j["id"]) for j in accepted]
    assert all(j["state"] == "done" for j in done)
    assert len({j["id"] for j in done}) == 24  # none duplicated
    by_number = sorted(done, key=lambda j: j["number"])
    starts = [j["started"] for j in by_number]
    assert starts == sorted(starts)  # run in the order they were accepted
    files = [image["file"] for j in done for image in j["images"]]
    assert len(files) == 24 == len(set(files))  # one image each, none lost, none overwritten
    for j in done:  # each job's image is its own request's
        meta = read_png_metadata(server.service.settings.out / j["images"][0]["file"])
        assert (meta["prompt"], meta["seed"], meta["job"]) == (j["settings"]["prompt"], j["settings"]["seed"], j["id"])


def test_a_full_queue_answers_429_and_cancel_works_on_queued_and_running_jobs(tmp_path):
    with running(tmp_path, queue_size=2, preview_every=None) as s:
        long = {"prompt": "long", "steps": 600, "width": 16, "height": 16}
        first = s.request("POST", "/api/jobs", long).json()
        deadline = time.monotonic() + 30
        while s.request("GET", f"/api/jobs/{first['id']}").json()["step"] == 0:  # running, a step made
            assert time.monotonic() < deadline
            time.sleep(0.02)
        queued = [s.request("POST", "/api/jobs", {**long, "seed": i}).json() for i in range(2)]
        assert [q["position"] for q in queued] == [0, 1]
        full = s.request("POST", "/api/jobs", long)
        assert full.status == 429 and "queue is full" in full.json()["detail"] and full.headers["retry-after"]
        r = s.request("POST", f"/api/jobs/{queued[0]['id']}/cancel").json()
        assert r["state"] == "cancelled"
        assert s.request("GET", f"/api/jobs/{queued[1]['id']}").json()["position"] == 0
        running_job = s.request("POST", f"/api/jobs/{first['id']}/cancel").json()
        assert running_job["cancel_requested"]
        done = s.wait(first["id"], timeout=20)
        assert done["state"] == "cancelled" and 0 < done["step"] < 600
        assert s.request("POST", f"/api/jobs/{first['id']}/cancel").status == 409
        s.request("POST", f"/api/jobs/{queued[1]['id']}/cancel")
        assert s.request("GET", "/api/jobs/nope").status == 404


def test_the_event_stream_reports_progress_and_the_result(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/api/events")
    stream = conn.getresponse()
    assert stream.headers["content-type"].startswith("text/event-stream")
    job = server.request("POST", "/api/jobs", {"prompt": "events", "steps": 4, "width": 16, "height": 16}).json()
    states, steps = [], []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = stream.readline().decode()
        if not line.startswith("data: "):
            continue
        event = json.loads(line[6:])
        if event["id"] != job["id"]:
            continue
        states.append(event["state"])
        steps.append(event["step"])
        if event["state"] == "done":
            assert event["images"] and event["images"][0]["url"].startswith(f"/api/jobs/{job['id']}/images/")
            break
    conn.close()
    assert states[-1] == "done" and steps == sorted(steps) and steps[-1] == 4


@needs_model
def test_a_killed_server_restarted_finds_every_finished_image(tmp_path):
    out = tmp_path / "out"

    def start() -> tuple[subprocess.Popen, int]:
        proc = subprocess.Popen([sys.executable, "-m", "diffusekit", "serve", str(MODEL), "--port", "0", "--out",
                                 str(out), "--preview-every", "0"], stderr=subprocess.PIPE, text=True)  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if "http://" in line:
                return proc, int(line.split("http://127.0.0.1:")[1].split("/")[0])
            assert line or proc.poll() is None, "the server exited"
        raise AssertionError("the server did not start")

    proc, port = start()
    try:
        jobs = [request(port, "POST", "/api/jobs", {"prompt": f"p{i}", "seed": i, "n_iter": 2, **SMALL}).json()
                for i in range(3)]  # fmt: skip
        finished = {}
        for j in jobs:
            while (state := request(port, "GET", f"/api/jobs/{j['id']}").json())["state"] != "done":
                time.sleep(0.05)
            finished[j["id"]] = state
        kept = {j: [request(port, "GET", image["url"]).body for image in s["images"]] for j, s in finished.items()}
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # no clean shutdown
        proc.wait()
    proc, port = start()
    try:
        listed = {j["id"]: j for j in request(port, "GET", "/api/jobs").json()["jobs"]}
        assert set(listed) == set(kept)
        for job_id, images in kept.items():
            again = listed[job_id]
            assert again["state"] == "done" and again["restored"]
            assert again["settings"] == finished[job_id]["settings"]
            assert [request(port, "GET", image["url"]).body for image in again["images"]] == images
        new = request(port, "POST", "/api/jobs", {"prompt": "after", **SMALL}).json()
        assert new["number"] == max(j["number"] for j in listed.values()) + 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert len(list(Path(out).glob("*.png"))) >= 6
