"""The client's rule for waiting out a server whose database is unreachable (503): pure, no I/O."""

from __future__ import annotations

from orchestrator.client.client import retry_delay


def test_retry_delay_backs_off_honours_retry_after_and_is_capped() -> None:
    assert [retry_delay(n, None) for n in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert retry_delay(0, "5") == 5.0 and retry_delay(4, "5") == 8.0  # never sooner than the server says
    assert retry_delay(50, None) == 30.0 and retry_delay(0, "3600") == 30.0  # never longer than the cap
    for junk in ("Wed, 21 Oct 2015 07:28:00 GMT", "soon", "-3", "nan"):
        assert retry_delay(1, junk) == 1.0, junk  # an unreadable hint: the backoff alone
