"""The hub's combined view, fed directly (sans-IO): hostile entries never break it."""

import json

from pttd.hub.view import Limits, View

A, B, M = "a" * 64, "b" * 64, "c" * 64


def post(mid: str, date: int, text: str = "hi") -> bytes:
    return json.dumps({"id": mid, "topic": "t", "date": date, "message": {"type": "text", "value": text}}).encode()


def test_bad_entries_of_one_repository_leave_the_view_whole():
    v = View({M}, Limits(max_topics_per_repo=2, max_messages_per_repo=3, max_message_bytes=300))
    v.apply(A, "/topics/t/1", post("1", 10))
    v.apply(B, "/topics/t/2", post("2", 20))
    # moderation records whose date is not a number (beside a good one) are not taken
    v.apply(M, "/topics/t/moderation/x", json.dumps({"msgID": "1", "date": "soon"}).encode())
    v.apply(B, "/topics/t/moderation/y", json.dumps({"msgID": "1", "date": 5}).encode())
    v.apply(B, "/topics/t/reactions/r", b"{not json")
    v.apply(B, "/topics/t/3", b"[1, 2]")
    v.apply(B, "/topics/t/4", post("4", 30, "x" * 400))  # too large
    v.apply(B, "/topics/u/5", post("5", 40).replace(b'"topic": "t"', b'"topic": "u"'))
    v.apply(B, "/topics/w/6", post("6", 50).replace(b'"topic": "t"', b'"topic": "w"'))  # a third topic
    v.apply(B, "/topics/__gossiping/e", b"{}")
    assert [(m["author"], m["id"]) for m in v.messages("t")] == [(A, "1"), (B, "2")]
    assert [m["id"] for m in v.messages("u")] == ["5"] and v.messages("w") == []
    # B's own hide applies to B as the reader only; the hub moderator's, once valid, to all
    assert [m["id"] for m in v.messages("t", reader=B)] == ["2"]
    v.apply(M, "/topics/t/moderation/x", json.dumps({"msgID": "1", "date": 7}).encode())
    assert [m["id"] for m in v.messages("t")] == ["2"]


def test_changes_name_what_a_stream_must_send_again():
    v = View()
    assert v.apply(A, "/topics/t/1", post("1", 10)).messages == {("t", A, "1"): True}
    ch = v.apply(B, "/topics/t/reactions/r", json.dumps({"msgID": "1", "emoji": "+", "date": 1}).encode())
    assert ch.messages == {("t", A, "1"): True}
    assert v.render("t", A, "1")["reactions"] == [{"id": "r", "author": B, "emoji": "+"}]
    assert v.apply(B, "/topics/t/reactions/r", None).messages == {("t", A, "1"): True}
    assert v.render("t", A, "1")["reactions"] == []
    assert v.apply(A, "/topics/t/1", None).messages == {("t", A, "1"): False}
    assert v.remove_repo(B).profiles == {B}


def test_records_that_would_break_readers_are_refused_or_made_safe():
    v = View(limits=Limits(max_messages_per_repo=5))
    no_id = json.dumps({"topic": "t", "date": 1, "message": {"type": "text", "value": "x"}}).encode()
    v.apply(A, "/topics/t/m1", no_id)  # no id: the path gives it
    assert v.messages("t")[0]["id"] == "m1"
    v.apply(A, "/topics/t/m2", b'{"id": "m2", "date": 2, "message": {"type": "text", "value": NaN}}')
    v.apply(A, "/topics/t/m3", b"[" * 5000 + b"]" * 5000)
    v.apply(A, "/topics/t/m4", b'{"id": "m4", "date": 4, "message": {"type": "text", "value": 1e400}}')
    assert [m["id"] for m in v.messages("t")] == ["m1"]
    json.dumps(v.messages("t"), allow_nan=False)  # what a browser can read
    # reactions and moderation records count toward the repository's limit
    for i in range(10):
        v.apply(B, f"/topics/t/reactions/r{i}", json.dumps({"msgID": "m1", "emoji": "+", "date": i}).encode())
    assert len(v.render("t", A, "m1")["reactions"]) == 5


def test_many_reactions_are_shown_in_part_with_their_total():
    v = View(limits=Limits(max_messages_per_repo=10_000))
    v.apply(A, "/topics/t/m", post("m", 1))
    for i in range(250):
        v.apply(B, f"/topics/t/reactions/r{i:03d}", json.dumps({"msgID": "m", "emoji": "+", "date": i}).encode())
    shown = v.render("t", A, "m")
    assert len(shown["reactions"]) == 200 and shown["reactions_total"] == 250


def test_an_author_cannot_claim_a_reaction_count_or_a_topic_the_api_cannot_serve():
    v = View()
    claimed = json.loads(post("m", 1))
    claimed["reactions_total"] = 5000
    v.apply(A, "/topics/t/m", json.dumps(claimed).encode())
    shown = v.render("t", A, "m")
    assert "reactions_total" not in shown and shown["reactions"] == []
    # topics that GET /topics/{topic} would refuse are not in the view at all
    for bad in ("has space", ".hidden", "x" * 65, "caf\u00e9"):
        v.apply(A, f"/topics/{bad}/m", post("m", 2))
    assert sorted(v.topics) == ["t"]
    assert "/topics/caf\u00e9/m" in v.skipped[A]  # the last one, logged


def test_a_reaction_needs_a_short_text_emoji_and_an_integer_date():
    v = View()
    v.apply(A, "/topics/t/m", post("m", 1))
    for rid, rec in {
        "ok": {"msgID": "m", "emoji": "+", "date": 1},
        "object": {"msgID": "m", "emoji": {"big": "x" * 1000}, "date": 2},
        "long": {"msgID": "m", "emoji": "x" * 65, "date": 3},
        "none": {"msgID": "m", "date": 4},
        "date": {"msgID": "m", "emoji": "+", "date": "soon"},
    }.items():
        v.apply(B, f"/topics/t/reactions/{rid}", json.dumps(rec).encode())
    assert v.render("t", A, "m")["reactions"] == [{"id": "ok", "author": B, "emoji": "+"}]


def test_dates_a_browser_cannot_draw_keep_a_message_out_of_the_view():
    """A date past 8.64e15 ms (the last a browser's Date holds), or an edited mark that
    is no such date, made every reader's drawing of the topic throw: such messages are
    not in the view."""
    v = View()
    good = json.loads(post("ok", 5))
    v.apply(A, "/topics/t/ok", json.dumps({**good, "edited": 6}).encode())
    for mid, extra in {"far": {"date": 9_000_000_000_000_000}, "soon": {"edited": "soon"}, "neg": {"date": -1}}.items():
        v.apply(A, f"/topics/t/{mid}", json.dumps({**json.loads(post(mid, 7)), **extra}).encode())
    assert [m["id"] for m in v.messages("t")] == ["ok"] and v.messages("t")[0]["edited"] == 6


def test_curator_records_count_toward_the_limit_and_are_read_once_per_answer(monkeypatch):
    """Curator records were unlimited, and a reader's whole set of them was built again
    for every message of an answer: a repository of 2,000 hidden messages and 20,000
    curator records held the hub's event loop 12 s per GET (even with limit=1)."""
    v = View(limits=Limits(max_messages_per_repo=5))
    for i in range(8):  # B, the reader, trusts curators c0..c7; only 5 records are taken
        v.apply(B, f"/topics/t/curators/k{i}", json.dumps({"key": f"c{i}"}).encode())
    for i in range(5):  # message i hidden by curator c(i+3)
        v.apply(A, f"/topics/t/{i}", post(str(i), i))
        v.apply(f"c{i + 3}", f"/topics/t/moderation/h{i}", json.dumps({"msgID": str(i), "date": i}).encode())
    assert [m["id"] for m in v.messages("t")] == ["0", "1", "2", "3", "4"]  # no moderator of the hub
    assert [m["id"] for m in v.messages("t", reader=B)] == ["2", "3", "4"]  # c3, c4 trusted; c5-c7 not taken
    assert "more than 5" in v.skipped[B]
    # a record removed frees its place
    v.apply(B, "/topics/t/curators/k0", None)
    v.apply(B, "/topics/t/curators/k6", json.dumps({"key": "c6"}).encode())
    assert [m["id"] for m in v.messages("t", reader=B)] == ["2", "4"]
    # one set of trusted keys per answer, and only the answered messages are drawn
    calls = {"trusted": 0, "render": 0}
    for name in calls:
        real = getattr(View, name)

        def counted(self, *a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(View, name, counted)
    assert [m["id"] for m in v.messages("t", reader=B, limit=2)] == ["2", "4"]
    assert calls == {"trusted": 1, "render": 2}


def test_a_long_profile_name_is_cut_where_it_is_copied_into_each_message():
    """A profile name of 16 KB was copied whole into each of the author's messages in
    every answer (10,000 messages: 160 MB)."""
    v = View()
    v.apply(A, "/profile.json", json.dumps({"name": "n" * 15000}).encode())
    v.apply(A, "/topics/t/m", post("m", 1))
    assert v.messages("t")[0]["name"] == "n" * 128
