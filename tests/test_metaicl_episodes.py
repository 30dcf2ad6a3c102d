"""MetaICL's episodes: k demonstrations of the query's own task, never the query itself, trained on
the answer only; held-out families never in meta-training."""
from __future__ import annotations

import random

import pytest

from lmforge.errors import UserError
from lmforge.labs.metaicl import (Entry, MetaICLConfig, build_episode, episode_messages, episode_text, eval_prompts,
                                  meta_training_data, multitask_data)


def entries(task: str, n: int) -> list[Entry]:
    return [Entry(f"{task} question {i}", f"{task}-{i}", {"task": task}) for i in range(n)]


def test_episode_text_is_demonstrations_then_the_query():
    demos, query = entries("t", 2), Entry("what?", "that", {})
    assert episode_text(demos, query) == "Q: t question 0\nA: t-0\n\nQ: t question 1\nA: t-1\n\nQ: what?\nA:"
    assert episode_text([], query) == "Q: what?\nA:"
    assert episode_messages(demos, query)[-1] == {"role": "assistant", "content": "that"}
    assert len(episode_messages(demos, query, with_answer=False)) == 1


def test_build_episode_never_shows_the_query_and_is_seeded():
    pool = entries("t", 6)
    for query_index in range(6):
        demos, query = build_episode(pool, query_index, 5, random.Random(0))
        assert query is pool[query_index] and query not in demos and len(set(map(id, demos))) == 5
    assert build_episode(pool, 2, 3, random.Random(7)) == build_episode(pool, 2, 3, random.Random(7))
    with pytest.raises(UserError, match="raise pool"):
        build_episode(pool, 0, 6, random.Random(0))


def test_meta_training_episodes_stay_within_one_task_and_cover_every_task():
    pools = {"a": entries("a", 8), "b": entries("b", 8), "c": entries("c", 8)}
    data = meta_training_data(pools, 9, 4, seed=0)
    assert len(data) == 9
    seen = []
    for user, assistant in data:
        task = assistant["content"].split("-")[0]
        seen.append(task)
        assert user["content"].count("Q: ") == 5 and user["content"].count(f"Q: {task} question") == 5
        assert f"Q: {assistant['content'].replace('-', ' question ')}\nA:" in user["content"]   # the query is last
        assert not user["content"].split("\n\n")[-1].endswith(assistant["content"])
    assert sorted(seen) == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    assert all(user["content"].count("Q: ") == 1 for user, _ in multitask_data(pools, 6, seed=0))
    assert meta_training_data(pools, 9, 4, seed=0) == data and meta_training_data(pools, 9, 4, seed=1) != data


def test_eval_demonstrations_for_k_are_a_prefix_of_those_for_larger_k():
    pool = entries("g", 12)
    eight = eval_prompts(pool, 3, 8, seed=0)
    for k in (0, 1, 4):
        for (messages, query), (messages8, query8) in zip(eval_prompts(pool, 3, k, seed=0), eight):
            assert query is query8
            demos = messages[0]["content"].split("\n\n")[:-1]
            assert demos == messages8[0]["content"].split("\n\n")[:k]
            assert f"Q: {query.question}\n" not in "\n\n".join(demos) + "\n"


def test_only_the_answer_is_trained_on():
    from lmforge.tokenizer.chat_template import render_chat_ids
    from tools_support import byte_tokenizer

    tokenizer = byte_tokenizer()
    demos, query = entries("t", 2), Entry("q?", "42", {})
    ids, mask = render_chat_ids(tokenizer, episode_messages(demos, query))
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == "42<|im_end|>"


def test_held_out_families_must_be_unseen():
    with pytest.raises(UserError, match="share"):
        MetaICLConfig(train_tasks=["gcd", "lcm"], eval_tasks=["gcd"]).validate()
    with pytest.raises(UserError, match="pool"):
        MetaICLConfig(pool=5).validate()
    MetaICLConfig().validate()
