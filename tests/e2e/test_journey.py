"""The teacher journey across the whole tier running as processes on the real broker.

Log in at one gateway, watch over WSS at a wsmanager, register, upload, run spellcheck + CJ,
see the live events arrive in order up to ``batch_results_ready``, find the final view and the
dashboard agreeing with what the events said, and see a second teacher get none of it; a
logout at the *other* gateway closes the socket with 4003.
"""

from __future__ import annotations

import json
from typing import Any

import trio
import trio_websocket

from common.errors import WsCloseCode
from deploy.cluster import Cluster
from tests.e2e.conftest import (
    ESSAYS,
    TEACHER,
    TEACHER2,
    Stream,
    Teacher,
    finished,
    replayed_since,
    wait_for,
    ws_tls,
)


def _in_order(events: list[dict[str, Any]]) -> None:
    offsets = [(e["epoch"], e["offset"]) for e in events]
    assert len({epoch for epoch, _ in offsets}) == 1, "one user's stream is one partition"
    assert [o for _, o in offsets] == sorted(o for _, o in offsets), offsets
    # The aggregator's notifications carry the view's version; it only grows.
    versions = [e["data"]["version"] for e in events if "version" in e["data"]]
    assert versions
    assert versions == sorted(versions), versions


async def test_the_teacher_journey_over_https_and_wss(cluster: Cluster) -> None:
    teacher, other = Teacher(cluster, TEACHER), Teacher(cluster, TEACHER2, gateway=1)
    await teacher.login()
    await other.login()
    mine, theirs = Stream(cluster, teacher), Stream(cluster, other)
    async with (
        mine.open(instance=0) as my_socket,
        theirs.open(instance=1) as their_socket,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(mine.follow, my_socket)
        nursery.start_soon(theirs.follow, their_socket)
        batch_id = await teacher.run_batch()
        await wait_for(lambda: finished(mine, batch_id), within_s=60, what="batch_results_ready")

        events = mine.of(batch_id)
        _in_order(events)
        statuses = [
            e["data"]["status"] for e in events if e["event_type"] == "batch_status_changed"
        ]
        assert statuses[-1] == "completed_successfully", statuses
        assert "processing" in statuses
        # What a client resuming from before the first event gets is exactly what came live.
        reference = await replayed_since(cluster, teacher, events[0])
        assert [e["event_id"] for e in events] == [e["event_id"] for e in reference]

        view = (await teacher.call("GET", f"/v1/batches/{batch_id}", gateway=1)).json()
        assert view["status"] == "completed_successfully"
        assert view["version"] >= events[-1]["data"]["version"]
        assert sorted(e["filename"] for e in view["essays"]) == sorted(n for n, _ in ESSAYS)
        for essay in view["essays"]:
            assert essay["spellcheck_corrections"] is not None
            assert essay["cj_rank"] is not None
        assert sorted(e["cj_rank"] for e in view["essays"]) == list(range(1, len(ESSAYS) + 1))
        final = events[-1]["data"]
        assert {p["phase"]: p["succeeded"] for p in final["phases"]} == {
            p["phase"]: p["essays_succeeded"] for p in view["phases"]
        }

        dashboard = (await teacher.call("GET", "/v1/dashboard")).json()
        assert dashboard["incomplete"] == []
        recent = {b["batch_id"]: b for b in dashboard["recent"]}
        assert recent[batch_id]["status"] == "completed_successfully"
        assert recent[batch_id]["essays_received"] == len(ESSAYS)

        # The other teacher: nothing of it over REST or WSS.
        assert (await other.call("GET", f"/v1/batches/{batch_id}")).status_code == 404
        other_dashboard = (await other.call("GET", "/v1/dashboard")).json()
        assert batch_id not in {b["batch_id"] for b in other_dashboard["recent"] or []}
        assert theirs.of(batch_id) == []
        assert all(e["batch_id"] != batch_id for e in theirs.events)

        # Logout at the other gateway: the session's socket on wsmanager-1 closes with 4003.
        assert (await teacher.call("POST", "/v1/auth/logout", gateway=1)).status_code == 204
        await wait_for(lambda: bool(mine.closed), within_s=2, what="socket closed after logout")
        assert mine.closed[0][0] == WsCloseCode.SESSION_REVOKED
        assert not theirs.closed
        nursery.cancel_scope.cancel()


async def test_a_ticket_from_one_gateway_opens_one_socket_once(cluster: Cluster) -> None:
    teacher = Teacher(cluster, TEACHER2)
    await teacher.login()
    reply = await teacher.call("POST", "/v1/auth/ws-ticket", gateway=1)
    assert reply.status_code == 200, reply.text
    url = f"{cluster.ws_url(0)}?ticket={reply.json()['ticket']}"
    assert (await _first_frame(cluster, url))["type"] == "welcome"
    assert await _first_frame(cluster, url) == {"closed": WsCloseCode.AUTH_FAILED}


async def _first_frame(cluster: Cluster, url: str) -> dict[str, Any]:
    """The first frame the server sends, or how it closed the socket."""
    async with trio_websocket.open_websocket_url(url, ws_tls(cluster)) as socket:
        try:
            with trio.fail_after(5):
                frame: dict[str, Any] = json.loads(await socket.get_message())
                return frame
        except trio_websocket.ConnectionClosed as closed:
            return {"closed": closed.reason.code if closed.reason else None}
        finally:
            await trio.aclose_forcefully(socket._stream)
