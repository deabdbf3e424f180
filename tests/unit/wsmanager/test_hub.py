"""The fan-out core: routing by user, one frame per event per connection, slow consumers cut
without stalling anyone, caps, session closes, and resume from the replay buffer."""

from __future__ import annotations

import pytest
import trio

from common.errors import WsCloseCode
from wsmanager.hub import Connection, Delivery, Hub, Refused

EPOCH = "huleedu.notification.teacher.requested.v1/0"


def hub(**over: int) -> Hub:
    values = {
        "max_connections": 100,
        "max_connections_per_user": 5,
        "replay_events_per_user": 10,
        "replay_users": 1000,
        **over,
    }
    return Hub(**values)


def event(offset: int, user: str = "u1", batch: str | None = "b1", epoch: str = EPOCH) -> Delivery:
    return Delivery(epoch, offset, user, f"e{offset}", batch, "batch_progress", f"frame-{offset}")


def drain(connection: Connection) -> list[str]:
    out = list(connection.backlog)
    connection.backlog.clear()
    while True:
        try:
            out.append(connection.receive.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return out


def test_events_reach_only_their_users_connections_once_each() -> None:
    h = hub()
    tabs = [Connection("u1", "s1", queue_frames=10) for _ in range(3)]
    other = Connection("u2", "s2", queue_frames=10)
    for c in [*tabs, other]:
        h.register(c)
    assert h.dispatch(event(1)) == 3
    assert h.dispatch(event(2, user="u2")) == 1
    assert h.dispatch(event(3, user="u3")) == 0  # nobody connected: kept for resume only
    for tab in tabs:
        assert drain(tab) == ["frame-1"]
    assert drain(other) == ["frame-2"]


def test_a_full_queue_closes_only_that_connection_and_never_blocks() -> None:
    h = hub()
    slow = Connection("u1", "s1", queue_frames=2)
    fast = Connection("u1", "s1", queue_frames=100)
    h.register(slow)
    h.register(fast)
    for offset in range(1, 6):
        h.dispatch(event(offset))  # synchronous: returns whatever the clients do
        drain(fast)
    assert slow.close_code is WsCloseCode.SLOW_CONSUMER and slow.closing.is_set()
    assert fast.close_code is None
    assert h.stats.slow_consumers == 1


def test_caps_refuse_with_their_close_codes() -> None:
    h = hub(max_connections=3, max_connections_per_user=2)
    h.register(Connection("u1", "s", queue_frames=1))
    h.register(Connection("u1", "s", queue_frames=1))
    with pytest.raises(Refused) as per_user:
        h.register(Connection("u1", "s", queue_frames=1))
    assert per_user.value.code is WsCloseCode.TOO_MANY_CONNECTIONS
    h.register(Connection("u2", "s", queue_frames=1))
    with pytest.raises(Refused) as everyone:
        h.register(Connection("u3", "s", queue_frames=1))
    assert everyone.value.code is WsCloseCode.TRY_AGAIN_LATER


def test_unregister_frees_the_slot() -> None:
    h = hub(max_connections_per_user=1)
    first = Connection("u1", "s", queue_frames=1)
    h.register(first)
    h.unregister(first)
    h.register(Connection("u1", "s", queue_frames=1))
    assert h.stats.connections == 1


def test_closing_a_session_closes_its_connections_only() -> None:
    h = hub()
    mine = Connection("u1", "s1", queue_frames=1)
    other_session = Connection("u1", "s2", queue_frames=1)
    h.register(mine)
    h.register(other_session)
    assert h.close_session("s1", WsCloseCode.SESSION_REVOKED, "revoked") == 1
    assert mine.close_code is WsCloseCode.SESSION_REVOKED
    assert other_session.close_code is None


def test_resume_replays_the_gap_in_order_and_never_twice() -> None:
    h = hub()
    for offset in (3, 5, 8):
        h.dispatch(event(offset))
    h.dispatch(event(6, user="u2"))
    back = Connection("u1", "s1", queue_frames=10)
    h.register(back)
    resume = h.resume(back, EPOCH, 3)
    assert (resume.recovered, resume.replayed) == (True, 2)
    h.dispatch(event(8))  # a duplicate (e.g. redelivered): not sent again
    h.dispatch(event(9))
    assert drain(back) == ["frame-5", "frame-8", "frame-9"]


def test_resume_past_what_the_buffer_holds_is_not_recovered() -> None:
    h = hub(replay_events_per_user=2)
    for offset in (1, 2, 3, 4):
        h.dispatch(event(offset))  # 1 and 2 are evicted
    back = Connection("u1", "s1", queue_frames=10)
    h.register(back)
    assert h.resume(back, EPOCH, 1).recovered is False
    assert drain(back) == []
    again = Connection("u1", "s1", queue_frames=10)
    h.register(again)
    resume = h.resume(again, EPOCH, 2)  # everything after 2 is still there
    assert (resume.recovered, resume.replayed) == (True, 2)
    assert drain(again) == ["frame-3", "frame-4"]


def test_resume_on_an_unknown_epoch_is_not_recovered() -> None:
    h = hub()
    h.dispatch(event(1))
    back = Connection("u1", "s1", queue_frames=10)
    h.register(back)
    assert h.resume(back, "other-topic/7", 0).recovered is False


def test_forgotten_users_history_makes_resume_conservative() -> None:
    h = hub(replay_users=1)
    h.dispatch(event(1, user="u1"))
    h.dispatch(event(2, user="u2"))  # u1's buffer is forgotten (over replay_users)
    h.dispatch(event(3, user="u1"))
    back = Connection("u1", "s1", queue_frames=10)
    h.register(back)
    assert h.resume(back, EPOCH, 0).recovered is False  # event 1 may be gone: say so


def test_subscriptions_only_narrow() -> None:
    class OnlyB2:
        def matches(self, batch_id: str | None, category: str) -> bool:
            return batch_id == "b2"

    h = hub()
    narrow = Connection("u1", "s1", queue_frames=10, filter=OnlyB2())
    h.register(narrow)
    h.dispatch(event(1, batch="b1"))
    h.dispatch(event(2, batch="b2"))
    h.dispatch(event(3, user="u2", batch="b2"))
    assert drain(narrow) == ["frame-2"]
