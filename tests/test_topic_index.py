"""Reading topics without reading every message: GET /topics/:id's index (a topic's
messages ordered by (date, id), kept up to date by diffs, so that a page reads its own
messages) and GET /topics (one step down the tree per topic)."""

from __future__ import annotations

import json
import random

from pttd.gateway.chat import TopicIndex, parse_json, topics
from pttd.repo import collect_garbage


def expected(repo, topic, since, before, limit):
    """The answer spelled out: every message of the topic read, filtered, sorted."""
    out = []
    for path, raw in repo.items(f"/topics/{topic}/"):
        if "/" in path[len(f"/topics/{topic}/") :]:
            continue  # reactions, moderation, curators
        try:
            post = parse_json(raw)
            date = post["date"]
        except (ValueError, KeyError, TypeError):
            continue
        if not isinstance(date, (int, float)):
            continue
        if (since is None or date >= since) and (before is None or date <= before):
            out.append(post)
    out.sort(key=lambda p: (p["date"], str(p.get("id"))))
    return out[-limit:] if limit else out


def post(repo, topic, pid, date, pad=0):
    body = {"id": pid, "topic": topic, "date": date, "message": {"type": "text", "value": "x" * pad}}
    repo.put(f"/topics/{topic}/{pid}", json.dumps(body).encode())


def test_pages_match_a_full_read_through_posts_edits_and_deletes(repo):
    rnd = random.Random(7)
    index = TopicIndex()
    live: list[str] = []
    for step in range(160):
        action = rnd.random()
        if action < 0.6 or not live:
            pid = f"m{step:03d}" if rnd.random() < 0.8 else f"z-client-{rnd.randrange(1000)}"
            # dates out of id order, repeated dates, short (inline) and long values
            post(repo, "t", pid, rnd.choice([step * 10, rnd.randrange(2000), 500]), pad=rnd.choice([0, 200]))
            live.append(pid)
        elif action < 0.75:
            post(repo, "t", rnd.choice(live), rnd.randrange(2000), pad=rnd.choice([0, 300]))  # edited
        elif action < 0.85:
            pid = live.pop(rnd.randrange(len(live)))
            repo.delete(f"/topics/t/{pid}")
        elif action < 0.9:
            repo.put(f"/topics/t/junk{step}", b"not json")  # another client's value: skipped
        elif action < 0.95:
            repo.put(f"/topics/t/reactions/r{step}", b'{"id": "r", "date": 1}')  # not a message
        else:
            post(repo, "other", f"o{step}", step)  # another topic
        since = rnd.choice([None, rnd.randrange(2000)])
        before = rnd.choice([None, rnd.randrange(2000)])
        limit = rnd.choice([None, 1, 5, 50])
        assert index.messages(repo, "t", since, before, limit) == expected(repo, "t", since, before, limit)
    assert index.messages(repo, "nothing", None, None, None) == []


def test_a_page_of_a_long_topic_reads_about_its_own_size(repo, datadir):
    for i in range(400):
        post(repo, "long", f"m{i:04d}", i, pad=200)  # each value a block of its own
    index = TopicIndex()
    store = datadir.store
    store.drop_cache()
    before = store.blocks_read
    assert [p["id"] for p in index.messages(repo, "long", None, None, 10)] == [f"m{i:04d}" for i in range(390, 400)]
    first = store.blocks_read - before
    assert first >= 400  # the first read of a topic reads every message once

    post(repo, "long", "m0400", 400, pad=200)
    store.drop_cache()
    before = store.blocks_read
    page = index.messages(repo, "long", None, None, 10)
    assert [p["id"] for p in page] == [f"m{i:04d}" for i in range(391, 401)]
    # the diff down to the new message (a few nodes per level), the new message, the page
    assert store.blocks_read - before < 40

    before = store.blocks_read
    assert [p["id"] for p in index.messages(repo, "long", 100, 104, None)] == [f"m{i:04d}" for i in range(100, 105)]
    assert store.blocks_read - before <= 5  # unchanged: the page alone


def test_a_topic_read_again_after_its_old_version_was_collected(repo, datadir):
    for i in range(50):
        post(repo, "t", f"m{i:03d}", i, pad=100)
    index = TopicIndex()
    assert len(index.messages(repo, "t", None, None, 5)) == 5
    post(repo, "t", "m999", 999)
    collect_garbage(datadir.store, keep=1)  # the version the index was read at is gone
    datadir.store.drop_cache()
    assert [p["id"] for p in index.messages(repo, "t", None, None, 2)] == ["m049", "m999"]


def test_the_index_keeps_at_most_its_bound(repo):
    for i in range(30):
        post(repo, "a", f"a{i}", i)
        post(repo, "b", f"b{i}", i)
    index = TopicIndex(max_entries=40)
    assert len(index.messages(repo, "a", None, None, None)) == 30
    assert len(index.messages(repo, "b", None, None, None)) == 30  # "a" is dropped for it
    assert index._size == 30
    big = TopicIndex(max_entries=10)
    assert len(big.messages(repo, "a", None, None, None)) == 30  # too big to keep: read whole
    assert big._size == 0


def test_the_topic_list_steps_over_each_topics_messages(repo, datadir):
    # names that sort between a topic's own path and its messages: /topics/a-b/... lies
    # between /topics/a and /topics/a/...
    with repo.batch() as b:
        for t in ("a", "a-b", "a.b", "a0", "b", "__gossiping"):
            for i in range(200):
                b.put(f"/topics/{t}/m{i:04d}", b"x")
        b.put("/topics/a", b"a path of its own")
        b.put("/topicsx/not-a-topic/m", b"x")
    every = list(dict.fromkeys(info.path.split("/")[2] for info in repo.list("/topics/")))
    assert every == ["__gossiping", "a", "a-b", "a.b", "a0", "b"]
    datadir.store.drop_cache()
    before = datadir.store.blocks_read
    assert topics(repo) == ["a", "a-b", "a.b", "a0", "b"]  # the direct messages' folder is no topic
    assert datadir.store.blocks_read - before < 30  # listing every entry reads 165 blocks here
